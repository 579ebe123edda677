// A guest write's chunk, sealed and written off the event loop (docs/nbd.md, "Writes"):
//
//   sealWrite(fd, at, key, nonce, ad, plaintext, blob) → Promise<undefined>
//
// On a libuv pool thread: XChaCha20-Poly1305 (aead.h) of `plaintext` under `key` (the
// chunk key, copied into a reused locked buffer during the call and zeroed right after its use)
// with `nonce` and associated data `ad`, into blob[25…] (JavaScript has put the
// format byte and the nonce in blob[0…25)); then pwrite of the blob at `at` in
// `fd` (a cache slot). Resolves once the blob is written, or rejects as node:fs
// does (code, errno, syscall). JavaScript keeps everything else: which slot, the
// index row and the blob's seal id in it (common/chunk.ts: no SHA-256 of the whole
// blob, which was a fifth of a write's CPU), the keys, the policy.
//
// The plaintext and blob buffers stay referenced until the job is done; the caller
// must not touch them before the promise settles.
#include "seal-write.h"

#include "aead.h"

#include <sodium.h>
#include <unistd.h>

#include <mutex>
#include <vector>


#include "napi-helpers.h"

namespace lethe {
namespace {

using aead::KEY;
using aead::NONCE;
using aead::TAG;
constexpr size_t HEAD = 1 + NONCE;  // format byte, nonce
constexpr size_t MAX_AD = 256;

/** A job's locked key material: the chunk key and the cipher's own state. */
struct Secret {
  aead::State aead;
  uint8_t key[KEY];
};

/**
 * Locked buffers for the jobs' keys, reused: sodium_malloc (mmap, mlock and guard
 * pages) for each job was a quarter of the event loop's time in a stream of writes.
 * A buffer is zeroed before it goes back; there are as many as jobs ever ran at once.
 */
std::mutex key_mu;
std::vector<Secret *> key_free;

Secret *take_key() {
  {
    std::lock_guard<std::mutex> g(key_mu);
    if (!key_free.empty()) {
      Secret *k = key_free.back();
      key_free.pop_back();
      return k;
    }
  }
  return static_cast<Secret *>(sodium_malloc(sizeof(Secret)));
}

void give_key(Secret *k) {
  sodium_memzero(k, sizeof *k);
  std::lock_guard<std::mutex> g(key_mu);
  key_free.push_back(k);
}

struct Job {
  napi_async_work work = nullptr;
  napi_deferred deferred = nullptr;
  napi_ref plain_ref = nullptr, blob_ref = nullptr;
  int fd = -1;
  int64_t at = 0;
  Secret *secret = nullptr;  // from take_key; zeroed after its use in Execute, given back in Complete
  uint8_t nonce[NONCE];
  uint8_t ad[MAX_AD];
  size_t ad_len = 0;
  const uint8_t *plain = nullptr;
  size_t plain_len = 0;
  uint8_t *blob = nullptr;
  int err = 0;
  const char *syscall = nullptr;
};

void Execute(napi_env, void *data) {
  Job *j = static_cast<Job *>(data);
  size_t blob_len = HEAD + j->plain_len + TAG;
  /* SAFETY: blob holds blob_len bytes and plain plain_len (checked in SealWrite); both stay referenced until Complete */
  aead::SealDetached(&j->secret->aead, j->blob + HEAD, j->blob + HEAD + j->plain_len, j->plain, j->plain_len, j->ad, j->ad_len, j->nonce,
                     j->secret->key);
  // The key's last use: zeroed now, not when the main thread gets to Complete.
  sodium_memzero(j->secret->key, KEY);
  for (size_t done = 0; done < blob_len;) {
    ssize_t n = pwrite(j->fd, j->blob + done, blob_len - done, off_t(j->at + int64_t(done)));
    if (n < 0 && errno == EINTR) continue;
    if (n <= 0) {
      j->err = n < 0 ? errno : EIO;
      j->syscall = "pwrite";
      return;
    }
    done += size_t(n);
  }
}

void Complete(napi_env env, napi_status status, void *data) {
  Job *j = static_cast<Job *>(data);
  // Back for the next job, zeroed again here: a cancelled job never ran Execute.
  give_key(j->secret);
  if (status != napi_ok && j->err == 0) {
    j->err = ECANCELED;
    j->syscall = "sealWrite";
  }
  if (j->err != 0) {
    napi_reject_deferred(env, j->deferred, make_errno_error(env, j->syscall, j->err));
  } else {
    napi_value done;
    napi_get_undefined(env, &done);
    napi_resolve_deferred(env, j->deferred, done);
  }
  napi_delete_reference(env, j->plain_ref);
  napi_delete_reference(env, j->blob_ref);
  napi_delete_async_work(env, j->work);
  delete j;
}

napi_value SealWrite(napi_env env, napi_callback_info info) {
  napi_value argv[7];
  int32_t fd;
  int64_t at;
  uint8_t *key, *nonce, *ad, *plain, *blob;
  size_t key_len, nonce_len, ad_len, plain_len, blob_len;
  if (!get_args(env, info, 7, argv) || !get_i32(env, argv[0], &fd) || !get_i64(env, argv[1], &at) || !get_bytes(env, argv[2], &key, &key_len) ||
      !get_bytes(env, argv[3], &nonce, &nonce_len) || !get_bytes(env, argv[4], &ad, &ad_len) || !get_bytes(env, argv[5], &plain, &plain_len) ||
      !get_bytes(env, argv[6], &blob, &blob_len))
    return nullptr;
  if (fd < 0 || at < 0 || key_len != KEY || nonce_len != NONCE || ad_len > MAX_AD || blob_len != HEAD + plain_len + TAG)
    return throw_type(env, "lethe_native: sealWrite: bad fd, offset, key, nonce, associated data or blob length");
  if (sodium_init() < 0) return throw_errno(env, "sodium_init", EIO);
  Job *j = new Job();
  j->secret = take_key();
  if (!j->secret) {
    delete j;
    return throw_errno(env, "sodium_malloc", ENOMEM);
  }
  memcpy(j->secret->key, key, KEY);
  memcpy(j->nonce, nonce, NONCE);
  memcpy(j->ad, ad, ad_len);
  j->ad_len = ad_len;
  j->fd = fd;
  j->at = at;
  j->plain = plain;
  j->plain_len = plain_len;
  j->blob = blob;
  napi_value promise, name;
  napi_create_promise(env, &j->deferred, &promise);
  napi_create_reference(env, argv[5], 1, &j->plain_ref);
  napi_create_reference(env, argv[6], 1, &j->blob_ref);
  napi_create_string_utf8(env, "lethe.sealWrite", NAPI_AUTO_LENGTH, &name);
  napi_create_async_work(env, nullptr, name, Execute, Complete, j, &j->work);
  napi_queue_async_work(env, j->work);
  return promise;
}

// ---- the cipher alone, for its tests and bench/aead.ts ----

napi_value AeadBackend(napi_env env, napi_callback_info) {
  napi_value r;
  napi_create_string_utf8(env, aead::Backend(), NAPI_AUTO_LENGTH, &r);
  return r;
}

/**
 * aeadCipher(op, key, nonce, ad, ic, input) → Buffer | null, on the code sealWrite and
 * the disk's reads use: op 0 seals input into ciphertext ‖ tag; 1 opens ciphertext ‖ tag
 * (null when the tag does not match); 2 is the XChaCha20 stream from block ic (ad unused);
 * 3 checks ciphertext ‖ tag without opening it (an empty buffer, or null); 4 is the tag
 * of each 4 KiB piece of input, its first piece's key from block ic (aead::PieceTags).
 */
napi_value AeadCipher(napi_env env, napi_callback_info info) {
  napi_value argv[6];
  int32_t op;
  int64_t ic;
  uint8_t *key, *nonce, *ad, *in;
  size_t key_len, nonce_len, ad_len, in_len;
  if (!get_args(env, info, 6, argv) || !get_i32(env, argv[0], &op) || !get_bytes(env, argv[1], &key, &key_len) ||
      !get_bytes(env, argv[2], &nonce, &nonce_len) || !get_bytes(env, argv[3], &ad, &ad_len) || !get_i64(env, argv[4], &ic) ||
      !get_bytes(env, argv[5], &in, &in_len))
    return nullptr;
  if (op < 0 || op > 4 || key_len != KEY || nonce_len != NONCE || ic < 0 || ((op == 1 || op == 3) && in_len < TAG))
    return throw_type(env, "lethe_native: aeadCipher: bad operation, key, nonce, block or input length");
  if (sodium_init() < 0) return throw_errno(env, "sodium_init", EIO);
  Secret *k = take_key();
  if (!k) return throw_errno(env, "sodium_malloc", ENOMEM);
  constexpr size_t PIECE = 4096;
  size_t out_len = op == 0 ? in_len + TAG : op == 1 ? in_len - TAG : op == 2 ? in_len : op == 4 ? (in_len + PIECE - 1) / PIECE * TAG : 0;
  void *p = nullptr;
  napi_value out;
  napi_create_buffer(env, out_len, &p, &out);
  uint8_t *o = static_cast<uint8_t *>(p);
  int ok = 0;
  memcpy(k->key, key, KEY);
  /* SAFETY: o holds out_len bytes, and in in_len, as the op needs (checked above) */
  if (op == 0) aead::SealDetached(&k->aead, o, o + in_len, in, in_len, ad, ad_len, nonce, k->key);
  if (op == 1) ok = aead::OpenDetached(&k->aead, o, in, out_len, in + out_len, ad, ad_len, nonce, k->key);
  if (op == 2) aead::StreamXorIc(&k->aead, o, in, in_len, nonce, uint64_t(ic), k->key);
  if (op == 3) ok = aead::VerifyDetached(&k->aead, in, in_len - TAG, in + in_len - TAG, ad, ad_len, nonce, k->key);
  if (op == 4) aead::PieceTags(&k->aead, o, in, in_len, PIECE, uint64_t(ic), nonce, k->key);
  give_key(k);
  if (ok != 0) napi_get_null(env, &out);
  return out;
}

}  // namespace

void DefineSealWrite(napi_env env, napi_value exports) {
  const napi_property_descriptor props[] = {
      {"sealWrite", nullptr, SealWrite, nullptr, nullptr, nullptr, napi_enumerable, nullptr},
      {"aeadBackend", nullptr, AeadBackend, nullptr, nullptr, nullptr, napi_enumerable, nullptr},
      {"aeadCipher", nullptr, AeadCipher, nullptr, nullptr, nullptr, napi_enumerable, nullptr},
  };
  napi_define_properties(env, exports, sizeof props / sizeof props[0], props);
}

}  // namespace lethe
