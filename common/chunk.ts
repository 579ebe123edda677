// Chunk addressing and the chunk envelope (docs/chunk-format.md).
//
//   chunk blob = format(1) ‖ nonce(24) ‖ XChaCha20-Poly1305(chunk key, plaintext, AD)
//   AD         = "lethe/v1/chunk\0" ‖ imageId(16) ‖ gen(u32be) ‖ kind(u8) ‖ index(u64be) ‖ class(u8)
//
// `gen` is the image version that wrote the chunk; a later version that leaves
// the chunk unchanged refers to it by the same gen, so nothing is re-encrypted.
import {
  AD_CHUNK,
  CHUNK_OVERHEAD,
  CHUNK_FORMAT_VERSION,
  CLASS_CODE,
  KDF_CHUNK_NORMAL,
  KDF_CHUNK_SENSITIVE,
  KDF_CLASS,
  KIND_CODE,
  NONCE_BYTES,
  TAG_BYTES,
  type ChunkKind,
  type Sensitivity,
} from './constants.js';
import { deriveKey, deriveKeyInto, openInto, openPartInto, openRangeInto, randomBytes, sealInto, tampered, verifyBoxed, type SecretKey } from './crypto.js';

export interface ChunkCoord {
  imageId: Buffer; // 16 bytes
  gen: number;
  kind: ChunkKind;
  index: number;
  cls: Sensitivity;
}

function coordBytes(c: ChunkCoord): Buffer {
  if (c.imageId.length !== 16) throw new TypeError('image id must be 16 bytes');
  const b = Buffer.alloc(16 + 4 + 1 + 8);
  c.imageId.copy(b, 0);
  b.writeUInt32BE(c.gen, 16);
  b.writeUInt8(KIND_CODE[c.kind], 20);
  b.writeBigUInt64BE(BigInt(c.index), 21);
  return b;
}

export function chunkAd(c: ChunkCoord): Buffer {
  return Buffer.concat([Buffer.from(AD_CHUNK, 'utf8'), coordBytes(c), Buffer.from([CLASS_CODE[c.cls]])]);
}

/** The normal-class key of one image version, released once per lease. */
export function classKey(versionKey: Uint8Array): SecretKey {
  return deriveKey(versionKey, KDF_CLASS, 'normal');
}

/**
 * The key of one chunk. For a normal chunk `parentKey` is the class key; for a
 * sensitive chunk it is the version key itself, so a class key cannot derive it.
 */
export function chunkKey(parentKey: Uint8Array, c: ChunkCoord): SecretKey {
  return deriveKey(parentKey, c.cls === 'sensitive' ? KDF_CHUNK_SENSITIVE : KDF_CHUNK_NORMAL, coordBytes(c));
}

/** chunkKey() into a caller's (secure) 32-byte buffer, for hot loops. */
export function chunkKeyInto(out: Uint8Array, parentKey: Uint8Array, c: ChunkCoord): void {
  deriveKeyInto(out, parentKey, c.cls === 'sensitive' ? KDF_CHUNK_SENSITIVE : KDF_CHUNK_NORMAL, coordBytes(c));
}

/** classKey() into a caller's (secure) 32-byte buffer. */
export function classKeyInto(out: Uint8Array, versionKey: Uint8Array): void {
  deriveKeyInto(out, versionKey, KDF_CLASS, 'normal');
}

export function encryptChunk(key: Uint8Array, c: ChunkCoord, plaintext: Uint8Array, nonce?: Buffer): Buffer {
  // One buffer, written whole: no zero fill, no second copy (a guest's disk writes come a chunk at a time).
  return encryptChunkInto(Buffer.allocUnsafe(plaintext.length + CHUNK_OVERHEAD), key, c, plaintext, nonce);
}

/** encryptChunk() into `out`, which holds at least the blob; returns the blob, a view of `out`. */
export function encryptChunkInto(out: Buffer, key: Uint8Array, c: ChunkCoord, plaintext: Uint8Array, nonce?: Buffer): Buffer {
  const parts = chunkSealParts(out, c, plaintext.length, nonce);
  sealInto(parts.blob.subarray(1), key, plaintext, parts.ad, parts.nonce);
  return parts.blob;
}

/**
 * The blob's head (format byte, a nonce: fresh unless given) in `out`, and the blob (a
 * view of `out`), its nonce and its associated data: what a sealer needs to write the
 * rest (encryptChunkInto here, native sealWrite off the event loop).
 */
