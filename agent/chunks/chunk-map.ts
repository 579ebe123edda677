// The lease's manifest as the agent reads it: each chunk's generation, class and
// ciphertext hash, with this device's own writes (dirty chunks of the lease's draft
// generation) laid over it. Every part of the core looks chunks up here.
import { canonical } from '../../common/audit-hash.js';
import { CHUNK_OVERHEAD, CHUNK_SIZE, MANIFEST_CONTEXT, type ChunkKind, type Sensitivity } from '../../common/constants.js';
import type { ChunkCoord } from '../../common/chunk.js';
import { b64u, sha256, verify } from '../../common/crypto.js';
import { LetheError } from '../../common/errors.js';
import { decodeManifest, packRows, type ManifestHead, type PackedManifest } from '../../common/manifest.js';
import type { Manifest, WireManifest } from '../remote/device-client.js';
import { ChunkEntries } from './chunk-entries.js';
import type { CacheKey, ChunkCache } from './cache.js';

export interface Entry {
  gen: number;
  cls: Sensitivity;
  /** The blob's name: the manifest's SHA-256, or the seal id of one this device wrote and has not checked in (common/chunk.ts). */
  ctHash: string;
}

/** A chunk's key in the key ring: generation, kind and index. */
export const keyId = (kind: ChunkKind, index: number, gen: number): string => `${gen}/${kind}/${index}`;

/** keyId()'s parts back. */
export function parseKeyId(id: string): { gen: number; kind: ChunkKind; index: number } {
  const [gen, kind, index] = id.split('/');
  return { gen: Number(gen), kind: kind as ChunkKind, index: Number(index) };
}

/** A format-1 (JSON) manifest's signature, as a server before format 2 sends it. */
export function verifyManifest(m: Manifest, serverSignPublicKey: Buffer): void {
  const { signature, ...body } = m;
  const msg = Buffer.from(`${MANIFEST_CONTEXT}\n${sha256(canonical(body)).toString('hex')}`);
  if (!verify(serverSignPublicKey, msg, b64u.decode(signature))) {
    throw new LetheError('TAMPERED', `manifest of ${m.image}@${m.version} has a bad signature`);
  }
}

/** The lease's manifest as the server sent it, its signature checked, packed (format 2, or a JSON one of a server before it). */
export function readManifest(w: WireManifest, serverSignPublicKey: Buffer): PackedManifest {
  if (Buffer.isBuffer(w)) return decodeManifest(w, serverSignPublicKey);
  verifyManifest(w, serverSignPublicKey);
  const { chunks, signature: _, ...head } = w;
  return { head, chunks: { disk: packRows(chunks.disk), mem: packRows(chunks.mem), state: packRows(chunks.state) } };
}

export type { ManifestHead };

export class ChunkMap {
  manifest?: ManifestHead;
  entries: Record<ChunkKind, ChunkEntries> = { disk: new ChunkEntries(), mem: new ChunkEntries(), state: new ChunkEntries() };
  private imageIdBytes = Buffer.alloc(16);
  /** The draft generation this device's writes are encrypted for, once it has written (or adopted earlier writes). */
  writeGen?: number;
  /** The class each write key came with, by key id. */
  readonly writeCls = new Map<string, Sensitivity>();

  /**
   * Installs a manifest whose signature was checked; dirty chunks in the cache
   * written for `writeGen` override it.
   */
  install(m: PackedManifest, writeGen: number | undefined, cache: ChunkCache): void {
    const head = m.head;
    this.manifest = head;
    this.imageIdBytes = Buffer.from(head.imageId, 'hex');
    this.entries = { disk: new ChunkEntries(m.chunks.disk), mem: new ChunkEntries(m.chunks.mem), state: new ChunkEntries(m.chunks.state) };
    this.writeGen = writeGen;
    // Blobs an earlier map made stale may be this one's: only what this map overrides is marked again below.
    cache.forgetStale();
    const dirty = cache.dirtyChunks(head.imageId);
    // A new device state a suspend wrote (whole: replaceState is one transaction) replaces the version's, at its own size.
    const state = dirty.filter((d) => d.kind === 'state' && d.gen === writeGen).sort((a, b) => a.index - b.index);
    if (state.length > 0) {
      const last = state[state.length - 1];
      this.manifest = { ...head, sizes: { ...head.sizes, state: last.index * CHUNK_SIZE.state + last.len - CHUNK_OVERHEAD } };
      this.entries.state.clear();
    }
    for (const d of dirty) {
      if (d.gen === writeGen && d.cls) {
        // The version's blob of a chunk the draft wrote is stale, as ChunkWriter marks it on a write.
        const base = this.entries[d.kind].get(d.index);
        if (base && base.gen !== d.gen) cache.supersede({ imageId: head.imageId, gen: base.gen, kind: d.kind, index: d.index });
        // Named as its row names it (its seal id): a read checks the blob against that.
        this.entries[d.kind].set(d.index, { gen: d.gen, cls: d.cls, ctHash: d.sha.toString('base64url') });
        continue;
      }
      // Checked in already: the server committed it, and the answer never came back (a crash, a lost link).
      const blob = cache.dirtyBlob(d);
      const sha = blob && sha256(blob);
      if (sha && this.entries[d.kind].get(d.index)?.ctHash === sha.toString('base64url')) cache.markClean(d, d.sha, sha);
    }
  }

  entry(kind: ChunkKind, index: number): Entry | undefined {
    return this.entries[kind].get(index);
  }

  sizeOf(kind: ChunkKind): number {
    return this.manifest?.sizes[kind] ?? 0;
  }

  must(): ManifestHead {
    if (!this.manifest) throw new LetheError('LEASE_EXPIRED', 'no manifest yet: the agent has no lease');
    return this.manifest;
  }

  coord(kind: ChunkKind, index: number, e: Entry): ChunkCoord {
    return { imageId: this.imageIdBytes, gen: e.gen, kind, index, cls: e.cls };
  }

  cacheKey(kind: ChunkKind, index: number, e: Entry): CacheKey {
    return { imageId: this.must().imageId, gen: e.gen, kind, index };
  }

  /** How many plaintext bytes chunk `index` has (the last chunk of an image may be short). */
  plainLength(kind: ChunkKind, index: number): number {
    return Math.min(CHUNK_SIZE[kind], this.must().sizes[kind] - index * CHUNK_SIZE[kind]);
  }
}
