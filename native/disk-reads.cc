// The N-API bindings of the disk's warm-read table (disk-table.cc says what it holds
// and how it reads): reads of normal-class disk chunks whose tag the agent checked,
// served from the cache's slot file in native code (docs/nbd.md, "Reads in native
// code"). It only ever refuses, never serves bytes JavaScript would not.
//
//   diskReadsOpen(fd, pieceKey, keyLabel, adLabel, kind, cls, chunkSize, maxChunks,
//                 replyBuffers, replyMax, copyBytes, writeBuffers) → handle
//                                        (the last four: the proxies' locked buffers; write
//                                        buffers hold replyMax bytes)
//   diskReadsImage(h, imageId)           a new manifest: every chunk forgotten
//   diskReadsKey(h, gen, key)            a class key (copied into locked memory)
//   diskReadsZeroKeys(h)                 every class key zeroed (the lease ended)
//   diskReadsPut(h, index, gen, at, blob) a checked blob, lying at file offset `at`
//   diskReadsHas(h, index, gen), diskReadsForget(h, index), diskReadsForgetAll(h)
//   diskReadsRead(h, offset, out, admit) → bool plaintext of disk bytes [offset, offset + out.length)
//                                        (admit: placed chunks admitted first, as the read proxy does)
//   diskReadsDecrypt(h, index, gen, blob, from, out) → bool  bytes of a checked blob JavaScript
//                                        keeps in memory, under the table's class key
//   diskReadsAdmit(h, index, gen, at, blobLen, within, out) → Promise<bool>  on a pool thread:
//                                        the blob lying at `at` read, its tag checked under the
//                                        table's class key and the chunk put in (a chunk's first
//                                        read, off the event loop); plaintext [within, + out.length)
//                                        into out too
//   diskReadsLies(h, index, gen, at, blobLen) → bool  where the blob of a chunk not in the table
//                                        lies: the NBD read proxy admits it at its first read, on
//                                        its own thread (false: the table knows 4 × maxChunks already)
//   diskReadsWriteBuffers(h) → Buffer[]  views of the write buffers the proxies lend (nbd-proxy.cc
//                                        takes them back); each keeps the table's memory alive
//   diskReadsStats(h), diskReadsClose(h)
//
// The table and its read, with no N-API in them, are disk-table.cc.
#include "disk-reads.h"

#include <string.h>
#include <unistd.h>

#include <algorithm>

#include "disk-table.h"
#include "napi-helpers.h"

