// The disk's warm-read table, without N-API (disk-table.h; its N-API bindings are in
// disk-reads.cc): reads of normal-class disk chunks whose tag the agent
// has checked, served from the cache's slot file in native code (docs/nbd.md, "Reads
// in native code"). What goes in is a chunk whose blob JavaScript checked, with the
// slot it lies in, or one this table checked itself at its first read (TableAdmit:
// the blob JavaScript said lies there, its tag checked as JavaScript checks it);
// JavaScript takes chunks out again (a write, a new manifest, a slot the cache gives
// up). A read here then takes only the 4 KiB pieces it covers, checks each against a
// keyed BLAKE2b-128 digest taken from the checked blob, and decrypts them (XChaCha20
// from that piece's block); a read of a whole chunk, or a shorter read of a chunk whose
// digests the digester has not taken yet, checks the whole blob's tag instead. Anything else (a
// chunk neither in the table nor placed, no class key, a piece or tag that does not
// match) answers false, and JavaScript reads it as before, so this path can only ever
// refuse, never serve bytes JavaScript would not.
//
// The class keys live in one sodium_malloc region (locked, guard-paged, left out of
// core dumps) that stays readable while a key is held, instead of being opened and
// closed around each use as the key ring does: that mprotect pair was 18 µs of a
// 149 µs 4 KiB read. A chunk key is derived per read into locked scratch and zeroed.
#include "disk-table.h"

#include <string.h>
#include <sys/resource.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <algorithm>
#include <system_error>

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

constexpr size_t MAX_AD = MAX_LABEL + COORD + 1;

/** The chunk AEAD's associated data (common/chunk.ts chunkAd): label ‖ coordinate ‖ class; its length. */
size_t chunk_ad(const Table *t, uint32_t gen, uint32_t index, uint8_t *out) {
  size_t m = t->ad_label_len;
  memcpy(out, t->ad_label, m);
  m += coord(t, gen, index, out + m);
  out[m++] = t->cls;
  return m;
}

}  // namespace

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

namespace {

/** Stops the digester and waits for it (it ends its chunk first); not under t->mu. */
void stop_digester(Table *t) {
  {
    std::lock_guard<std::mutex> g(t->mu);
    t->digester_stop = true;
    t->undigested.clear();
  }
  t->digest_wake.notify_all();
  if (t->digester.joinable()) t->digester.join();
}

}  // namespace

