// The chunk AEAD in native code (aead.h). The format is libsodium's, byte for byte:
// HChaCha20(key, nonce[0..16)) gives a subkey; the IETF ChaCha20 under it with the
// 12-byte nonce 0⁴ ‖ nonce[16..24) encrypts from block 1 on; block 0's first 32 bytes
// key a Poly1305 over ad ‖ pad16 ‖ c ‖ pad16 ‖ le64(|ad|) ‖ le64(|c|).
//
// Why not libsodium alone: its ChaCha20 (AVX2) and Poly1305 (SSE2) do 1.6 GB/s on a
// core here, and a warm disk read or a guest write spends most of its CPU there.
// The OpenSSL that Node carries has AVX-512 code for both (3.8 GB/s) and exports
// ChaCha20_ctr32 and Poly1305_* to addons. Those take their key from the caller's
// memory and keep their state where the caller says: both live in the caller's
// locked scratch (State), so no key byte goes to unlocked heap, as with libsodium.
// The EVP interface is not used because its context copies the key onto the heap.
//
// These are OpenSSL's internal calls (include/crypto/chacha.h and poly1305.h in 3.0),
// not its public API, so they are looked up with dlsym rather than linked, and used
// only when a self-test against libsodium on first use agrees byte for byte and leaves
// the State zeroed. Anything else (another Node, a program without them,
// LETHE_AEAD=libsodium) runs libsodium.
#include "aead.h"

#include <dlfcn.h>
#include <sodium.h>
#include <stdlib.h>
#include <string.h>

#include <algorithm>
#include <mutex>