namespace lethe {
namespace {

void Finalize(napi_env, void *data, void *) {
  Table *t = static_cast<Table *>(data);
  TableDestroy(t);
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

/** `n` zeroed locked buffers of `bytes` onto `into`; false when one cannot be had (those made stay there, freed with the table). */
bool locked_buffers(std::vector<uint8_t *> &into, uint32_t n, size_t bytes) {
  for (uint32_t i = 0; i < n; i++) {
    uint8_t *b = static_cast<uint8_t *>(sodium_malloc(bytes));
    if (!b) return false;
    sodium_memzero(b, bytes);
    into.push_back(b);
  }
  return true;
}

napi_value Open(napi_env env, napi_callback_info info) {
  napi_value argv[12];
  int32_t fd, kind, cls;
  uint8_t *dkey, *label, *ad_label;
  size_t dkey_len, label_len, ad_label_len;
  uint32_t chunk_size, max_chunks, reply_buffers, reply_max, copy_bytes, write_buffers;
  if (!get_args(env, info, 12, argv) || !get_i32(env, argv[0], &fd) || !get_bytes(env, argv[1], &dkey, &dkey_len) ||
      !get_bytes(env, argv[2], &label, &label_len) || !get_bytes(env, argv[3], &ad_label, &ad_label_len) ||
      !get_i32(env, argv[4], &kind) || !get_i32(env, argv[5], &cls) || !get_u32(env, argv[6], &chunk_size) ||
      !get_u32(env, argv[7], &max_chunks) || !get_u32(env, argv[8], &reply_buffers) || !get_u32(env, argv[9], &reply_max) ||
      !get_u32(env, argv[10], &copy_bytes) || !get_u32(env, argv[11], &write_buffers))
    return nullptr;
  if (dkey_len != KEY || label_len > MAX_LABEL || ad_label_len > MAX_LABEL || chunk_size == 0 || chunk_size % PIECE != 0 ||
      kind < 0 || kind > 255 || cls < 0 || cls > 255 || reply_buffers > 64 || reply_max > (1u << 24) || copy_bytes == 0 || copy_bytes > (1u << 20) ||
      write_buffers > 64 || (write_buffers > 0 && reply_max == 0))
    return throw_type(env, "lethe_native: diskReadsOpen: bad key, label, chunk size or buffer sizes");
  if (sodium_init() < 0) return throw_errno(env, "sodium_init", EIO);
  Table *t = new Table();
  t->fd = dup(fd);
  if (t->fd < 0) {
    int err = errno;
    delete t;
    return throw_errno(env, "dup", err);
  }
  memcpy(t->label, label, label_len);
  t->label_len = label_len;
  memcpy(t->ad_label, ad_label, ad_label_len);
  t->ad_label_len = ad_label_len;
  t->kind = uint8_t(kind);
  t->cls = uint8_t(cls);
  t->chunk_size = chunk_size;
  t->max_chunks = max_chunks;
  t->max_lies = size_t(max_chunks) * 4;
  t->keys = static_cast<uint8_t *>(sodium_malloc(MAX_GENS * KEY));
  t->piece_key = static_cast<uint8_t *>(sodium_malloc(KEY));
  t->js = ReaderNew(chunk_size);
  t->reply_bytes = REPLY_HEADER_ROOM + reply_max;
  t->copy_bytes = copy_bytes;
  t->write_bytes = reply_max;
  bool pooled = locked_buffers(t->reply_all, reply_buffers, t->reply_bytes) && locked_buffers(t->write_all, write_buffers, t->write_bytes);
  t->replies = t->reply_all;
  t->write_state.assign(t->write_all.size(), WRITE_FREE);
  t->write_len.assign(t->write_all.size(), 0);
  if (!t->keys || !t->piece_key || !t->js || !pooled) {
    TableDestroy(t);
    delete t;
    return throw_errno(env, "sodium_malloc", ENOMEM);
  }
  sodium_memzero(t->keys, MAX_GENS * KEY);
  sodium_mprotect_noaccess(t->keys);
  memcpy(t->piece_key, dkey, KEY);
  sodium_mprotect_readonly(t->piece_key);
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
  TableForgetAllLocked(t);
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
  TableZeroKeysLocked(t);
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
  /* SAFETY: the blob's ciphertext is c.len bytes from CT_AT (checked above) */
  TablePieceTags(t, t->js->scratch, c.nonce, blob + CT_AT, c.len, c.tags);
  std::lock_guard<std::mutex> g(t->mu);
  TablePutLocked(t, index, std::move(c));
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
  TableForgetLocked(t, index);
  return undefined(env);
}

napi_value ForgetAll(napi_env env, napi_callback_info info) {
  napi_value argv[1];
  Table *t = table_args(env, info, 1, argv);
  if (!t) return nullptr;
  std::lock_guard<std::mutex> g(t->mu);
  TableForgetAllLocked(t);
  return undefined(env);
}

napi_value Read(napi_env env, napi_callback_info info) {
  napi_value argv[4];
  int64_t offset;
  uint8_t *out;
  size_t len;
  bool admit;
  Table *t = table_args(env, info, 4, argv);
  if (!t || !get_i64(env, argv[1], &offset) || !get_bytes(env, argv[2], &out, &len) || napi_get_value_bool(env, argv[3], &admit) != napi_ok)
    return nullptr;
  if (offset < 0) return throw_type(env, "lethe_native: diskReadsRead: a negative offset");
  return boolean(env, TableRead(t, t->js, uint64_t(offset), out, len, admit));
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
    int slot = TableSlotLocked(t, gen);
    if (slot < 0) return boolean(env, false);
    TableDeriveLocked(t, slot, gen, index, s->key);
  }
  /* SAFETY: the blob's ciphertext is [CT_AT, blob_len − TAG), which holds [from, from + len) (checked above) */
  ChunkDecrypt(s, blob + 1, blob + CT_AT, 0, blob_len - CT_AT - TAG, size_t(from), out, len);
  sodium_memzero(s->key, KEY);
  return boolean(env, true);
}

napi_value Lies(napi_env env, napi_callback_info info) {
  napi_value argv[5];
  uint32_t index, gen, blob_len;
  int64_t at;
  Table *t = table_args(env, info, 5, argv);
  if (!t || !get_u32(env, argv[1], &index) || !get_u32(env, argv[2], &gen) || !get_i64(env, argv[3], &at) || !get_u32(env, argv[4], &blob_len))
    return nullptr;
  if (at < 0 || blob_len < CT_AT + TAG || blob_len - CT_AT - TAG > t->chunk_size)
    return throw_type(env, "lethe_native: diskReadsLies: bad file offset or blob length");
  std::lock_guard<std::mutex> g(t->mu);
  if (t->chunks.find(index) != t->chunks.end()) return boolean(env, true);  // in the table already
  return boolean(env, TableLiesLocked(t, index, gen, uint64_t(at), blob_len));
}

/** An admission (TableAdmit) on a libuv pool thread; the table and `out` stay referenced until it is done. */
struct AdmitJob {
  napi_async_work work = nullptr;
  napi_deferred deferred = nullptr;
  napi_ref out_ref = nullptr;
  Table *t = nullptr;
  Reader *r = nullptr;
  uint32_t index = 0, gen = 0;
  uint64_t at = 0;
  size_t blob_len = 0, within = 0, n = 0;
  uint64_t begun = 0;  // TableAdmitBegin's
  uint8_t *out = nullptr;
  bool ran = false, ok = false;
};

void AdmitExecute(napi_env, void *data) {
  AdmitJob *j = static_cast<AdmitJob *>(data);
  // Taken here, not at the call: a burst of queued first reads holds no more readers than the pool has threads.
  j->r = TableTakeReader(j->t);
  if (!j->r) return;  // no locked memory: the read goes the JavaScript way
  /* SAFETY: out holds n bytes of a buffer referenced until AdmitComplete; the table is referenced too */
  j->ok = TableAdmit(j->t, j->r, j->index, j->gen, j->at, j->blob_len, j->within, j->out, j->n, j->begun);
  j->ran = true;
}

/** Lets go of what a job holds: its admission if it never ran, its reader, the table, `out`. */
void admit_release(napi_env env, AdmitJob *j) {
  if (!j->ran) TableAdmitCancel(j->t, j->index);
  if (j->r) TableGiveReader(j->t, j->r);
  TableUnref(j->t);
  if (j->out_ref) napi_delete_reference(env, j->out_ref);
  if (j->work) napi_delete_async_work(env, j->work);
  delete j;
}

void AdmitComplete(napi_env env, napi_status status, void *data) {
  AdmitJob *j = static_cast<AdmitJob *>(data);
  napi_resolve_deferred(env, j->deferred, boolean(env, status == napi_ok && j->ok));
  admit_release(env, j);
}

napi_value Admit(napi_env env, napi_callback_info info) {
  napi_value argv[7];
  uint32_t index, gen, blob_len, within;
  int64_t at;
  uint8_t *out;
  size_t n;
  Table *t = table_args(env, info, 7, argv);
  if (!t || !get_u32(env, argv[1], &index) || !get_u32(env, argv[2], &gen) || !get_i64(env, argv[3], &at) || !get_u32(env, argv[4], &blob_len) ||
      !get_u32(env, argv[5], &within) || !get_bytes(env, argv[6], &out, &n))
    return nullptr;
  if (at < 0 || blob_len < CT_AT + TAG || blob_len - CT_AT - TAG > t->chunk_size || size_t(within) + n > blob_len - CT_AT - TAG)
    return throw_type(env, "lethe_native: diskReadsAdmit: bad file offset, blob length or range");
  AdmitJob *j = new AdmitJob();
  t->refs++;
  j->t = t;
  j->index = index;
  j->gen = gen;
  j->at = uint64_t(at);
  j->blob_len = blob_len;
  j->within = within;
  j->out = out;
  j->n = n;
  // From here on a forget of the chunk (a write, a slot given up) spoils this admission: JavaScript found `at` just now.
  j->begun = TableAdmitBegin(t, index);
  napi_value promise, name;
  if (napi_create_promise(env, &j->deferred, &promise) != napi_ok) {
    admit_release(env, j);
    return throw_errno(env, "napi_create_promise", ENOMEM);
  }
  if ((n > 0 && napi_create_reference(env, argv[6], 1, &j->out_ref) != napi_ok) ||
      napi_create_string_utf8(env, "lethe.diskReadsAdmit", NAPI_AUTO_LENGTH, &name) != napi_ok ||
      napi_create_async_work(env, nullptr, name, AdmitExecute, AdmitComplete, j, &j->work) != napi_ok || napi_queue_async_work(env, j->work) != napi_ok) {
    napi_resolve_deferred(env, j->deferred, boolean(env, false));  // not admitted: the read goes the JavaScript way
    admit_release(env, j);
  }
  return promise;
}

napi_value Stats(napi_env env, napi_callback_info info) {
  napi_value argv[1];
  Table *t = table_args(env, info, 1, argv);
  if (!t) return nullptr;
  size_t out = 0;
  {
    std::lock_guard<std::mutex> g(t->write_mu);
    for (uint8_t state : t->write_state) out += state != WRITE_FREE;
  }
  std::lock_guard<std::mutex> g(t->mu);
  return numbers(env, {{"chunks", double(t->chunks.size())}, {"keys", double(t->held)}, {"reads", double(t->reads)},
                       {"fallbacks", double(t->fallbacks)}, {"mismatches", double(t->mismatches)}, {"admits", double(t->admits)}, {"refused", double(t->refused)}, {"placed", double(t->lies.size())},
                       {"writesOut", double(out)}});
}

napi_value Close(napi_env env, napi_callback_info info) {
  napi_value argv[1];
  if (!get_args(env, info, 1, argv)) return nullptr;
  void *p = nullptr;
  if (napi_get_value_external(env, argv[0], &p) != napi_ok || !p) return throw_type(env, "lethe_native: expected a disk-reads handle");
  TableDestroy(static_cast<Table *>(p));  // the finalizer lets go of the handle's reference
  return undefined(env);
}

void WriteBufferGone(napi_env, void *, void *hint) {
  TableUnref(static_cast<Table *>(hint));
}

napi_value WriteBuffers(napi_env env, napi_callback_info info) {
  napi_value argv[1];
  Table *t = table_args(env, info, 1, argv);
  if (!t) return nullptr;
  napi_value list;
  napi_create_array_with_length(env, t->write_all.size(), &list);
  for (size_t i = 0; i < t->write_all.size(); i++) {
    napi_value b;
    // SAFETY: the view holds a reference to the table, which frees write_all[i] only when the last one goes
    t->refs++;
    if (napi_create_external_buffer(env, t->write_bytes, t->write_all[i], WriteBufferGone, t, &b) != napi_ok) {
      TableUnref(t);
      return throw_errno(env, "napi_create_external_buffer", ENOMEM);
    }
    napi_set_element(env, list, uint32_t(i), b);
  }
  return list;
}

}  // namespace

Table *TableRef(napi_env env, napi_value handle) {
  Table *t = get_table(env, handle);
  if (t) t->refs++;
  return t;
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
      {"diskReadsAdmit", nullptr, Admit, nullptr, nullptr, nullptr, napi_enumerable, nullptr},
      {"diskReadsLies", nullptr, Lies, nullptr, nullptr, nullptr, napi_enumerable, nullptr},
      {"diskReadsWriteBuffers", nullptr, WriteBuffers, nullptr, nullptr, nullptr, napi_enumerable, nullptr},
      {"diskReadsStats", nullptr, Stats, nullptr, nullptr, nullptr, napi_enumerable, nullptr},
      {"diskReadsClose", nullptr, Close, nullptr, nullptr, nullptr, napi_enumerable, nullptr},
  };
  napi_define_properties(env, exports, sizeof props / sizeof props[0], props);
}

}  // namespace lethe