export function chunkSealParts(out: Buffer, c: ChunkCoord, plaintextLength: number, nonce = randomBytes(NONCE_BYTES)): { blob: Buffer; nonce: Buffer; ad: Buffer } {
  if (out.length < plaintextLength + CHUNK_OVERHEAD) throw new RangeError(`a ${plaintextLength}-byte chunk's blob does not fit ${out.length} bytes`);
  const blob = out.subarray(0, plaintextLength + CHUNK_OVERHEAD);
  blob[0] = CHUNK_FORMAT_VERSION;
  nonce.copy(blob, 1);
  return { blob, nonce, ad: chunkAd(c) };
}

/** Decrypts a chunk blob into `out` (the plaintext size); throws TAMPERED on any mismatch. */
export function decryptChunkInto(out: Uint8Array, key: Uint8Array, c: ChunkCoord, blob: Uint8Array): void {
  if (blob.length < 1 || blob[0] !== CHUNK_FORMAT_VERSION) throw tampered();
  openInto(out, key, blob.subarray(1), chunkAd(c));
}

/**
 * True when a chunk blob is authentic for this coordinate under `key` (the
 * check decryptChunkInto makes), without decrypting it.
 */
export function verifyChunk(key: Uint8Array, c: ChunkCoord, blob: Uint8Array): boolean {
  return blob.length >= 1 && blob[0] === CHUNK_FORMAT_VERSION && verifyBoxed(key, blob.subarray(1), chunkAd(c));
}

/**
 * Decrypts plaintext bytes [from, from + out.length) of a blob verifyChunk()
 * accepted and nothing else. The blob must not have changed since.
 */
export function decryptChunkRangeInto(out: Uint8Array, key: Uint8Array, blob: Uint8Array, from: number): void {
  openRangeInto(out, key, blob.subarray(1), from);
}

/** Where a blob's ciphertext starts (after the format byte and the nonce), and where its nonce is. */
export const CHUNK_CT_AT = 1 + NONCE_BYTES;
export const chunkNonce = (blob: Uint8Array): Uint8Array => blob.subarray(1, CHUNK_CT_AT);
export const chunkCiphertext = (blob: Uint8Array): Uint8Array => blob.subarray(CHUNK_CT_AT, blob.length - TAG_BYTES);

const SEAL_ID_NONCE_BYTES = 16;

/**
 * A blob's seal id: the first 16 bytes of its nonce, then its 16-byte tag. It names a
 * blob this device sealed, from the moment it stands in the cache until it is checked
 * in (agent/chunks/cache.ts: a dirty row's identity), where a SHA-256 of the whole blob
 * would cost a guest write a fifth of its CPU. A fresh random nonce seals every write,
 * so two blobs of one chunk never share it; the tag binds the rest under the chunk key.
 */
export function sealId(blob: Uint8Array): Buffer {
  if (blob.length < CHUNK_OVERHEAD) throw new RangeError(`a blob of ${blob.length} bytes has no nonce and tag`);
  return Buffer.concat([chunkNonce(blob).subarray(0, SEAL_ID_NONCE_BYTES), blob.subarray(blob.length - TAG_BYTES)]);
}

/**
 * Decrypts plaintext bytes [from, from + out.length) from `part`, ciphertext bytes
 * [partAt, ...) of a blob with this nonce, checked piece by piece against digests
 * of a blob verifyChunk() accepted (agent/chunks/piece-digests.ts).
 */
export function decryptChunkPartInto(out: Uint8Array, key: Uint8Array, nonce: Uint8Array, part: Uint8Array, partAt: number, from: number): void {
  openPartInto(out, key, nonce, part, partAt, from);
}

export function plaintextSize(blob: Uint8Array): number {
  return blob.length - CHUNK_OVERHEAD;
}

export function isZero(b: Uint8Array): boolean {
  // Compare 8 bytes at a time where aligned; chunks are 4 KiB multiples.
  if (b.byteOffset % 8 === 0 && b.length % 8 === 0) {
    const w = new BigUint64Array(b.buffer, b.byteOffset, b.length / 8);
    for (let i = 0; i < w.length; i++) if (w[i] !== 0n) return false;
    return true;
  }
  for (let i = 0; i < b.length; i++) if (b[i] !== 0) return false;
  return true;
}
