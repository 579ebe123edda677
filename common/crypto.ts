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
  return sealInto(Buffer.alloc(NONCE_BYTES + plaintext.length + TAG_BYTES), key, plaintext, ad, nonce);
}

/** seal() into `out`, exactly nonce ‖ ciphertext ‖ tag long; returns `out`. */
export function sealInto(out: Buffer, key: Uint8Array, plaintext: Uint8Array, ad: Uint8Array, nonce = randomBytes(NONCE_BYTES)): Buffer {
  if (out.length !== NONCE_BYTES + plaintext.length + TAG_BYTES) throw new RangeError(`a sealed box of ${plaintext.length} bytes is ${NONCE_BYTES + plaintext.length + TAG_BYTES} long, not ${out.length}`);
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

/** Poly1305's zero padding of the AD and the ciphertext to 16 bytes (the lengths go in macLengths). */
const PAD16 = Buffer.alloc(16);
// Scratch for the two functions below; the secret parts are locked and wiped after each use.
const macState = secureBuffer(sodium.crypto_onetimeauth_STATEBYTES);
const macKey = secureBuffer(sodium.crypto_onetimeauth_KEYBYTES);
const blockScratch = secureBuffer(64);
const macOut = Buffer.alloc(TAG_BYTES);
const macLengths = Buffer.alloc(16);

/**
 * Checks the tag of nonce ‖ ciphertext ‖ tag, as openInto() would, without
 * decrypting anything; true when it is authentic under `key` and `ad`.
 *
 * libsodium's XChaCha20-Poly1305 (IETF) is ChaCha20 under the subkey
 * HChaCha20(key, nonce[0..16]) with the nonce 0⁴ ‖ nonce[16..24]: block 0's
 * first 32 bytes are the Poly1305 key, the message starts at block 1, and the
 * tag is Poly1305(ad ‖ pad16 ‖ ciphertext ‖ pad16 ‖ le64(|ad|) ‖ le64(|ct|)).
 * crypto_stream_xchacha20 (a 64-bit counter over the 8-byte nonce tail) makes
 * the same keystream for every counter below 2³², which a chunk never reaches.
 */
export function verifyBoxed(key: Uint8Array, boxed: Uint8Array, ad: Uint8Array): boolean {
  if (boxed.length < NONCE_BYTES + TAG_BYTES) return false;
  const nonce = boxed.subarray(0, NONCE_BYTES);
  const ct = boxed.subarray(NONCE_BYTES, boxed.length - TAG_BYTES);
  try {
    sodium.crypto_stream_xchacha20(macKey, nonce, key);
    sodium.crypto_onetimeauth_init(macState, macKey);
    sodium.crypto_onetimeauth_update(macState, ad);
    sodium.crypto_onetimeauth_update(macState, PAD16.subarray(0, (16 - (ad.length % 16)) % 16));
    sodium.crypto_onetimeauth_update(macState, ct);
    sodium.crypto_onetimeauth_update(macState, PAD16.subarray(0, (16 - (ct.length % 16)) % 16));
    macLengths.writeBigUInt64LE(BigInt(ad.length), 0);
    macLengths.writeBigUInt64LE(BigInt(ct.length), 8);
    sodium.crypto_onetimeauth_update(macState, macLengths);
    sodium.crypto_onetimeauth_final(macState, macOut);
    return sodium.sodium_memcmp(macOut, boxed.subarray(boxed.length - TAG_BYTES));
  } finally {
    wipe(macKey);
    wipe(macState);
  }
}

/**
 * Decrypts plaintext bytes [from, from + out.length) of a box whose tag
 * verifyBoxed() has already accepted: only those bytes are ever in the clear.
 * The caller must keep the box unchanged between the check and this call.
 */
export function openRangeInto(out: Uint8Array, key: Uint8Array, boxed: Uint8Array, from: number): void {
  const ctLen = boxed.length - NONCE_BYTES - TAG_BYTES;
  if (from < 0 || from + out.length > ctLen) throw new RangeError(`range ${from}+${out.length} is outside a ${ctLen}-byte box`);
  openPartInto(out, key, boxed.subarray(0, NONCE_BYTES), boxed.subarray(NONCE_BYTES, NONCE_BYTES + ctLen), 0, from);
}

/**
 * openRangeInto() with only a part of the ciphertext at hand: `part` holds
 * ciphertext bytes [partAt, partAt + part.length), which must cover [from, from +
 * out.length). The caller has checked the part against digests taken from a box
 * whose tag was accepted (agent/chunks/piece-digests.ts).
 */
export function openPartInto(out: Uint8Array, key: Uint8Array, nonce: Uint8Array, part: Uint8Array, partAt: number, from: number): void {
  if (partAt % 64 !== 0 || from < partAt || from + out.length > partAt + part.length) {
    throw new RangeError(`range ${from}+${out.length} is outside ciphertext part ${partAt}+${part.length} (or the part does not start on a 64-byte block)`);
  }
  const ct = (a: number, b: number) => part.subarray(a - partAt, b - partAt);
  let done = 0;
  const lead = from % 64;
  if (lead !== 0 && out.length > 0) {
    // The counter counts 64-byte blocks: decrypt the first block whole and keep its tail.
    const start = from - lead;
    const block = blockScratch.subarray(0, Math.min(64, partAt + part.length - start));
    try {
      sodium.crypto_stream_xchacha20_xor_ic(block, ct(start, start + block.length), nonce, 1 + start / 64, key);
      done = Math.min(64 - lead, out.length);
      out.set(block.subarray(lead, lead + done));
    } finally {
      wipe(blockScratch);
    }
  }
  if (done < out.length) {
    const at = from + done;
    sodium.crypto_stream_xchacha20_xor_ic(out.subarray(done), ct(at, from + out.length), nonce, 1 + at / 64, key);
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