Table::~Table() {
  stop_digester(this);
  /* SAFETY: each came from sodium_malloc in Open; no proxy holds a reference any more, so none holds a buffer */
  for (uint8_t *b : reply_all) sodium_free(b);
  /* SAFETY: the same, and no JavaScript view of them is left: each held a reference */
  for (uint8_t *b : write_all) sodium_free(b);
  /* SAFETY: an admission holds a reference while it has a reader, so every one is back here */
  for (Reader *r : spare_readers) ReaderFree(r);
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

void TableDigests(const Table *t, const uint8_t *ct, size_t len, std::vector<uint8_t> &out) {
  size_t pieces = (len + PIECE - 1) / PIECE;
  out.resize(pieces * DIGEST);
  for (size_t p = 0; p < pieces; p++) {
    size_t plen = std::min(PIECE, len - p * PIECE);
    /* SAFETY: [p·PIECE, + plen) lies inside ct's len bytes; out holds pieces × DIGEST */
    crypto_generichash(out.data() + p * DIGEST, DIGEST, ct + p * PIECE, plen, t->digest_key, KEY);
  }
}

void TableDestroy(Table *t) {
  stop_digester(t);
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
 * Reads the whole blob of chunk `index` (where `c` says it lies) and checks its tag with
 * the chunk key in r's scratch and associated data `ad`; with n > 0 decrypts plaintext
 * [within, within + n) into out; with `digest`, keeps its pieces' digests in the table if
 * the chunk there is still that blob (a forget comes before its slot is reused). False
 * when the file is short, or the tag does not match (the chunk is then forgotten and
 * counted).
 */
bool check_whole(Table *t, Reader *r, uint32_t index, const Chunk &c, int fd, const uint8_t *ad, size_t m, size_t within, uint8_t *out, size_t n,
                 bool digest) {
  Scratch *s = r->scratch;
  std::vector<uint8_t> &ct = r->ct;
  /* SAFETY: ct holds chunk_size + TAG bytes (ReaderNew; TableAdmit only grows it), and c.len ≤ chunk_size */
  ssize_t got = pread(fd, ct.data(), c.len + TAG, off_t(c.at));
  if (got != ssize_t(c.len + TAG)) return false;
  // The chunk in the table is still the blob `c` describes (a forget comes before its slot is reused); t->mu held.
  auto same = [t, index, &c]() {
    auto it = t->chunks.find(index);
    return it != t->chunks.end() && it->second.at == c.at && it->second.gen == c.gen && it->second.len == c.len &&
           memcmp(it->second.nonce, c.nonce, NONCE) == 0;
  };
  if (aead::VerifyDetached(&s->aead, ct.data(), c.len, ct.data() + c.len, ad, m, c.nonce, s->key) != 0) {
    std::lock_guard<std::mutex> g(t->mu);
    // A slot reused since (another blob there now) is no damage, and the table may hold its successor.
    if (same()) {
      t->mismatches++;
      TableForgetLocked(t, index);
    }
    return false;
  }
  if (n > 0) ChunkDecrypt(s, c.nonce, ct.data(), 0, c.len, within, out, n);
  if (!digest) return true;
  std::vector<uint8_t> digests;
  TableDigests(t, ct.data(), c.len, digests);
  std::lock_guard<std::mutex> g(t->mu);
  if (same() && t->chunks[index].digests.empty()) {
    t->chunks[index].digests = std::move(digests);
    t->digested++;
  }
  return true;
}

void digest_loop(Table *t);

/** Chunk `index` (in the table, with no digests) to the digester's queue, unless it is there or the queue is full; t->mu held. */
void queue_digests_locked(Table *t, uint32_t index) {
  auto it = t->chunks.find(index);
  if (it == t->chunks.end() || it->second.queued || t->digester_stop || t->undigested.size() >= t->max_chunks) return;
  if (!t->digester.joinable()) {
    try {
      t->digester = std::thread(digest_loop, t);
    } catch (const std::system_error &) {
      t->digester_stop = true;  // no thread to be had: short reads go on checking whole blobs
      return;
    }
  }
  it->second.queued = true;
  t->undigested.push_back(index);
  t->digest_wake.notify_one();
}

/** The digester's thread (Table::digester): digests of admitted chunks, one at a time, until TableDestroy stops it. */
void digest_loop(Table *t) {
  // Nice 19, the lowest priority of its class, not SCHED_IDLE: it takes t->mu, which every read needs, and a
  // SCHED_IDLE thread preempted while holding it could keep readers waiting as long as
  // the cores stay busy.
  setpriority(PRIO_PROCESS, pid_t(syscall(SYS_gettid)), 19);
  Reader *r = ReaderNew(t->chunk_size);
  std::unique_lock<std::mutex> g(t->mu);
  if (!r) {
    // No locked memory: no digests, and nothing left waiting for them.
    t->digester_stop = true;
    for (uint32_t index : t->undigested)
      if (auto it = t->chunks.find(index); it != t->chunks.end()) it->second.queued = false;
    t->undigested.clear();
  }
  while (r) {
    t->digest_wake.wait(g, [t] { return t->digester_stop || !t->undigested.empty(); });
    if (t->digester_stop) break;
    uint32_t index = t->undigested.front();
    t->undigested.pop_front();
    auto it = t->chunks.find(index);
    if (it != t->chunks.end()) it->second.queued = false;
    int slot = it == t->chunks.end() ? -1 : TableSlotLocked(t, it->second.gen);
    if (slot < 0 || !it->second.digests.empty() || t->fd < 0) continue;
    Chunk c;
    c.gen = it->second.gen;
    c.at = it->second.at;
    c.len = it->second.len;
    memcpy(c.nonce, it->second.nonce, NONCE);
    int fd = t->fd;
    TableDeriveLocked(t, slot, c.gen, index, r->scratch->key);
    uint8_t ad[MAX_AD];
    size_t m = chunk_ad(t, c.gen, index, ad);
    g.unlock();
    check_whole(t, r, index, c, fd, ad, m, 0, nullptr, 0, true);
    sodium_memzero(r->scratch->key, KEY);
    g.lock();
  }
  g.unlock();
  ReaderFree(r);
}

/**
 * Plaintext of bytes [within, within + n) of one chunk into out, from its pieces in the
 * file (or the whole blob, its tag checked: a whole-chunk read, or a chunk the digester
 * has not reached yet, whose digests it leaves to the digester). False (out untouched or partly written: the
 * caller fails the whole read) when the chunk is not in the table, its class key is not
 * held, the file is short, or a piece or the tag does not match (the chunk is then
 * forgotten).
 */
bool read_part(Table *t, Reader *r, uint32_t index, size_t within, uint8_t *out, size_t n) {
  Scratch *s = r->scratch;
  std::vector<uint8_t> &ct = r->ct;
  Chunk c;
  int fd;  // the table's file, read under the lock; closed and its number reused after, pread fails or reads bytes no digest or tag accepts
  uint8_t ad[MAX_AD];  // the chunk AEAD's associated data, for a check of the whole blob's tag
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
    size_t p0 = within / PIECE, p1 = (within + n + PIECE - 1) / PIECE;
    if (!it->second.digests.empty()) c.digests.assign(it->second.digests.begin() + p0 * DIGEST, it->second.digests.begin() + p1 * DIGEST);
    TableDeriveLocked(t, slot, c.gen, index, s->key);
    m = chunk_ad(t, c.gen, index, ad);  // under the lock: Image() may change the image id
  }
  bool ok = false;
  if ((within != 0 || n != c.len) && c.digests.empty()) {
    // Admitted and not yet digested (the digester is behind): this shorter read checks
    // the whole blob's tag, and leaves the digests to the digester, off the read's path.
    ok = check_whole(t, r, index, c, fd, ad, m, within, out, n, false);
    sodium_memzero(s->key, KEY);
    if (ok) {
      std::lock_guard<std::mutex> g(t->mu);
      queue_digests_locked(t, index);  // if the queue had no room when it was admitted
    }
    return ok;
  }
  if (within == 0 && n == c.len) {
    // A whole chunk: its Poly1305 tag checks it, in the same pass that decrypts it
    // (about twice as fast as a digest per piece and a separate decryption).
    /* SAFETY: ct holds chunk_size + TAG bytes (ReaderNew), and c.len ≤ chunk_size (Put) */
    ssize_t got = pread(fd, ct.data(), c.len + TAG, off_t(c.at));
    if (got == ssize_t(c.len + TAG) &&
        aead::OpenDetached(&s->aead, out, ct.data(), c.len, ct.data() + c.len, ad, m, c.nonce, s->key) == 0) {
      ok = true;
    } else if (got == ssize_t(c.len + TAG)) {
      sodium_memzero(out, n);
      std::lock_guard<std::mutex> g(t->mu);
      t->mismatches++;
      TableForgetLocked(t, index);
    }
    sodium_memzero(s->key, KEY);
    return ok;
  }
  size_t p0 = within / PIECE;
  size_t from = p0 * PIECE, to = std::min(((within + n + PIECE - 1) / PIECE) * PIECE, size_t(c.len));
  size_t len = to - from;
  do {
    if (len > ct.size()) break;
    /* SAFETY: ct holds at least len bytes (checked above); fd is the table's own dup of the slot file */
    ssize_t got = pread(fd, ct.data(), len, off_t(c.at + from));
    if (got != ssize_t(len)) break;
    bool match = true;
    for (size_t p = 0; p * PIECE < len; p++) {
      uint8_t d[DIGEST];
      size_t plen = std::min(PIECE, len - p * PIECE);
      crypto_generichash(d, DIGEST, ct.data() + p * PIECE, plen, t->digest_key, KEY);
      if (sodium_memcmp(d, c.digests.data() + p * DIGEST, DIGEST) != 0) match = false;
    }
    if (!match) {
      std::lock_guard<std::mutex> g(t->mu);
      t->mismatches++;
      TableForgetLocked(t, index);
      break;
    }
    ChunkDecrypt(s, c.nonce, ct.data(), from, c.len, within, out, n);
    ok = true;
  } while (false);
  sodium_memzero(s->key, KEY);
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

uint64_t TableAdmitBegin(Table *t, uint32_t index) {
  std::lock_guard<std::mutex> g(t->mu);
  t->admitting[index].jobs++;
  return t->epoch;
}

namespace {

/** Ends an admission; whether the chunk was forgotten since it began. t->mu held. */
bool admit_end_locked(Table *t, uint32_t index, uint64_t begun) {
  auto it = t->admitting.find(index);
  bool stale = it->second.stale || t->epoch != begun || t->fd < 0;
  if (--it->second.jobs == 0) t->admitting.erase(it);
  return stale;
}

}  // namespace

void TableAdmitCancel(Table *t, uint32_t index) {
  std::lock_guard<std::mutex> g(t->mu);
  admit_end_locked(t, index, t->epoch);
}

bool TableAdmit(Table *t, Reader *r, uint32_t index, uint32_t gen, uint64_t at, size_t blob_len, size_t within, uint8_t *out, size_t n,
                uint64_t begun) {
  size_t len = blob_len >= CT_AT + TAG ? blob_len - CT_AT - TAG : 0;
  Scratch *s = r->scratch;
  int fd;
  uint8_t ad[MAX_AD];
  size_t ad_len;
  {
    std::lock_guard<std::mutex> g(t->mu);
    int slot = TableSlotLocked(t, gen);
    if (slot < 0 || t->fd < 0 || blob_len < CT_AT + TAG || len > t->chunk_size || within > len || n > len - within) {
      admit_end_locked(t, index, begun);
      return false;
    }
    fd = t->fd;
    ad_len = chunk_ad(t, gen, index, ad);
    TableDeriveLocked(t, slot, gen, index, s->key);
  }
  std::vector<uint8_t> &blob = r->ct;
  if (blob.size() < blob_len) blob.resize(blob_len);
  Chunk c;
  c.gen = gen;
  c.at = at + CT_AT;
  c.len = uint32_t(len);
  /* SAFETY: blob holds at least blob_len bytes (resized above); fd is read as read_part reads it */
  ssize_t got = pread(fd, blob.data(), blob_len, off_t(at));
  bool whole = out && within == 0 && n == len;
  bool checked = false;
  if (got == ssize_t(blob_len) && blob[0] == FORMAT) {
    memcpy(c.nonce, blob.data() + 1, NONCE);
    const uint8_t *ct = blob.data() + CT_AT;
    // A read of the whole chunk decrypts in the pass that checks; any other checks the tag alone, then decrypts its range.
    checked = whole ? aead::OpenDetached(&s->aead, out, ct, len, ct + len, ad, ad_len, c.nonce, s->key) == 0
                    : aead::VerifyDetached(&s->aead, ct, len, ct + len, ad, ad_len, c.nonce, s->key) == 0;
    if (checked && !whole && n > 0) ChunkDecrypt(s, c.nonce, ct, 0, len, within, out, n);
    // No piece digests here: the digester takes them (keyed BLAKE2b over 128 KiB cost
    // three times the rest of an admission); until then a shorter read checks the whole blob.
  }
  sodium_memzero(s->key, KEY);
  std::lock_guard<std::mutex> g(t->mu);
  bool stale = admit_end_locked(t, index, begun);
  if (got == ssize_t(blob_len) && !checked && !stale) {
    t->refused++;
    t->lies.erase(index);  // JavaScript reads it, drops the blob and fetches it again
  }
  if (!checked || stale) return false;
  t->lies.erase(index);
  TablePutLocked(t, index, std::move(c));
  queue_digests_locked(t, index);
  t->admits++;
  return true;
}

bool TableLiesLocked(Table *t, uint32_t index, uint32_t gen, uint64_t at, uint32_t blob_len) {
  if (t->lies.size() >= t->max_lies && t->lies.find(index) == t->lies.end()) return false;
  t->lies[index] = Table::Lies{gen, blob_len, at};
  return true;
}

namespace {

/** Admits chunk `index` where JavaScript said its blob lies, and serves bytes [within, + n) of it; false when it cannot. */
bool admit_part(Table *t, Reader *r, uint32_t index, size_t within, uint8_t *out, size_t n) {
  Table::Lies where;
  uint64_t begun;
  {
    std::lock_guard<std::mutex> g(t->mu);
    auto it = t->lies.find(index);
    if (it == t->lies.end() || TableSlotLocked(t, it->second.gen) < 0) return false;
    where = it->second;
    t->admitting[index].jobs++;
    begun = t->epoch;
  }
  return TableAdmit(t, r, index, where.gen, where.at, where.blob_len, within, out, n, begun);
}

}  // namespace

bool TableRead(Table *t, Reader *r, uint64_t offset, uint8_t *out, size_t len, bool admit) {
  bool ok = len > 0;
  for (size_t done = 0; ok && done < len;) {
    uint64_t pos = offset + done;
    uint32_t index = uint32_t(pos / t->chunk_size);
    size_t within = pos % t->chunk_size;
    size_t n = std::min(size_t(t->chunk_size) - within, len - done);
    ok = read_part(t, r, index, within, out + done, n) || (admit && admit_part(t, r, index, within, out + done, n));
    done += n;
  }
  std::lock_guard<std::mutex> g(t->mu);
  if (ok) t->reads++;
  else t->fallbacks++;
  return ok;
}

}  // namespace lethe
