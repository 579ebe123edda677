// The chunk AEAD in native code (aead.cc): XChaCha20-Poly1305 exactly as libsodium's
// crypto_aead_xchacha20poly1305_ietf_* and crypto_stream_xchacha20_xor_ic define it
// (docs/chunk-format.md), on the fastest implementation this process carries.
// docs/nbd.md, "The cipher's code".
#pragma once
#include <stddef.h>
#include <stdint.h>

namespace lethe {
namespace aead {

inline constexpr size_t KEY = 32;
inline constexpr size_t NONCE = 24;
inline constexpr size_t TAG = 16;
/** Room for OpenSSL's Poly1305 context (Poly1305_ctx_size(): 248 bytes in OpenSSL 3.0). */
inline constexpr size_t POLY_BYTES = 384;

/**
 * A call's key material: the HChaCha20 subkey, the block-0 keystream (the one-time
 * Poly1305 key) and the Poly1305 state. It lives in the caller's locked scratch
 * (sodium_malloc) so that no key byte reaches unlocked memory; every call zeroes it
 * before it returns.
 */
struct alignas(64) State {
  uint32_t subkey[8];
  uint8_t block[64];
  alignas(16) uint8_t poly[POLY_BYTES];
};

/** c (may be m) = m encrypted, tag over ad ‖ c; as crypto_aead_xchacha20poly1305_ietf_encrypt_detached. */
void SealDetached(State *s, uint8_t *c, uint8_t *tag, const uint8_t *m, size_t len, const uint8_t *ad, size_t ad_len,
                  const uint8_t *nonce, const uint8_t *key);
/** 0 with m (may be c) decrypted when the tag matches; -1 with m untouched otherwise. */
int OpenDetached(State *s, uint8_t *m, const uint8_t *c, size_t len, const uint8_t *tag, const uint8_t *ad, size_t ad_len,
                 const uint8_t *nonce, const uint8_t *key);
/** 0 when the tag matches c under key; -1 otherwise. Nothing is decrypted: OpenDetached without its output. */
int VerifyDetached(State *s, const uint8_t *c, size_t len, const uint8_t *tag, const uint8_t *ad, size_t ad_len, const uint8_t *nonce,
                   const uint8_t *key);
/**
 * A 16-byte tag for each `piece`-byte piece of c (len bytes; the last piece may be
 * shorter) into tags: piece i's is Poly1305 under the first 32 bytes of XChaCha20 block
 * `first + i` of (key, nonce), a one-time key for that piece of the one blob that nonce
 * sealed. As libsodium's crypto_stream_xchacha20_xor_ic and crypto_onetimeauth_poly1305.
 */
void PieceTags(State *s, uint8_t *tags, const uint8_t *c, size_t len, size_t piece, uint64_t first, const uint8_t *nonce, const uint8_t *key);
/** out = in XOR the XChaCha20 keystream from block `ic` on; as crypto_stream_xchacha20_xor_ic. */
void StreamXorIc(State *s, uint8_t *out, const uint8_t *in, size_t len, const uint8_t *nonce, uint64_t ic, const uint8_t *key);

/** "openssl" or "libsodium": which code the calls above run, chosen once, on first use. */
const char *Backend();

}  // namespace aead
}  // namespace lethe
