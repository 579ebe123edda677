// The disk's warm-read table, without N-API (disk-table.h; its N-API bindings are in
// disk-reads.cc, its admissions in disk-admit.cc): reads of normal-class disk chunks
// whose tag the agent has checked, served from the cache's slot file in native code
// (docs/nbd.md, "Reads in native code"). What goes in is a chunk whose blob JavaScript
// checked, with the slot it lies in, or one this table checked itself at its first read
// (TableAdmit); JavaScript takes chunks out again (a write, a new manifest, a slot the
// cache gives up). Each chunk goes in with a tag for each of its 4 KiB pieces of
// ciphertext (TablePieceTags), taken from the checked blob: a read then takes only the
// pieces it covers, checks each against its tag, and decrypts them (XChaCha20 from that
// piece's block); a read of a whole chunk checks the whole blob's tag instead. Anything
// else (a chunk neither in the table nor placed, no class key, a piece or tag that does
// not match) answers false, and JavaScript reads it as before, so this path can only
// ever refuse, never serve bytes JavaScript would not.
//
// The class keys live in one sodium_malloc region (locked, guard-paged, left out of
// core dumps) that stays readable while a key is held, instead of being opened and
// closed around each use as the key ring does: that mprotect pair was 18 µs of a
// 149 µs 4 KiB read. A chunk key is derived per read into locked scratch and zeroed.
#include "disk-table.h"

#include <string.h>
#include <unistd.h>

#include <algorithm>

