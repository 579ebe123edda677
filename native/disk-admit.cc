// A chunk's first read, in native code (disk-table.h; docs/nbd.md, "A chunk's first
// read"): the table admits a chunk whose blob lies in the cache's slot file without
// JavaScript's check. It reads the whole blob, checks the format byte and the tag as
// JavaScript does (under the chunk key the held class key derives), takes the pieces'
// tags, and puts the chunk in. It runs on a libuv pool thread (diskReadsAdmit, for a read
// that reached JavaScript) or on a read proxy's own thread (TableAdmitPlaced, for a chunk
// whose place JavaScript gave). A forget of the chunk, a new image or the keys zeroed
// while it runs spoils it: it puts nothing in, since the blob it read may be one a write
// replaced.
#include <string.h>
#include <unistd.h>

#include "disk-table.h"

namespace lethe {

namespace {

/** Starts an admission of chunk `index`; the epoch it began in. t->mu held. */
uint64_t admit_begin_locked(Table *t, uint32_t index) {
  t->admitting[index].jobs++;
  return t->epoch;
}

/** Ends an admission; whether the chunk was forgotten since it began. t->mu held. */
bool admit_end_locked(Table *t, uint32_t index, uint64_t begun) {
  auto it = t->admitting.find(index);
  bool stale = it->second.stale || t->epoch != begun || t->fd < 0;
  if (--it->second.jobs == 0) t->admitting.erase(it);
  return stale;
}

}  // namespace

uint64_t TableAdmitBegin(Table *t, uint32_t index) {
  std::lock_guard<std::mutex> g(t->mu);
  return admit_begin_locked(t, index);
}

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
    ad_len = ChunkAd(t, gen, index, ad);
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
  }
  sodium_memzero(s->key, KEY);
  if (checked) TablePieceTags(t, s, c.nonce, blob.data() + CT_AT, len, c.tags);
  std::lock_guard<std::mutex> g(t->mu);
  bool stale = admit_end_locked(t, index, begun);
  if (got == ssize_t(blob_len) && !checked && !stale) {
    t->refused++;
    t->lies.erase(index);  // JavaScript reads it, drops the blob and fetches it again
  }
  if (!checked || stale) return false;
  t->lies.erase(index);
  TablePutLocked(t, index, std::move(c));
  t->admits++;
  return true;
}

bool TableLiesLocked(Table *t, uint32_t index, uint32_t gen, uint64_t at, uint32_t blob_len) {
  if (t->lies.size() >= t->max_lies && t->lies.find(index) == t->lies.end()) return false;
  t->lies[index] = Table::Lies{gen, blob_len, at};
  return true;
}

bool TableAdmitPlaced(Table *t, Reader *r, uint32_t index, size_t within, uint8_t *out, size_t n) {
  Table::Lies where;
  uint64_t begun;
  {
    std::lock_guard<std::mutex> g(t->mu);
    auto it = t->lies.find(index);
    if (it == t->lies.end() || TableSlotLocked(t, it->second.gen) < 0) return false;
    where = it->second;
    begun = admit_begin_locked(t, index);
  }
  return TableAdmit(t, r, index, where.gen, where.at, where.blob_len, within, out, n, begun);
}

}  // namespace lethe
