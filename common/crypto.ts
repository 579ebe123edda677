// Thin, argument-checked wrappers over sodium-native. Secrets live in
// sodium_malloc memory (locked, guard-paged, not in core dumps) and are wiped
// with sodium_memzero; see docs/chunk-format.md for what is derived from what.
import sodium from 'sodium-native';
import { createHash } from 'node:crypto';
import { KEY_BYTES, NONCE_BYTES, TAG_BYTES } from './constants.js';
import { LetheError } from './errors.js';

export type SecretKey = Buffer & { secure?: boolean };

/** A buffer in locked, guard-paged memory. Wipe it with `wipe` when done. */
export function secureBuffer(size: number): SecretKey {
  return sodium.sodium_malloc(size);
}

export function secureCopy(src: Uint8Array): SecretKey {
  const out = secureBuffer(src.length);
  out.set(src);
  return out;
}

export function wipe(...bufs: (Uint8Array | undefined | null)[]): void {
  for (const b of bufs) if (b) sodium.sodium_memzero(b);
}

export function randomBytes(n: number): Buffer {
  const b = Buffer.alloc(n);
  sodium.randombytes_buf(b);
  return b;
}

export function randomKey(): SecretKey {
  const k = secureBuffer(KEY_BYTES);
  sodium.randombytes_buf(k);
  return k;
}

export function sha256(...parts: (Uint8Array | string)[]): Buffer {
  const h = createHash('sha256');
  for (const p of parts) h.update(p);
  return h.digest();
}

/** BLAKE2b-256 keyed by `key` over the concatenation of `parts`, into `out` (32 bytes). */
export function deriveKeyInto(out: Uint8Array, key: Uint8Array, ...parts: (Uint8Array | string)[]): void {
  const input = Buffer.concat(parts.map((p) => (typeof p === 'string' ? Buffer.from(p, 'utf8') : Buffer.from(p))));
  try {
    sodium.crypto_generichash(out, input, key);
  } finally {
    wipe(input);
  }
}

/** BLAKE2b-256 keyed by `key` over the concatenation of `parts`, into new secure memory. */
export function deriveKey(key: Uint8Array, ...parts: (Uint8Array | string)[]): SecretKey {
  const out = secureBuffer(KEY_BYTES);
  deriveKeyInto(out, key, ...parts);
  return out;
}

export function keyedHash(key: Uint8Array, data: Uint8Array): Buffer {
  const out = Buffer.alloc(32);
  sodium.crypto_generichash(out, data, key);
  return out;
}

/** XChaCha20-Poly1305: returns nonce ‖ ciphertext ‖ tag. */
export function seal(key: Uint8Array, plaintext: Uint8Array, ad: Uint8Array, nonce = randomBytes(NONCE_BYTES)): Buffer {
  const out = Buffer.alloc(NONCE_BYTES + plaintext.length + TAG_BYTES);
  nonce.copy(out, 0);
  sodium.crypto_aead_xchacha20poly1305_ietf_encrypt(out.subarray(NONCE_BYTES), plaintext, ad, null, nonce, key);
  return out;
}

/**
 * Opens nonce ‖ ciphertext ‖ tag into `out` (which must be exactly the plaintext size).
 * Throws TAMPERED, with one message for every kind of tampering.
 */
export function openInto(out: Uint8Array, key: Uint8Array, boxed: Uint8Array, ad: Uint8Array): void {
  if (boxed.length !== NONCE_BYTES + out.length + TAG_BYTES) throw tampered();
  const nonce = boxed.subarray(0, NONCE_BYTES);
  try {
    sodium.crypto_aead_xchacha20poly1305_ietf_decrypt(out, null, boxed.subarray(NONCE_BYTES), ad, nonce, key);
  } catch {
    wipe(out);
    throw tampered();
  }
}

export function open(key: Uint8Array, boxed: Uint8Array, ad: Uint8Array): Buffer {
  if (boxed.length < NONCE_BYTES + TAG_BYTES) throw tampered();
  const out = Buffer.alloc(boxed.length - NONCE_BYTES - TAG_BYTES);
  openInto(out, key, boxed, ad);
  return out;
}

export function tampered(): LetheError {
  return new LetheError('TAMPERED', 'ciphertext failed authentication (tampered or wrong key)');
}

export interface BoxKeyPair {
  publicKey: Buffer;
  secretKey: SecretKey;
}

export function boxKeyPair(): BoxKeyPair {
  const publicKey = Buffer.alloc(sodium.crypto_box_PUBLICKEYBYTES);
  const secretKey = secureBuffer(sodium.crypto_box_SECRETKEYBYTES);
  sodium.crypto_box_keypair(publicKey, secretKey);
  return { publicKey, secretKey };
}

export function signKeyPair(): BoxKeyPair {
  const publicKey = Buffer.alloc(sodium.crypto_sign_PUBLICKEYBYTES);
  const secretKey = secureBuffer(sodium.crypto_sign_SECRETKEYBYTES);
  sodium.crypto_sign_keypair(publicKey, secretKey);
  return { publicKey, secretKey };
}

/** crypto_box_seal: anonymous sender, only the holder of `publicKey`'s secret opens it. */
export function sealTo(publicKey: Uint8Array, message: Uint8Array): Buffer {
  if (publicKey.length !== sodium.crypto_box_PUBLICKEYBYTES) throw new TypeError('bad X25519 public key length');
  const out = Buffer.alloc(message.length + sodium.crypto_box_SEALBYTES);
  sodium.crypto_box_seal(out, message, publicKey);
  return out;
}

/** Opens a sealed box into secure memory; throws TAMPERED if it does not open. */
export function openSealed(pair: BoxKeyPair, sealed: Uint8Array): SecretKey {
  if (sealed.length < sodium.crypto_box_SEALBYTES) throw tampered();
  const out = secureBuffer(sealed.length - sodium.crypto_box_SEALBYTES);
  if (!sodium.crypto_box_seal_open(out, sealed, pair.publicKey, pair.secretKey)) {
    wipe(out);
    throw tampered();
  }
  return out;
}

export function sign(secretKey: Uint8Array, message: Uint8Array): Buffer {
  const sig = Buffer.alloc(sodium.crypto_sign_BYTES);
  sodium.crypto_sign_detached(sig, message, secretKey);
  return sig;
}

export function verify(publicKey: Uint8Array, message: Uint8Array, signature: Uint8Array): boolean {
  if (publicKey.length !== sodium.crypto_sign_PUBLICKEYBYTES || signature.length !== sodium.crypto_sign_BYTES) return false;
  return sodium.crypto_sign_verify_detached(signature, message, publicKey);
}

export function constantTimeEqual(a: Uint8Array, b: Uint8Array): boolean {
  return a.length === b.length && sodium.sodium_memcmp(a, b);
}

export const b64u = {
  encode: (b: Uint8Array): string => Buffer.from(b).toString('base64url'),
  decode: (s: string): Buffer => Buffer.from(s, 'base64url'),
};