namespace lethe {
namespace aead {

static_assert(KEY == crypto_aead_xchacha20poly1305_ietf_KEYBYTES && NONCE == crypto_aead_xchacha20poly1305_ietf_NPUBBYTES &&
              TAG == crypto_aead_xchacha20poly1305_ietf_ABYTES, "the chunk format's sizes are libsodium's");

namespace {

using ChaChaFn = void (*)(unsigned char *out, const unsigned char *in, size_t len, const unsigned int key[8], const unsigned int counter[4]);
using CtxSizeFn = size_t (*)();
using PolyInitFn = void (*)(void *ctx, const unsigned char key[32]);
using PolyUpdateFn = void (*)(void *ctx, const unsigned char *in, size_t len);
using PolyFinalFn = void (*)(void *ctx, unsigned char mac[16]);

struct OpenSsl {
  ChaChaFn chacha = nullptr;
  PolyInitFn init = nullptr;
  PolyUpdateFn update = nullptr;
  PolyFinalFn final = nullptr;
};

std::once_flag chosen;
OpenSsl ossl;       // all set when the OpenSSL code is in use
bool fast = false;  // set once, under `chosen`, before any call reads it

uint32_t le32(const uint8_t *p) {
  return uint32_t(p[0]) | uint32_t(p[1]) << 8 | uint32_t(p[2]) << 16 | uint32_t(p[3]) << 24;
}

/**
 * Overwrites the stack below the caller's frame: OpenSSL's assembly keeps keystream
 * state in its own frames and does not clear them (libsodium's C does).
 */
__attribute__((noinline)) void burn_stack() {
  uint8_t pad[8192];
  sodium_memzero(pad, sizeof pad);
  __asm__ __volatile__("" : : "r"(pad) : "memory");
}

/** The subkey into s->subkey and the IETF counter words (block `ic`) for nonce. */
void setup(State *s, const uint8_t *nonce, const uint8_t *key, uint32_t ic, unsigned int ctr[4]) {
  /* SAFETY: subkey is 32 bytes of the caller's locked State; x86-64 is little-endian, so its bytes are OpenSSL's host-order words */
  crypto_core_hchacha20(reinterpret_cast<uint8_t *>(s->subkey), nonce, key, nullptr);
  ctr[0] = ic;
  ctr[1] = 0;
  ctr[2] = le32(nonce + 16);
  ctr[3] = le32(nonce + 20);
}

void pad16(State *s, size_t len) {
  static const uint8_t zeros[16] = {};
  if (len % 16 != 0) ossl.update(s->poly, zeros, 16 - len % 16);
}

/** Poly1305 (keyed from block 0) over ad ‖ c, into mac; leaves s->subkey set. */
void mac(State *s, uint8_t *mac_out, const uint8_t *c, size_t len, const uint8_t *ad, size_t ad_len, unsigned int ctr[4]) {
  memset(s->block, 0, sizeof s->block);
  ctr[0] = 0;
  ossl.chacha(s->block, s->block, sizeof s->block, s->subkey, ctr);
  ossl.init(s->poly, s->block);
  if (ad_len > 0) ossl.update(s->poly, ad, ad_len);
  pad16(s, ad_len);
  if (len > 0) ossl.update(s->poly, c, len);
  pad16(s, len);
  uint8_t lens[16];
  for (int b = 0; b < 8; b++) {
    lens[b] = uint8_t(uint64_t(ad_len) >> (8 * b));
    lens[8 + b] = uint8_t(uint64_t(len) >> (8 * b));
  }
  ossl.update(s->poly, lens, sizeof lens);
  ossl.final(s->poly, mac_out);
}

void done(State *s) {
  sodium_memzero(s, sizeof *s);
  burn_stack();
}

// ---- OpenSSL's code ----

void seal_fast(State *s, uint8_t *c, uint8_t *tag, const uint8_t *m, size_t len, const uint8_t *ad, size_t ad_len, const uint8_t *nonce, const uint8_t *key) {
  unsigned int ctr[4];
  setup(s, nonce, key, 1, ctr);
  /* SAFETY: c and m hold len bytes (the caller's); OpenSSL's ChaCha20 works in place */
  ossl.chacha(c, m, len, s->subkey, ctr);
  mac(s, tag, c, len, ad, ad_len, ctr);
  done(s);
}

/** Whether `tag` is the Poly1305 tag of ad ‖ c; leaves s->subkey set and ctr at the nonce's words. */
bool tag_matches(State *s, const uint8_t *c, size_t len, const uint8_t *tag, const uint8_t *ad, size_t ad_len, const uint8_t *nonce, const uint8_t *key,
                 unsigned int ctr[4]) {
  setup(s, nonce, key, 0, ctr);
  uint8_t want[TAG];
  mac(s, want, c, len, ad, ad_len, ctr);
  bool ok = crypto_verify_16(want, tag) == 0;
  sodium_memzero(want, sizeof want);
  return ok;
}

int open_fast(State *s, uint8_t *m, const uint8_t *c, size_t len, const uint8_t *tag, const uint8_t *ad, size_t ad_len, const uint8_t *nonce, const uint8_t *key) {
  unsigned int ctr[4];
  bool ok = tag_matches(s, c, len, tag, ad, ad_len, nonce, key, ctr);
  if (ok) {
    ctr[0] = 1;
    /* SAFETY: m and c hold len bytes (the caller's); the tag was checked over c before any byte of m is written */
    ossl.chacha(m, c, len, s->subkey, ctr);
  }
  done(s);
  return ok ? 0 : -1;
}

int verify_fast(State *s, const uint8_t *c, size_t len, const uint8_t *tag, const uint8_t *ad, size_t ad_len, const uint8_t *nonce, const uint8_t *key) {
  unsigned int ctr[4];
  bool ok = tag_matches(s, c, len, tag, ad, ad_len, nonce, key, ctr);
  done(s);
  return ok ? 0 : -1;
}

void xor_fast(State *s, uint8_t *out, const uint8_t *in, size_t len, const uint8_t *nonce, uint64_t ic, const uint8_t *key) {
  unsigned int ctr[4];
  setup(s, nonce, key, uint32_t(ic), ctr);
  /* SAFETY: out and in hold len bytes (the caller's) */
  ossl.chacha(out, in, len, s->subkey, ctr);
  done(s);
}

void pieces_fast(State *s, uint8_t *tags, const uint8_t *c, size_t len, size_t piece, uint64_t first, const uint8_t *nonce, const uint8_t *key) {
  unsigned int ctr[4];
  setup(s, nonce, key, uint32_t(first), ctr);
  for (size_t i = 0; i * piece < len; i++) {
    memset(s->block, 0, sizeof s->block);
    ctr[0] = uint32_t(first + i);
    ossl.chacha(s->block, s->block, sizeof s->block, s->subkey, ctr);
    ossl.init(s->poly, s->block);
    /* SAFETY: piece i is [i·piece, min(len, (i + 1)·piece)) of c's len bytes; tags holds a TAG per piece (the caller's) */
    ossl.update(s->poly, c + i * piece, std::min(piece, len - i * piece));
    ossl.final(s->poly, tags + i * TAG);
  }
  done(s);
}

/** True when blocks ic … of len bytes stay below 2^32: past it libsodium's 64-bit counter carries where the IETF one (OpenSSL's) wraps. */
bool within_counter(uint64_t ic, size_t len) {
  return ic + (uint64_t(len) + 63) / 64 <= 0x100000000ull;
}

// ---- libsodium, the reference and the fallback ----

void seal_sodium(uint8_t *c, uint8_t *tag, const uint8_t *m, size_t len, const uint8_t *ad, size_t ad_len, const uint8_t *nonce, const uint8_t *key) {
  crypto_aead_xchacha20poly1305_ietf_encrypt_detached(c, tag, nullptr, m, len, ad, ad_len, nullptr, nonce, key);
}

/**
 * The tag alone, as libsodium's decrypt computes it: the Poly1305 key is block 0 of the
 * IETF ChaCha20 under the HChaCha20 subkey; its state lives in the caller's locked State.
 */
int verify_sodium(State *s, const uint8_t *c, size_t len, const uint8_t *tag, const uint8_t *ad, size_t ad_len, const uint8_t *nonce, const uint8_t *key) {
  static_assert(sizeof(crypto_onetimeauth_poly1305_state) <= POLY_BYTES, "libsodium's Poly1305 state fits the State's room");
  auto *poly = reinterpret_cast<crypto_onetimeauth_poly1305_state *>(s->poly);
  uint8_t *subkey = reinterpret_cast<uint8_t *>(s->subkey);
  crypto_core_hchacha20(subkey, nonce, key, nullptr);
  uint8_t n12[12] = {};
  memcpy(n12 + 4, nonce + 16, 8);
  crypto_stream_chacha20_ietf(s->block, sizeof s->block, n12, subkey);
  crypto_onetimeauth_poly1305_init(poly, s->block);
  static const uint8_t zeros[16] = {};
  crypto_onetimeauth_poly1305_update(poly, ad, ad_len);
  crypto_onetimeauth_poly1305_update(poly, zeros, (16 - ad_len % 16) % 16);
  crypto_onetimeauth_poly1305_update(poly, c, len);
  crypto_onetimeauth_poly1305_update(poly, zeros, (16 - len % 16) % 16);
  uint8_t lens[16];
  for (int b = 0; b < 8; b++) {
    lens[b] = uint8_t(uint64_t(ad_len) >> (8 * b));
    lens[8 + b] = uint8_t(uint64_t(len) >> (8 * b));
  }
  crypto_onetimeauth_poly1305_update(poly, lens, sizeof lens);
  uint8_t want[TAG];
  crypto_onetimeauth_poly1305_final(poly, want);
  int ok = crypto_verify_16(want, tag);
  sodium_memzero(want, sizeof want);
  sodium_memzero(s, sizeof *s);
  return ok == 0 ? 0 : -1;
}

void pieces_sodium(State *s, uint8_t *tags, const uint8_t *c, size_t len, size_t piece, uint64_t first, const uint8_t *nonce, const uint8_t *key) {
  for (size_t i = 0; i * piece < len; i++) {
    memset(s->block, 0, sizeof s->block);
    crypto_stream_xchacha20_xor_ic(s->block, s->block, sizeof s->block, nonce, first + i, key);
    crypto_onetimeauth_poly1305(tags + i * TAG, c + i * piece, std::min(piece, len - i * piece), s->block);
  }
  sodium_memzero(s, sizeof *s);
}

// ---- the self-test ----

/** One case: the OpenSSL code against libsodium on `len` random bytes; true when every output agrees. */
bool agrees(State *s, size_t len, size_t ad_len, uint64_t ic) {
  size_t room = len + 1 + TAG * (len / 1000 + 1);  // room for the piece tags too
  uint8_t *buf = static_cast<uint8_t *>(malloc(room * 4 + ad_len + 1));
  if (!buf) return false;
  uint8_t *m = buf, *c1 = m + room, *c2 = c1 + room, *back = c2 + room, *ad = back + room;
  uint8_t key[KEY], nonce[NONCE], tag1[TAG], tag2[TAG];
  randombytes_buf(m, len);
  randombytes_buf(ad, ad_len);
  randombytes_buf(key, sizeof key);
  randombytes_buf(nonce, sizeof nonce);
  seal_sodium(c1, tag1, m, len, ad, ad_len, nonce, key);
  seal_fast(s, c2, tag2, m, len, ad, ad_len, nonce, key);
  bool ok = memcmp(c1, c2, len) == 0 && memcmp(tag1, tag2, TAG) == 0;
  ok = ok && open_fast(s, back, c1, len, tag1, ad, ad_len, nonce, key) == 0 && memcmp(back, m, len) == 0;
  ok = ok && verify_fast(s, c1, len, tag1, ad, ad_len, nonce, key) == 0 && verify_sodium(s, c1, len, tag1, ad, ad_len, nonce, key) == 0;
  if (len > 0) {
    c1[len / 2] ^= 1;
    ok = ok && open_fast(s, back, c1, len, tag1, ad, ad_len, nonce, key) == -1;
    ok = ok && verify_fast(s, c1, len, tag1, ad, ad_len, nonce, key) == -1 && verify_sodium(s, c1, len, tag1, ad, ad_len, nonce, key) == -1;
  }
  crypto_stream_xchacha20_xor_ic(c1, m, len, nonce, ic, key);
  xor_fast(s, c2, m, len, nonce, ic, key);
  ok = ok && memcmp(c1, c2, len) == 0;
  // Piece tags over m, in pieces of 1000 bytes.
  pieces_sodium(s, c1, m, len, 1000, ic, nonce, key);
  pieces_fast(s, c2, m, len, 1000, ic, nonce, key);
  ok = ok && memcmp(c1, c2, (len + 999) / 1000 * TAG) == 0;
  free(buf);
  return ok;
}

void choose() {
  const char *want = getenv("LETHE_AEAD");
  if ((want && strcmp(want, "libsodium") == 0) || sodium_init() < 0) return;
  OpenSsl o;
  auto size = reinterpret_cast<CtxSizeFn>(dlsym(RTLD_DEFAULT, "Poly1305_ctx_size"));
  o.chacha = reinterpret_cast<ChaChaFn>(dlsym(RTLD_DEFAULT, "ChaCha20_ctr32"));
  o.init = reinterpret_cast<PolyInitFn>(dlsym(RTLD_DEFAULT, "Poly1305_Init"));
  o.update = reinterpret_cast<PolyUpdateFn>(dlsym(RTLD_DEFAULT, "Poly1305_Update"));
  o.final = reinterpret_cast<PolyFinalFn>(dlsym(RTLD_DEFAULT, "Poly1305_Final"));
  if (!size || !o.chacha || !o.init || !o.update || !o.final || size() > POLY_BYTES) return;
  State *s = static_cast<State *>(sodium_malloc(sizeof(State)));
  if (!s) return;
  ossl = o;
  fast = true;
  static const size_t lens[] = {0, 1, 15, 16, 17, 63, 64, 65, 127, 128, 255, 256, 257, 511, 512, 1000, 4096, 4097, 65536 + 31};
  bool ok = true;
  // Each case also checks that the calls left no key material in the State.
  for (size_t i = 0; ok && i < sizeof lens / sizeof lens[0]; i++)
    ok = agrees(s, lens[i], i % 4 == 0 ? 0 : 5 + 16 * (i % 3), 1 + i % 3) && sodium_is_zero(reinterpret_cast<const unsigned char *>(s), sizeof *s);
  sodium_free(s);
  if (!ok) {
    fast = false;
    ossl = OpenSsl();
  }
}

bool use_openssl(const State *s) {
  std::call_once(chosen, choose);
  // An unaligned State (a caller's bug) would still work in libsodium.
  return fast && reinterpret_cast<uintptr_t>(s) % alignof(State) == 0;
}

}  // namespace

void SealDetached(State *s, uint8_t *c, uint8_t *tag, const uint8_t *m, size_t len, const uint8_t *ad, size_t ad_len,
                  const uint8_t *nonce, const uint8_t *key) {
  if (use_openssl(s) && within_counter(1, len)) return seal_fast(s, c, tag, m, len, ad, ad_len, nonce, key);
  seal_sodium(c, tag, m, len, ad, ad_len, nonce, key);
}

int OpenDetached(State *s, uint8_t *m, const uint8_t *c, size_t len, const uint8_t *tag, const uint8_t *ad, size_t ad_len,
                 const uint8_t *nonce, const uint8_t *key) {
  if (use_openssl(s) && within_counter(1, len)) return open_fast(s, m, c, len, tag, ad, ad_len, nonce, key);
  return crypto_aead_xchacha20poly1305_ietf_decrypt_detached(m, nullptr, c, len, tag, ad, ad_len, nonce, key) == 0 ? 0 : -1;
}

int VerifyDetached(State *s, const uint8_t *c, size_t len, const uint8_t *tag, const uint8_t *ad, size_t ad_len, const uint8_t *nonce,
                   const uint8_t *key) {
  if (use_openssl(s)) return verify_fast(s, c, len, tag, ad, ad_len, nonce, key);
  return verify_sodium(s, c, len, tag, ad, ad_len, nonce, key);
}

void PieceTags(State *s, uint8_t *tags, const uint8_t *c, size_t len, size_t piece, uint64_t first, const uint8_t *nonce, const uint8_t *key) {
  if (use_openssl(s) && within_counter(first, (len + piece - 1) / piece * 64)) return pieces_fast(s, tags, c, len, piece, first, nonce, key);
  pieces_sodium(s, tags, c, len, piece, first, nonce, key);
}

void StreamXorIc(State *s, uint8_t *out, const uint8_t *in, size_t len, const uint8_t *nonce, uint64_t ic, const uint8_t *key) {
  if (use_openssl(s) && within_counter(ic, len)) return xor_fast(s, out, in, len, nonce, ic, key);
  crypto_stream_xchacha20_xor_ic(out, in, len, nonce, ic, key);
}

const char *Backend() {
  std::call_once(chosen, choose);
  return fast ? "openssl" : "libsodium";
}

}  // namespace aead
}  // namespace lethe
