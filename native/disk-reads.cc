// The disk's warm-read table: reads of normal-class disk chunks whose tag the agent
// has checked, served from the cache's slot file in native code (docs/nbd.md, "Reads
// in native code"). JavaScript decides what goes in (a chunk whose blob it checked,
// with the slot it lies in) and takes it out again (a write, a new manifest, a slot
// the cache gives up); a read here then takes only the 4 KiB pieces it covers, checks
// each against a keyed BLAKE2b-128 digest taken from the checked blob, and decrypts
// them (XChaCha20 from that piece's block); a read of a whole chunk checks its tag
// instead, in the pass that decrypts it. Anything else (a chunk not in the table,
// no class key, a piece that does not match) answers false, and JavaScript reads it
// as before, so this path can only ever refuse, never serve bytes JavaScript would not.
//
//   diskReadsOpen(fd, digestKey, keyLabel, adLabel, kind, cls, chunkSize, maxChunks,
//                 replyBuffers, replyMax, copyBytes) → handle   (the last three: the proxies' locked buffers)
//   diskReadsImage(h, imageId)           a new manifest: every chunk forgotten
//   diskReadsKey(h, gen, key)            a class key (copied into locked memory)
//   diskReadsZeroKeys(h)                 every class key zeroed (the lease ended)
//   diskReadsPut(h, index, gen, at, blob) a checked blob, lying at file offset `at`
//   diskReadsHas(h, index, gen), diskReadsForget(h, index), diskReadsForgetAll(h)
//   diskReadsRead(h, offset, out) → bool plaintext of disk bytes [offset, offset + out.length)
//   diskReadsDecrypt(h, index, gen, blob, from, out) → bool  bytes of a checked blob JavaScript
//                                        keeps in memory, under the table's class key
//   diskReadsStats(h), diskReadsClose(h)
//
// The class keys live in one sodium_malloc region (locked, guard-paged, left out of
// core dumps) that stays readable while a key is held, instead of being opened and
// closed around each use as the key ring does: that mprotect pair was 18 µs of a
// 149 µs 4 KiB read. A chunk key is derived per read into locked scratch and zeroed.
#include "disk-reads.h"

#include <sodium.h>
#include <unistd.h>

#include <atomic>
#include <mutex>
#include <unordered_map>
#include <vector>

#include "napi-helpers.h"

namespace lethe {
namespace {

constexpr size_t PIECE = 4096;
constexpr size_t DIGEST = 16;
constexpr size_t NONCE = crypto_stream_xchacha20_NONCEBYTES;
constexpr size_t KEY = 32;
constexpr size_t TAG = 16;
constexpr size_t CT_AT = 1 + NONCE;  // format byte, nonce, then the ciphertext
constexpr size_t IMAGE_ID = 16;
constexpr size_t COORD = IMAGE_ID + 4 + 1 + 8;
constexpr size_t MAX_LABEL = 64;
constexpr int MAX_GENS = 8;
constexpr size_t BLOCK = 64;

struct Chunk {
  uint32_t gen;
  uint64_t at;   // file offset of the ciphertext
  uint32_t len;  // ciphertext bytes (= plaintext bytes)
  uint8_t nonce[NONCE];
  std::vector<uint8_t> digests;  // DIGEST bytes a piece
};

/** Locked scratch for one reader: a derived chunk key and one keystream block. */
struct Scratch {
  uint8_t key[KEY];
  uint8_t block[BLOCK];
};

}  // namespace

struct Reader {
  Scratch *scratch = nullptr;  // sodium_malloc
  std::vector<uint8_t> ct;     // ciphertext read from the file (not secret)
};

struct Table {
  std::mutex mu;
  int fd = -1;
  uint8_t digest_key[KEY];
  uint8_t label[MAX_LABEL];  // the chunk-key derivation's
  size_t label_len = 0;
  uint8_t ad_label[MAX_LABEL];  // the chunk AEAD's associated data, before the coordinate
  size_t ad_label_len = 0;
  uint8_t kind = 0;
  uint8_t cls = 0;
  uint32_t chunk_size = 0;
  size_t max_chunks = 0;
  uint8_t image[IMAGE_ID] = {};
  std::unordered_map<uint32_t, Chunk> chunks;
  int64_t gens[MAX_GENS];
  uint8_t *keys = nullptr;   // sodium_malloc, MAX_GENS × KEY
  int held = 0;              // class keys held: the region is readable while > 0
  Reader *js = nullptr;      // the JavaScript thread's reader
  uint64_t reads = 0, fallbacks = 0, mismatches = 0;
  /** The handle's reference and each proxy's: the last to let go frees the table. */
  std::atomic<int> refs{1};
  /** Locked reply buffers the proxies share (free ones in `replies`), each of reply_bytes; freed with the table, when no proxy can hold one. */
  std::vector<uint8_t *> reply_all, replies;
  size_t reply_bytes = 0;
  size_t copy_bytes = 0;

