// Digests of each 4 KiB piece of the disk chunks whose tag the agent has checked,
// taken as a checked blob leaves memory (CheckedBlobs) or at the check when it is not
// kept there (docs/nbd.md, "Reads"), so that a small read of a chunk that is only in
// the cache file reads and decrypts the pieces it needs, not the whole 128 KiB blob
// and its tag.
//
// A digest is BLAKE2b-128 keyed with a key this process draws at start and keeps in
// memory only: whoever can write the cache file cannot make a piece that matches
// one. Ciphertext and digests only, nothing secret, so ordinary memory, bounded by
// chunks (32 pieces of 16 bytes and the nonce: 536 bytes a 128 KiB chunk, about
// 4 MiB a 1 GiB disk at the default). A record is tied to the ciphertext hash the
// signed manifest names, as CheckedBlobs is: when the manifest moves on (a write, a
// new version) the old record is not used.
import sodium from 'sodium-native';
import { chunkCiphertext, chunkNonce } from '../../common/chunk.js';
import { NONCE_BYTES } from '../../common/constants.js';

export const PIECE_BYTES = 4096;
const DIGEST_BYTES = 16;

export interface PieceRecord {
  hash: string;
  /** The blob's nonce, then a digest per piece. */
  data: Buffer;
}

export class PieceDigests {
  private readonly records = new Map<string, PieceRecord>();
  private readonly key = Buffer.alloc(sodium.crypto_generichash_KEYBYTES);
  /** Pieces that did not match their digest (damage to the cache file). */
  mismatches = 0;

  constructor(readonly limitChunks: number) {
    sodium.randombytes_buf(this.key);
  }

  get size(): number {
    return this.records.size;
  }

  /** The record of `id` if it is for the ciphertext with hash `hash`, most recently used from now. */
  get(id: string, hash: string): PieceRecord | undefined {
    const r = this.records.get(id);
    if (!r) return undefined;
    this.records.delete(id);
    if (r.hash !== hash) return undefined;
    this.records.set(id, r);
    return r;
  }

  /** Takes the digests of a blob whose tag was just checked (nothing if they are here already). */
  put(id: string, hash: string, blob: Buffer): void {
    const had = this.records.get(id);
    if (had?.hash === hash) return;
    const ct = chunkCiphertext(blob);
    const pieces = Math.ceil(ct.length / PIECE_BYTES);
    const data = Buffer.allocUnsafe(NONCE_BYTES + pieces * DIGEST_BYTES);
    data.set(chunkNonce(blob));
    for (let p = 0; p < pieces; p++) {
      const at = NONCE_BYTES + p * DIGEST_BYTES;
      sodium.crypto_generichash(data.subarray(at, at + DIGEST_BYTES), ct.subarray(p * PIECE_BYTES, (p + 1) * PIECE_BYTES), this.key);
    }
    this.records.delete(id);
    this.records.set(id, { hash, data });
    if (this.records.size > this.limitChunks) this.records.delete(this.records.keys().next().value!);
  }

  /** Whether `piece` (ciphertext) is piece number `p` of the record's chunk. */
  matches(r: PieceRecord, p: number, piece: Buffer): boolean {
    const at = NONCE_BYTES + p * DIGEST_BYTES;
    if (at + DIGEST_BYTES > r.data.length) return false;
    const d = this.digest;
    sodium.crypto_generichash(d, piece, this.key);
    return d.equals(r.data.subarray(at, at + DIGEST_BYTES));
  }

  nonce(r: PieceRecord): Buffer {
    return r.data.subarray(0, NONCE_BYTES);
  }

  delete(id: string): void {
    this.records.delete(id);
  }

  private readonly digest = Buffer.alloc(DIGEST_BYTES);
}