namespace lethe {

namespace {

/** The chunk coordinate (common/chunk.ts coordBytes): image id ‖ gen (BE32) ‖ kind ‖ index (BE64); its length. */
size_t coord(const Table *t, uint32_t gen, uint32_t index, uint8_t *out) {
  size_t m = 0;
  memcpy(out, t->image, IMAGE_ID);
  m += IMAGE_ID;
  for (int b = 3; b >= 0; b--) out[m++] = uint8_t(gen >> (8 * b));
  out[m++] = t->kind;
  for (int b = 7; b >= 0; b--) out[m++] = uint8_t(uint64_t(index) >> (8 * b));
  return m;
}

}  // namespace

size_t ChunkAd(const Table *t, uint32_t gen, uint32_t index, uint8_t *out) {
  size_t m = t->ad_label_len;
  memcpy(out, t->ad_label, m);
  m += coord(t, gen, index, out + m);
  out[m++] = t->cls;
  return m;
}

void TableZeroKeysLocked(Table *t) {
  if (t->held > 0 && t->keys) {
    sodium_memzero(t->keys, MAX_GENS * KEY);
    sodium_mprotect_noaccess(t->keys);
  }
  t->held = 0;
  for (int i = 0; i < MAX_GENS; i++) t->gens[i] = -1;
  t->epoch++;  // an admission that took its key before puts nothing in: the lease has ended
}

void ReaderFree(Reader *r) {
  if (!r) return;
  /* SAFETY: scratch came from sodium_malloc in ReaderNew and is freed once, here */
  if (r->scratch) sodium_free(r->scratch);
  delete r;
}

Reader *ReaderNew(uint32_t chunk_size) {
  Reader *r = new Reader();
  r->scratch = static_cast<Scratch *>(sodium_malloc(sizeof(Scratch)));
  if (!r->scratch) {
    delete r;
    return nullptr;
  }
  sodium_memzero(r->scratch, sizeof(Scratch));
  r->ct.resize(chunk_size + TAG);
  return r;
}

Table::~Table() {
  /* SAFETY: each came from sodium_malloc in Open; no proxy holds a reference any more, so none holds a buffer */
  for (uint8_t *b : reply_all) sodium_free(b);
  /* SAFETY: the same, and no JavaScript view of them is left: each held a reference */
  for (uint8_t *b : write_all) sodium_free(b);
  /* SAFETY: an admission holds a reference while it has a reader, so every one is back here */
  for (Reader *r : spare_readers) ReaderFree(r);
  /* SAFETY: from sodium_malloc in Open (or null); the last reference is gone, so no reader uses it. sodium_free zeroes it */
  if (piece_key) sodium_free(piece_key);
}

void TableForgetLocked(Table *t, uint32_t index) {
  t->chunks.erase(index);
  t->lies.erase(index);
  auto it = t->admitting.find(index);
  if (it != t->admitting.end()) it->second.stale = true;
}

void TableForgetAllLocked(Table *t) {
  t->chunks.clear();
  t->lies.clear();
  t->epoch++;
}

void TablePutLocked(Table *t, uint32_t index, Chunk &&c) {
  if (t->chunks.size() >= t->max_chunks && t->chunks.find(index) == t->chunks.end()) t->chunks.erase(t->chunks.begin());
  t->chunks[index] = std::move(c);
}

void TablePieceTags(const Table *t, Scratch *s, const uint8_t *nonce, const uint8_t *ct, size_t len, std::vector<uint8_t> &out) {
  out.resize((len + PIECE - 1) / PIECE * PIECE_TAG);
  /* SAFETY: out holds a PIECE_TAG for each piece of ct's len bytes */
  aead::PieceTags(&s->aead, out.data(), ct, len, PIECE, 0, nonce, t->piece_key);
}

void TableDestroy(Table *t) {
  std::lock_guard<std::mutex> g(t->mu);
  TableZeroKeysLocked(t);
  TableForgetAllLocked(t);
  if (t->fd >= 0) close(t->fd);
  t->fd = -1;
  /* SAFETY: keys came from sodium_malloc in Open and is freed once, here, under the lock every reader takes to use it */
  if (t->keys) sodium_free(t->keys);
  t->keys = nullptr;
  ReaderFree(t->js);
  t->js = nullptr;
}

/** The chunk key of (gen, index) into `key` (locked scratch): BLAKE2b-256 keyed by class key `slot` over label ‖ coordinate (common/chunk.ts chunkKeyInto). */
void TableDeriveLocked(Table *t, int slot, uint32_t gen, uint32_t index, uint8_t *key) {
  uint8_t in[MAX_LABEL + COORD];
  size_t m = t->label_len;
  memcpy(in, t->label, m);
  m += coord(t, gen, index, in + m);
  /* SAFETY: keys is readable while held > 0 (a gen in gens means a key held); key is KEY bytes of locked scratch */
  crypto_generichash(key, KEY, in, m, t->keys + slot * KEY, KEY);
}

/** The key slot of `gen`, or -1 when its class key is not held. */
int TableSlotLocked(Table *t, uint32_t gen) {
  for (int i = 0; i < MAX_GENS; i++)
    if (t->gens[i] == gen) return i;
  return -1;
}

/**
 * Plaintext bytes [within, within + n) into out from ciphertext `ct`, which holds the
 * chunk's ciphertext from byte `from` (a multiple of 64) on. The keystream counts
 * 64-byte blocks from 1 (block 0 keyed Poly1305): a read not on a block boundary
 * decrypts its first block whole and keeps the tail.
 */
void ChunkDecrypt(Scratch *s, const uint8_t *nonce, const uint8_t *ct, size_t from, size_t ct_len, size_t within, uint8_t *out, size_t n) {
  size_t done = 0, lead = within % BLOCK;
  if (lead != 0) {
    size_t start = within - lead;
    size_t blen = std::min(BLOCK, ct_len - start);
    aead::StreamXorIc(&s->aead, s->block, ct + (start - from), blen, nonce, 1 + start / BLOCK, s->key);
    done = std::min(BLOCK - lead, n);
    memcpy(out, s->block + lead, done);
    sodium_memzero(s->block, BLOCK);
  }
  if (done < n) {
    size_t at = within + done;
    /* SAFETY: out holds n bytes (the caller's range); ct covers [from, ct_len) ⊇ [at, within + n) */
    aead::StreamXorIc(&s->aead, out + done, ct + (at - from), n - done, nonce, 1 + at / BLOCK, s->key);
  }
}


namespace {

/**
 * Plaintext of bytes [within, within + n) of one chunk into out: of a whole chunk from its
 * blob, its tag checked in the pass that decrypts; of a shorter range from the 4 KiB
 * pieces it covers, each checked against its tag. False (out untouched or partly
 * written: the caller fails the whole read) when the chunk is not in the table, its class
 * key is not held, the file is short, or a piece or the tag does not match (the chunk is
 * then forgotten).
 */
bool read_part(Table *t, Reader *r, uint32_t index, size_t within, uint8_t *out, size_t n) {
  Scratch *s = r->scratch;
  std::vector<uint8_t> &ct = r->ct;
  Chunk c;
  int fd;  // the table's file, read under the lock; closed and its number reused after, pread fails or reads bytes no tag accepts
  bool whole;
  size_t p0 = within / PIECE, p1 = (within + n + PIECE - 1) / PIECE;
  uint8_t ad[MAX_AD];  // the chunk AEAD's associated data, for a whole chunk
  size_t m = 0;
  {
    std::lock_guard<std::mutex> g(t->mu);
    auto it = t->chunks.find(index);
    if (it == t->chunks.end() || within + n > it->second.len) return false;
    int slot = TableSlotLocked(t, it->second.gen);
    if (slot < 0) return false;
    c.gen = it->second.gen;
    fd = t->fd;
    c.at = it->second.at;
    c.len = it->second.len;
    memcpy(c.nonce, it->second.nonce, NONCE);
    whole = within == 0 && n == c.len;
    if (!whole && it->second.tags.size() < p1 * PIECE_TAG) return false;
    if (whole) m = ChunkAd(t, c.gen, index, ad);  // under the lock: Image() may change the image id
    else r->want.assign(it->second.tags.begin() + p0 * PIECE_TAG, it->second.tags.begin() + p1 * PIECE_TAG);
    TableDeriveLocked(t, slot, c.gen, index, s->key);
  }
  bool ok = false, damaged = false;
  if (whole) {
    // A whole chunk: its Poly1305 tag checks it, in the same pass that decrypts it
    // (about twice as fast as a tag per piece and a separate decryption).
    /* SAFETY: ct holds chunk_size + TAG bytes (ReaderNew), and c.len ≤ chunk_size (Put) */
    ssize_t got = pread(fd, ct.data(), c.len + TAG, off_t(c.at));
    if (got == ssize_t(c.len + TAG)) {
      ok = aead::OpenDetached(&s->aead, out, ct.data(), c.len, ct.data() + c.len, ad, m, c.nonce, s->key) == 0;
      if (!ok) sodium_memzero(out, n);
      damaged = !ok;
    }
  } else {
    size_t from = p0 * PIECE, len = std::min(p1 * PIECE, size_t(c.len)) - from;
    r->tags.resize((p1 - p0) * PIECE_TAG);
    /* SAFETY: ct holds chunk_size + TAG ≥ len bytes (ReaderNew); fd is the table's own dup of the slot file */
    ssize_t got = pread(fd, ct.data(), len, off_t(c.at + from));
    if (got == ssize_t(len)) {
      aead::PieceTags(&s->aead, r->tags.data(), ct.data(), len, PIECE, p0, c.nonce, t->piece_key);
      ok = sodium_memcmp(r->tags.data(), r->want.data(), r->tags.size()) == 0;
      if (ok) ChunkDecrypt(s, c.nonce, ct.data(), from, c.len, within, out, n);
      damaged = !ok;
    }
  }
  sodium_memzero(s->key, KEY);
  if (damaged) {
    std::lock_guard<std::mutex> g(t->mu);
    t->mismatches++;
    TableForgetLocked(t, index);
  }
  return ok;
}

}  // namespace

void TableUnref(Table *t) {
  if (--t->refs == 0) delete t;
}

size_t TableMaxReply(const Table *t) {
  return t->reply_bytes - REPLY_HEADER_ROOM;
}

size_t TableCopyBytes(const Table *t) {
  return t->copy_bytes;
}

uint8_t *TableTakeReply(Table *t, int wait_ms) {
  std::unique_lock<std::mutex> g(t->mu);
  if (!t->reply_free.wait_for(g, std::chrono::milliseconds(wait_ms), [t] { return !t->replies.empty(); })) return nullptr;
  uint8_t *b = t->replies.back();
  t->replies.pop_back();
  return b;
}

void TableGiveReply(Table *t, uint8_t *buf) {
  {
    std::lock_guard<std::mutex> g(t->mu);
    t->replies.push_back(buf);
  }
  t->reply_free.notify_one();
}

size_t TableMaxWrite(const Table *t) {
  return t->write_bytes;
}

size_t TableWriteCount(const Table *t) {
  return t->write_all.size();
}

int TableTakeWrite(Table *t) {
  std::lock_guard<std::mutex> g(t->write_mu);
  for (size_t i = 0; i < t->write_state.size(); i++) {
    if (t->write_state[i] != WRITE_FREE) continue;
    t->write_state[i] = WRITE_FILLING;
    return int(i);
  }
  return -1;
}

void TableLendWrite(Table *t, int i, uint32_t len) {
  std::lock_guard<std::mutex> g(t->write_mu);
  t->write_state[size_t(i)] = WRITE_LENT;
  t->write_len[size_t(i)] = len;
}

bool TableGiveWrite(Table *t, int i, uint8_t from, size_t len) {
  std::lock_guard<std::mutex> g(t->write_mu);
  if (i < 0 || size_t(i) >= t->write_all.size() || t->write_state[size_t(i)] != from) return false;
  if (from == WRITE_LENT) len = t->write_len[size_t(i)];
  /* SAFETY: write_all[i] holds write_bytes >= len bytes (a payload is never longer); nobody else uses it in this state */
  sodium_memzero(t->write_all[size_t(i)], std::min(len, t->write_bytes));
  t->write_state[size_t(i)] = WRITE_FREE;
  t->write_len[size_t(i)] = 0;
  return true;
}

Reader *TableTakeReader(Table *t) {
  {
    std::lock_guard<std::mutex> g(t->mu);
    if (!t->spare_readers.empty()) {
      Reader *r = t->spare_readers.back();
      t->spare_readers.pop_back();
      return r;
    }
  }
  return ReaderNew(t->chunk_size);
}

void TableGiveReader(Table *t, Reader *r) {
  std::lock_guard<std::mutex> g(t->mu);
  t->spare_readers.push_back(r);
}

bool TableRead(Table *t, Reader *r, uint64_t offset, uint8_t *out, size_t len, bool admit) {
  bool ok = len > 0;
  for (size_t done = 0; ok && done < len;) {
    uint64_t pos = offset + done;
    uint32_t index = uint32_t(pos / t->chunk_size);
    size_t within = pos % t->chunk_size;
    size_t n = std::min(size_t(t->chunk_size) - within, len - done);
    ok = read_part(t, r, index, within, out + done, n) || (admit && TableAdmitPlaced(t, r, index, within, out + done, n));
    done += n;
  }
  std::lock_guard<std::mutex> g(t->mu);
  if (ok) t->reads++;
  else t->fallbacks++;
  return ok;
}

}  // namespace lethe