  ~Table() {
    /* SAFETY: each came from sodium_malloc in Open; no proxy holds a reference any more, so none holds a buffer */
    for (uint8_t *b : reply_all) sodium_free(b);
  }
};

namespace {

void zero_keys_locked(Table *t) {
  if (t->held > 0 && t->keys) {
    sodium_memzero(t->keys, MAX_GENS * KEY);
    sodium_mprotect_noaccess(t->keys);
  }
  t->held = 0;
  for (int i = 0; i < MAX_GENS; i++) t->gens[i] = -1;
}

void free_reader(Reader *r) {
  if (!r) return;
  /* SAFETY: scratch came from sodium_malloc in new_reader and is freed once, here */
  if (r->scratch) sodium_free(r->scratch);
  delete r;
}

Reader *new_reader(uint32_t chunk_size) {
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

/**
 * Closes the table: keys zeroed and freed, chunks forgotten, the file closed. A proxy
 * thread still holding a reference then finds nothing to serve (no key, no chunk).
 */
void destroy(Table *t) {
  std::lock_guard<std::mutex> g(t->mu);
  zero_keys_locked(t);
  t->chunks.clear();
  if (t->fd >= 0) close(t->fd);
  t->fd = -1;
  /* SAFETY: keys came from sodium_malloc in Open and is freed once, here, under the lock every reader takes to use it */
  if (t->keys) sodium_free(t->keys);
  t->keys = nullptr;
  free_reader(t->js);
  t->js = nullptr;
}

void Finalize(napi_env, void *data, void *) {
  Table *t = static_cast<Table *>(data);
  destroy(t);
  TableUnref(t);
}

/** The table behind a handle; throws (returns null) for anything else. */
Table *get_table(napi_env env, napi_value v) {
  void *p = nullptr;
  napi_valuetype type;
  if (napi_typeof(env, v, &type) != napi_ok || type != napi_external || napi_get_value_external(env, v, &p) != napi_ok || !p) {
    throw_type(env, "lethe_native: expected a disk-reads handle");
    return nullptr;
  }
  Table *t = static_cast<Table *>(p);
  if (!t->js) {
    throw_type(env, "lethe_native: the disk-reads table is closed");
    return nullptr;
  }
  return t;
}

/** Reads a call's `n` arguments into argv, the first a table handle; the table, or null (thrown). */
Table *table_args(napi_env env, napi_callback_info info, size_t n, napi_value *argv) {
  return get_args(env, info, n, argv) ? get_table(env, argv[0]) : nullptr;
}

napi_value boolean(napi_env env, bool b) {
  napi_value v;
  napi_get_boolean(env, b, &v);
  return v;
}

// ---- the read ----

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

/** The chunk key of (gen, index) into `key` (locked scratch): BLAKE2b-256 keyed by class key `slot` over label ‖ coordinate (common/chunk.ts chunkKeyInto). */
void derive_locked(Table *t, int slot, uint32_t gen, uint32_t index, uint8_t *key) {
  uint8_t in[MAX_LABEL + COORD];
  size_t m = t->label_len;
  memcpy(in, t->label, m);
  m += coord(t, gen, index, in + m);
  /* SAFETY: keys is readable while held > 0 (a gen in gens means a key held); key is KEY bytes of locked scratch */
  crypto_generichash(key, KEY, in, m, t->keys + slot * KEY, KEY);
}

/** The key slot of `gen`, or -1 when its class key is not held. */
int slot_locked(Table *t, uint32_t gen) {
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
void decrypt(Scratch *s, const uint8_t *nonce, const uint8_t *ct, size_t from, size_t ct_len, size_t within, uint8_t *out, size_t n) {
  size_t done = 0, lead = within % BLOCK;
  if (lead != 0) {
    size_t start = within - lead;
    size_t blen = std::min(BLOCK, ct_len - start);
    crypto_stream_xchacha20_xor_ic(s->block, ct + (start - from), blen, nonce, 1 + start / BLOCK, s->key);
    done = std::min(BLOCK - lead, n);
    memcpy(out, s->block + lead, done);
    sodium_memzero(s->block, BLOCK);
  }
  if (done < n) {
    size_t at = within + done;
    /* SAFETY: out holds n bytes (the caller's range); ct covers [from, ct_len) ⊇ [at, within + n) */
    crypto_stream_xchacha20_xor_ic(out + done, ct + (at - from), n - done, nonce, 1 + at / BLOCK, s->key);
  }
}


/**
 * Plaintext of bytes [within, within + n) of one chunk into out, from its pieces in the
 * file. False (out untouched or partly written: the caller fails the whole read) when
 * the chunk is not in the table, its class key is not held, the file is short, or a
 * piece does not match its digest (the chunk is then forgotten).
 */
bool read_part(Table *t, Reader *r, uint32_t index, size_t within, uint8_t *out, size_t n) {
  Scratch *s = r->scratch;
  std::vector<uint8_t> &ct = r->ct;
  Chunk c;
  int fd;  // the table's file, read under the lock; closed and its number reused after, pread fails or reads bytes no digest or tag accepts
  {
    std::lock_guard<std::mutex> g(t->mu);
    auto it = t->chunks.find(index);
    if (it == t->chunks.end() || within + n > it->second.len) return false;
    int slot = slot_locked(t, it->second.gen);
    if (slot < 0) return false;
    c.gen = it->second.gen;
    fd = t->fd;
    c.at = it->second.at;
    c.len = it->second.len;
    memcpy(c.nonce, it->second.nonce, NONCE);
    size_t p0 = within / PIECE, p1 = (within + n + PIECE - 1) / PIECE;
    c.digests.assign(it->second.digests.begin() + p0 * DIGEST, it->second.digests.begin() + p1 * DIGEST);
    derive_locked(t, slot, c.gen, index, s->key);
  }
  bool ok = false;
  if (within == 0 && n == c.len) {
    // A whole chunk: its Poly1305 tag checks it, in the same pass that decrypts it
    // (about twice as fast as a digest per piece and a separate decryption).
    uint8_t ad[MAX_LABEL + COORD + 1];
    size_t m = t->ad_label_len;
    memcpy(ad, t->ad_label, m);
    m += coord(t, c.gen, index, ad + m);
    ad[m++] = t->cls;
    /* SAFETY: ct holds chunk_size + TAG bytes (new_reader), and c.len ≤ chunk_size (Put) */
    ssize_t got = pread(fd, ct.data(), c.len + TAG, off_t(c.at));
    if (got == ssize_t(c.len + TAG) &&
        crypto_aead_xchacha20poly1305_ietf_decrypt_detached(out, nullptr, ct.data(), c.len, ct.data() + c.len, ad, m, c.nonce, s->key) == 0) {
      ok = true;
    } else if (got == ssize_t(c.len + TAG)) {
      sodium_memzero(out, n);
      std::lock_guard<std::mutex> g(t->mu);
      t->mismatches++;
      t->chunks.erase(index);
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
      t->chunks.erase(index);
      break;
    }
    decrypt(s, c.nonce, ct.data(), from, c.len, within, out, n);
    ok = true;
  } while (false);
  sodium_memzero(s->key, KEY);
  return ok;
}

// ---- N-API ----

bool get_u32(napi_env env, napi_value v, uint32_t *out) {
  int64_t x;
  if (!get_i64(env, v, &x)) return false;
  if (x < 0 || x > UINT32_MAX) {
    throw_type(env, "lethe_native: expected an unsigned 32-bit number");
    return false;
  }
  *out = uint32_t(x);
  return true;
}

napi_value Open(napi_env env, napi_callback_info info) {
  napi_value argv[11];
  int32_t fd, kind, cls;
  uint8_t *dkey, *label, *ad_label;
  size_t dkey_len, label_len, ad_label_len;
  uint32_t chunk_size, max_chunks, reply_buffers, reply_max, copy_bytes;
  if (!get_args(env, info, 11, argv) || !get_i32(env, argv[0], &fd) || !get_bytes(env, argv[1], &dkey, &dkey_len) ||
      !get_bytes(env, argv[2], &label, &label_len) || !get_bytes(env, argv[3], &ad_label, &ad_label_len) ||
      !get_i32(env, argv[4], &kind) || !get_i32(env, argv[5], &cls) || !get_u32(env, argv[6], &chunk_size) ||
      !get_u32(env, argv[7], &max_chunks) || !get_u32(env, argv[8], &reply_buffers) || !get_u32(env, argv[9], &reply_max) ||
      !get_u32(env, argv[10], &copy_bytes))
    return nullptr;
  if (dkey_len != KEY || label_len > MAX_LABEL || ad_label_len > MAX_LABEL || chunk_size == 0 || chunk_size % PIECE != 0 ||
      kind < 0 || kind > 255 || cls < 0 || cls > 255 || reply_buffers > 64 || reply_max > (1u << 24) || copy_bytes == 0 || copy_bytes > (1u << 20))
    return throw_type(env, "lethe_native: diskReadsOpen: bad key, label, chunk size or buffer sizes");
  if (sodium_init() < 0) return throw_errno(env, "sodium_init", EIO);
  Table *t = new Table();
  t->fd = dup(fd);
  if (t->fd < 0) {
    int err = errno;
    delete t;
    return throw_errno(env, "dup", err);
  }
  memcpy(t->digest_key, dkey, KEY);
  memcpy(t->label, label, label_len);
  t->label_len = label_len;
  memcpy(t->ad_label, ad_label, ad_label_len);
  t->ad_label_len = ad_label_len;
  t->kind = uint8_t(kind);
  t->cls = uint8_t(cls);
  t->chunk_size = chunk_size;
  t->max_chunks = max_chunks;
  t->keys = static_cast<uint8_t *>(sodium_malloc(MAX_GENS * KEY));
  t->js = new_reader(chunk_size);
  t->reply_bytes = REPLY_HEADER_ROOM + reply_max;
  t->copy_bytes = copy_bytes;
  bool pooled = true;
  for (uint32_t i = 0; i < reply_buffers && pooled; i++) {
    uint8_t *b = static_cast<uint8_t *>(sodium_malloc(t->reply_bytes));
    if (b) {
      sodium_memzero(b, t->reply_bytes);
      t->reply_all.push_back(b);
    }
    pooled = b != nullptr;
  }
  t->replies = t->reply_all;
  if (!t->keys || !t->js || !pooled) {
    destroy(t);
    delete t;
    return throw_errno(env, "sodium_malloc", ENOMEM);
  }
  sodium_memzero(t->keys, MAX_GENS * KEY);
  sodium_mprotect_noaccess(t->keys);
  for (int i = 0; i < MAX_GENS; i++) t->gens[i] = -1;
  napi_value handle;
  napi_create_external(env, t, Finalize, nullptr, &handle);
  return handle;
}

napi_value Image(napi_env env, napi_callback_info info) {
  napi_value argv[2];
  uint8_t *id;
  size_t len;
  Table *t = table_args(env, info, 2, argv);
  if (!t || !get_bytes(env, argv[1], &id, &len)) return nullptr;
  if (len != IMAGE_ID) return throw_type(env, "lethe_native: diskReadsImage: an image id is 16 bytes");
  std::lock_guard<std::mutex> g(t->mu);
  memcpy(t->image, id, IMAGE_ID);
  t->chunks.clear();
  return undefined(env);
}

napi_value Key(napi_env env, napi_callback_info info) {
  napi_value argv[3];
  uint32_t gen;
  uint8_t *key;
  size_t len;
  Table *t = table_args(env, info, 3, argv);
  if (!t || !get_u32(env, argv[1], &gen) || !get_bytes(env, argv[2], &key, &len)) return nullptr;
  if (len != KEY) return throw_type(env, "lethe_native: diskReadsKey: a class key is 32 bytes");
  std::lock_guard<std::mutex> g(t->mu);
  int slot = -1, empty = -1;
  for (int i = 0; i < MAX_GENS; i++) {
    if (t->gens[i] == gen) slot = i;
    if (t->gens[i] < 0 && empty < 0) empty = i;
  }
  if (slot < 0) slot = empty;
  if (slot < 0) return boolean(env, false);  // full: reads of that generation go through JavaScript
  if (t->held == 0) sodium_mprotect_readwrite(t->keys);
  /* SAFETY: keys is readable (held > 0 or just opened); slot < MAX_GENS */
  memcpy(t->keys + slot * KEY, key, KEY);
  if (t->gens[slot] < 0) t->held++;
  t->gens[slot] = gen;
  return boolean(env, true);
}

napi_value ZeroKeys(napi_env env, napi_callback_info info) {
  napi_value argv[1];
  Table *t = table_args(env, info, 1, argv);
  if (!t) return nullptr;
  std::lock_guard<std::mutex> g(t->mu);
  zero_keys_locked(t);
  return undefined(env);
}

napi_value Put(napi_env env, napi_callback_info info) {
  napi_value argv[5];
  uint32_t index, gen;
  int64_t at;
  uint8_t *blob;
  size_t len;
  Table *t = table_args(env, info, 5, argv);
  if (!t || !get_u32(env, argv[1], &index) || !get_u32(env, argv[2], &gen) || !get_i64(env, argv[3], &at) ||
      !get_bytes(env, argv[4], &blob, &len))
    return nullptr;
  if (at < 0 || len < CT_AT + TAG || len - CT_AT - TAG > t->chunk_size)
    return throw_type(env, "lethe_native: diskReadsPut: bad file offset or blob");
  Chunk c;
  c.gen = gen;
  c.at = uint64_t(at);
  c.len = uint32_t(len - CT_AT - TAG);
  memcpy(c.nonce, blob + 1, NONCE);
  size_t pieces = (c.len + PIECE - 1) / PIECE;
  c.digests.resize(pieces * DIGEST);
  for (size_t p = 0; p < pieces; p++) {
    size_t plen = std::min(PIECE, size_t(c.len) - p * PIECE);
    /* SAFETY: [CT_AT + p·PIECE, + plen) lies inside the blob's ciphertext (c.len bytes from CT_AT) */
    crypto_generichash(c.digests.data() + p * DIGEST, DIGEST, blob + CT_AT + p * PIECE, plen, t->digest_key, KEY);
  }
  std::lock_guard<std::mutex> g(t->mu);
  if (t->chunks.size() >= t->max_chunks && t->chunks.find(index) == t->chunks.end()) t->chunks.erase(t->chunks.begin());
  t->chunks[index] = std::move(c);
  return undefined(env);
}

napi_value Has(napi_env env, napi_callback_info info) {
  napi_value argv[3];
  uint32_t index, gen;
  Table *t = table_args(env, info, 3, argv);
  if (!t || !get_u32(env, argv[1], &index) || !get_u32(env, argv[2], &gen)) return nullptr;
  std::lock_guard<std::mutex> g(t->mu);
  auto it = t->chunks.find(index);
  return boolean(env, it != t->chunks.end() && it->second.gen == gen);
}

napi_value Forget(napi_env env, napi_callback_info info) {
  napi_value argv[2];
  uint32_t index;
  Table *t = table_args(env, info, 2, argv);
  if (!t || !get_u32(env, argv[1], &index)) return nullptr;
  std::lock_guard<std::mutex> g(t->mu);
  t->chunks.erase(index);
  return undefined(env);
}

napi_value ForgetAll(napi_env env, napi_callback_info info) {
  napi_value argv[1];
  Table *t = table_args(env, info, 1, argv);
  if (!t) return nullptr;
  std::lock_guard<std::mutex> g(t->mu);
  t->chunks.clear();
  return undefined(env);
}

napi_value Read(napi_env env, napi_callback_info info) {
  napi_value argv[3];
  int64_t offset;
  uint8_t *out;
  size_t len;
  Table *t = table_args(env, info, 3, argv);
  if (!t || !get_i64(env, argv[1], &offset) || !get_bytes(env, argv[2], &out, &len)) return nullptr;
  if (offset < 0) return throw_type(env, "lethe_native: diskReadsRead: a negative offset");
  return boolean(env, TableRead(t, t->js, uint64_t(offset), out, len));
}

napi_value Decrypt(napi_env env, napi_callback_info info) {
  napi_value argv[6];
  uint32_t index, gen;
  int64_t from;
  uint8_t *blob, *out;
  size_t blob_len, len;
  Table *t = table_args(env, info, 6, argv);
  if (!t || !get_u32(env, argv[1], &index) || !get_u32(env, argv[2], &gen) || !get_bytes(env, argv[3], &blob, &blob_len) ||
      !get_i64(env, argv[4], &from) || !get_bytes(env, argv[5], &out, &len))
    return nullptr;
  if (blob_len < CT_AT + TAG || from < 0 || size_t(from) + len > blob_len - CT_AT - TAG)
    return throw_type(env, "lethe_native: diskReadsDecrypt: the range is outside the blob");
  if (len == 0) return boolean(env, false);
  Scratch *s = t->js->scratch;
  {
    std::lock_guard<std::mutex> g(t->mu);
    int slot = slot_locked(t, gen);
    if (slot < 0) return boolean(env, false);
    derive_locked(t, slot, gen, index, s->key);
  }
  /* SAFETY: the blob's ciphertext is [CT_AT, blob_len − TAG), which holds [from, from + len) (checked above) */
  decrypt(s, blob + 1, blob + CT_AT, 0, blob_len - CT_AT - TAG, size_t(from), out, len);
  sodium_memzero(s->key, KEY);
  return boolean(env, true);
}

napi_value Stats(napi_env env, napi_callback_info info) {
  napi_value argv[1];
  Table *t = table_args(env, info, 1, argv);
  if (!t) return nullptr;
  std::lock_guard<std::mutex> g(t->mu);
  napi_value r, v;
  napi_create_object(env, &r);
  const std::pair<const char *, double> fields[] = {
      {"chunks", double(t->chunks.size())}, {"keys", double(t->held)}, {"reads", double(t->reads)},
      {"fallbacks", double(t->fallbacks)}, {"mismatches", double(t->mismatches)}};
  for (auto &f : fields) {
    napi_create_double(env, f.second, &v);
    napi_set_named_property(env, r, f.first, v);
  }
  return r;
}

napi_value Close(napi_env env, napi_callback_info info) {
  napi_value argv[1];
  if (!get_args(env, info, 1, argv)) return nullptr;
  void *p = nullptr;
  if (napi_get_value_external(env, argv[0], &p) != napi_ok || !p) return throw_type(env, "lethe_native: expected a disk-reads handle");
  destroy(static_cast<Table *>(p));  // the finalizer lets go of the handle's reference
  return undefined(env);
}

}  // namespace

Table *TableRef(napi_env env, napi_value handle) {
  Table *t = get_table(env, handle);
  if (t) t->refs++;
  return t;
}

void TableUnref(Table *t) {
  if (--t->refs == 0) delete t;
}

size_t TableMaxReply(const Table *t) {
  return t->reply_bytes - REPLY_HEADER_ROOM;
}

size_t TableCopyBytes(const Table *t) {
  return t->copy_bytes;
}

uint8_t *TableTakeReply(Table *t) {
  std::lock_guard<std::mutex> g(t->mu);
  if (t->replies.empty()) return nullptr;
  uint8_t *b = t->replies.back();
  t->replies.pop_back();
  return b;
}

void TableGiveReply(Table *t, uint8_t *buf) {
  std::lock_guard<std::mutex> g(t->mu);
  t->replies.push_back(buf);
}

Reader *ReaderNew(Table *t) {
  return new_reader(t->chunk_size);
}

void ReaderFree(Reader *r) {
  free_reader(r);
}

bool TableRead(Table *t, Reader *r, uint64_t offset, uint8_t *out, size_t len) {
  bool ok = len > 0;
  for (size_t done = 0; ok && done < len;) {
    uint64_t pos = offset + done;
    uint32_t index = uint32_t(pos / t->chunk_size);
    size_t within = pos % t->chunk_size;
    size_t n = std::min(size_t(t->chunk_size) - within, len - done);
    ok = read_part(t, r, index, within, out + done, n);
    done += n;
  }
  std::lock_guard<std::mutex> g(t->mu);
  if (ok) t->reads++;
  else t->fallbacks++;
  return ok;
}

void DefineDiskReads(napi_env env, napi_value exports) {
  const napi_property_descriptor props[] = {
      {"diskReadsOpen", nullptr, Open, nullptr, nullptr, nullptr, napi_enumerable, nullptr},
      {"diskReadsImage", nullptr, Image, nullptr, nullptr, nullptr, napi_enumerable, nullptr},
      {"diskReadsKey", nullptr, Key, nullptr, nullptr, nullptr, napi_enumerable, nullptr},
      {"diskReadsZeroKeys", nullptr, ZeroKeys, nullptr, nullptr, nullptr, napi_enumerable, nullptr},
      {"diskReadsPut", nullptr, Put, nullptr, nullptr, nullptr, napi_enumerable, nullptr},
      {"diskReadsHas", nullptr, Has, nullptr, nullptr, nullptr, napi_enumerable, nullptr},
      {"diskReadsForget", nullptr, Forget, nullptr, nullptr, nullptr, napi_enumerable, nullptr},
      {"diskReadsForgetAll", nullptr, ForgetAll, nullptr, nullptr, nullptr, napi_enumerable, nullptr},
      {"diskReadsRead", nullptr, Read, nullptr, nullptr, nullptr, napi_enumerable, nullptr},
      {"diskReadsDecrypt", nullptr, Decrypt, nullptr, nullptr, nullptr, napi_enumerable, nullptr},
      {"diskReadsStats", nullptr, Stats, nullptr, nullptr, nullptr, napi_enumerable, nullptr},
      {"diskReadsClose", nullptr, Close, nullptr, nullptr, nullptr, napi_enumerable, nullptr},
  };
  napi_define_properties(env, exports, sizeof props / sizeof props[0], props);
}

}  // namespace lethe
