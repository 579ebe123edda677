// Key escrow: the master key wraps one random key per image version (and one
// dedup key per image); chunk keys are derived from those on demand and leave
// the server only sealed to a device's X25519 key.
import { AD_VERSION_KEY, KEY_BYTES } from '../common/constants.js';
import { classKey, classKeyInto, chunkKeyInto, type ChunkCoord } from '../common/chunk.js';
import { open, randomKey, seal, sealTo, secureBuffer, secureCopy, sha256, wipe, type SecretKey } from '../common/crypto.js';

const MAX_CACHED_KEYS = 256;

export class Escrow {
  /** Unwrapped keys by SHA-256 of their wrapped form, in secure memory; wiped on eviction and close. */
  private readonly cache = new Map<string, SecretKey>();

  constructor(private readonly masterKey: SecretKey) {}

  private wrapAd(imageId: Buffer, gen: number, purpose: string): Buffer {
    const g = Buffer.alloc(4);
    g.writeUInt32BE(gen);
    return Buffer.concat([Buffer.from(AD_VERSION_KEY + purpose + '\0'), imageId, g]);
  }

  /** A fresh key, returned wrapped by the master key for storage. */
  newWrappedKey(imageId: Buffer, gen: number, purpose: 'version' | 'dedup'): Buffer {
    const k = randomKey();
    try {
      return seal(this.masterKey, k, this.wrapAd(imageId, gen, purpose));
    } finally {
      wipe(k);
    }
  }

  private unwrap(wrapped: Buffer, imageId: Buffer, gen: number, purpose: 'version' | 'dedup'): SecretKey {
    // Keyed by the wrapped bytes, not the coordinates: a discarded draft's
    // version number can come back with a new key.
    const id = sha256(wrapped).toString('hex');
    const hit = this.cache.get(id);
    if (hit) {
      this.cache.delete(id);
      this.cache.set(id, hit);
      return hit;
    }
    const raw = open(this.masterKey, wrapped, this.wrapAd(imageId, gen, purpose));
    if (raw.length !== KEY_BYTES) {
      wipe(raw);
      throw new Error('wrapped key has the wrong size');
    }
    const key = secureCopy(raw);
    wipe(raw);
    this.cache.set(id, key);
    if (this.cache.size > MAX_CACHED_KEYS) {
      const [oldId, old] = this.cache.entries().next().value as [string, SecretKey];
      this.cache.delete(oldId);
      wipe(old);
    }
    return key;
  }

  versionKey(wrapped: Buffer, imageId: Buffer, gen: number): SecretKey {
    return this.unwrap(wrapped, imageId, gen, 'version');
  }

  /** The key of the per-image keyed hash used to find unchanged chunks. */
  dedupKey(wrapped: Buffer, imageId: Buffer): SecretKey {
    return this.unwrap(wrapped, imageId, 0, 'dedup');
  }

  /** Scratch for the class key on the way to a normal chunk's key; wiped after each use. */
  private readonly scratch = secureBuffer(KEY_BYTES);

  /** The key that encrypts (or decrypts) one chunk, into `out` (32 bytes of secure memory). */
  chunkKeyInto(out: Uint8Array, versionKey: Uint8Array, c: ChunkCoord): void {
    if (c.cls === 'sensitive') return chunkKeyInto(out, versionKey, c);
    try {
      classKeyInto(this.scratch, versionKey);
      chunkKeyInto(out, this.scratch, c);
    } finally {
      wipe(this.scratch);
    }
  }

  /** The key of one chunk in new secure memory. Caller wipes it. */
  chunkKeyFor(versionKey: Uint8Array, c: ChunkCoord): SecretKey {
    const out = secureBuffer(KEY_BYTES);
    this.chunkKeyInto(out, versionKey, c);
    return out;
  }

  /** The normal-class key of a version, sealed to a device. */
  sealedClassKey(versionKey: Uint8Array, devicePk: Uint8Array): Buffer {
    const ck = classKey(versionKey);
    try {
      return sealTo(devicePk, ck);
    } finally {
      wipe(ck);
    }
  }

  /**
   * Derives each chunk's key into one buffer and seals it once (batching saves
   * the X25519 work). `versionKeyOf` is asked right before each derivation, so
   * a cache eviction cannot hand back a wiped key.
   */
  sealedChunkKeys(coords: ChunkCoord[], versionKeyOf: (gen: number) => Uint8Array, devicePk: Uint8Array): Buffer {
    const all = secureBuffer(coords.length * KEY_BYTES);
    try {
      coords.forEach((coord, i) => {
        this.chunkKeyInto(all.subarray(i * KEY_BYTES, (i + 1) * KEY_BYTES), versionKeyOf(coord.gen), coord);
      });
      return sealTo(devicePk, all);
    } finally {
      wipe(all);
    }
  }

  close(): void {
    for (const k of this.cache.values()) wipe(k);
    this.cache.clear();
    wipe(this.scratch);
    wipe(this.masterKey);
  }
}

