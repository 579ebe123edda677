// Key escrow: the master key wraps one random key per image version (and one
// dedup key per image); chunk keys are derived from those on demand and leave
// the server only sealed to a device's X25519 key.
import { AD_VERSION_KEY, KEY_BYTES, NONCE_BYTES, TAG_BYTES } from '../common/constants.js';
import { LetheError } from '../common/errors.js';
import { classKey, classKeyInto, chunkKeyInto, type ChunkCoord } from '../common/chunk.js';
import { open, randomKey, seal, sealTo, secureBuffer, secureCopy, sha256, wipe, type SecretKey } from '../common/crypto.js';

const MAX_CACHED_KEYS = 256;

/** A key wrapped by the master key itself: nonce ‖ ciphertext ‖ tag. */
const WRAPPED_BYTES = NONCE_BYTES + KEY_BYTES + TAG_BYTES;
/** A key wrapped by a keyring term's key: the term (u32 big-endian) ‖ nonce ‖ ciphertext ‖ tag. */
const TERM_WRAPPED_BYTES = 4 + WRAPPED_BYTES;

/** The keyring term a stored wrapped key was wrapped under; 0: the master key itself (before any rotation). */
export function termOf(wrapped: Buffer): number {
  return wrapped.length === TERM_WRAPPED_BYTES ? wrapped.readUInt32BE(0) : 0;
}

const termAd = (term: number) => {
  const t = Buffer.alloc(4);
  t.writeUInt32BE(term);
  return Buffer.concat([Buffer.from(AD_VERSION_KEY + 'term\0'), t]);
};

/**
 * Image keys are wrapped by the keyring's current term key (docs/fleet.md, Key
 * rotation); each term key is stored in the database wrapped by the master key,
 * so every replica finds a new term there, and a rotated-out term is deleted with
 * nothing left wrapped under it. Keys stored before the first rotation are
 * wrapped by the master key directly (term 0).
 */
export class Escrow {
  /** Unwrapped keys by SHA-256 of their wrapped form, in secure memory; wiped on eviction and close. */
  private readonly cache = new Map<string, SecretKey>();
  /** The keyring's term keys this process has loaded, in secure memory. */
  private readonly terms = new Map<number, SecretKey>();
  /** The term new keys are wrapped under (0: the master key). */
  private current = 0;

  constructor(private readonly masterKey: SecretKey) {}

  private wrapAd(imageId: Buffer, gen: number, purpose: string): Buffer {
    const g = Buffer.alloc(4);
    g.writeUInt32BE(gen);
    return Buffer.concat([Buffer.from(AD_VERSION_KEY + purpose + '\0'), imageId, g]);
  }

  /** A server secret (the TLS key of a rotation) sealed by the master key, for the database. */
  sealSecret(plain: Uint8Array, purpose: string): Buffer {
    return seal(this.masterKey, plain, Buffer.from(AD_VERSION_KEY + 'secret\0' + purpose));
  }

  /** The plaintext of sealSecret's output; caller wipes it. */
  openSecret(sealed: Buffer, purpose: string): Buffer {
    return open(this.masterKey, sealed, Buffer.from(AD_VERSION_KEY + 'secret\0' + purpose));
  }

  /** A term key wrapped by the master key, for the keyring table. */
  wrapTermKey(term: number, key: Uint8Array): Buffer {
    return seal(this.masterKey, key, termAd(term));
  }

  /** Takes the keyring as stored (`term`, wrapped by the master key); the newest term wraps new keys. Forgets terms no longer stored. */
  setKeyring(rows: readonly { term: number; wrapped: Buffer }[]): void {
    const keep = new Set(rows.map((r) => r.term));
    for (const [term, key] of this.terms) {
      if (!keep.has(term)) {
        wipe(key);
        this.terms.delete(term);
      }
    }
    for (const r of rows) {
      if (this.terms.has(r.term)) continue;
      const raw = open(this.masterKey, r.wrapped, termAd(r.term));
      this.terms.set(r.term, secureCopy(raw));
      wipe(raw);
    }
    this.current = rows.reduce((m, r) => Math.max(m, r.term), 0);
  }

  /** True when every wrapped key given can be unwrapped with the terms loaded. */
  hasTerms(...wrapped: Buffer[]): boolean {
    return wrapped.every((w) => termOf(w) === 0 || this.terms.has(termOf(w)));
  }

  get currentTerm(): number {
    return this.current;
  }

  private wrapWith(term: number, key: Uint8Array, ad: Buffer): Buffer {
    if (term === 0) return seal(this.masterKey, key, ad);
    const t = Buffer.alloc(4);
    t.writeUInt32BE(term);
    return Buffer.concat([t, seal(this.termKey(term), key, ad)]);
  }

  private termKey(term: number): SecretKey {
    const k = this.terms.get(term);
    if (!k) throw new LetheError('INTERNAL', `keyring term ${term} is not loaded`);
    return k;
  }

  /** A fresh key, returned wrapped by the current term's key for storage. */
  newWrappedKey(imageId: Buffer, gen: number, purpose: 'version' | 'dedup'): Buffer {
    const k = randomKey();
    try {
      return this.wrapWith(this.current, k, this.wrapAd(imageId, gen, purpose));
    } finally {
      wipe(k);
    }
  }

  /** The same key wrapped under the current term instead (a rotation): the key itself does not change. */
  rewrap(wrapped: Buffer, imageId: Buffer, gen: number, purpose: 'version' | 'dedup'): Buffer {
    const ad = this.wrapAd(imageId, gen, purpose);
    const raw = this.openWrapped(wrapped, ad);
    try {
      return this.wrapWith(this.current, raw, ad);
    } finally {
      wipe(raw);
    }
  }

  private openWrapped(wrapped: Buffer, ad: Buffer): Buffer {
    const term = termOf(wrapped);
    return term === 0 ? open(this.masterKey, wrapped, ad) : open(this.termKey(term), wrapped.subarray(4), ad);
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
    const raw = this.openWrapped(wrapped, this.wrapAd(imageId, gen, purpose));
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

  /** Forgets every unwrapped image key (after a rotation: their wrapped forms changed). */
  dropCache(): void {
    for (const k of this.cache.values()) wipe(k);
    this.cache.clear();
  }

  close(): void {
    for (const k of this.cache.values()) wipe(k);
    this.cache.clear();
    for (const k of this.terms.values()) wipe(k);
    this.terms.clear();
    wipe(this.scratch);
    wipe(this.masterKey);
  }
}

