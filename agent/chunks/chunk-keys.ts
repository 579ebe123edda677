// The keys of chunks: sensitive keys released by the server in audited batches,
// write keys for this device's own writes, and class keys of the lease, each
// turned into the one chunk key a read or write needs, in a locked scratch buffer.
import { CHUNK_SIZE, KEY_BYTES, MAX_BATCH, type ChunkKind, type Sensitivity } from '../../common/constants.js';
import { chunkKeyInto } from '../../common/chunk.js';
import { b64u, openSealed, secureBuffer, wipe } from '../../common/crypto.js';
import { LetheError } from '../../common/errors.js';
import type { Identity } from '../keys/identity.js';
import type { KeyRing } from '../keys/keyring.js';
import type { LeaseKeeper } from '../keys/lease-keeper.js';
import type { ChunkRef, Fetcher } from '../remote/fetcher.js';
import { keyId, type ChunkMap, type Entry } from './chunk-map.js';

/** Sensitive keys are asked for in batches: the chunk and its next neighbours not yet held. */
export const KEY_BATCH = 64;

export class ChunkKeys {
  /** The chunk key of the read or write under way; zeroed after each. */
  readonly scratch = secureBuffer(KEY_BYTES);
  private readonly inFlight = new Map<string, Promise<void>>();

  constructor(
    private readonly map: ChunkMap,
    private readonly id: Identity,
    private readonly keys: KeyRing,
    private readonly fetcher: Fetcher,
    private readonly lease: LeaseKeeper,
    private readonly stats: { keyRequests: number },
  ) {}

  /** Whether the ring holds a released or write key for exactly this chunk. */
  holds(kind: ChunkKind, index: number, gen: number): boolean {
    return this.keys.hasSensitiveKey(keyId(kind, index, gen));
  }

  hasClassKey(gen: number): boolean {
    return this.keys.hasClassKey(gen);
  }

  /** Whether a write key for this chunk is on its way. */
  writeKeyPending(kind: ChunkKind, index: number): boolean {
    return this.inFlight.has(`w/${kind}/${index}`);
  }

  /**
   * Fetches sensitive keys for this chunk and, in the same audited request, for
   * chunks likely to be read next that are not yet held or asked for: first
   * `companions` (for guest RAM, the pages evicted after this one: Evictor.evictedAfter),
   * then the next sensitive neighbours by index, up to KEY_BATCH. Concurrent reads
   * share requests: a key already on its way is waited for, not asked for again.
   */
  async fetchSensitive(kind: ChunkKind, index: number, gen: number, companions: readonly number[] = []): Promise<void> {
    const pending = this.inFlight.get(keyId(kind, index, gen));
    if (pending) return pending;
    const chosen = new Set([index]);
    const add = (i: number) => {
      const n = this.map.entries[kind].get(i);
      // A chunk this device wrote is keyed by its write key: the server has no such chunk to release a key for.
      if (!n || n.cls !== 'sensitive' || n.gen === this.map.writeGen || chosen.has(i)) return;
      const id = keyId(kind, i, n.gen);
      if (!this.keys.hasSensitiveKey(id) && !this.inFlight.has(id)) chosen.add(i);
    };
    for (let c = 0; c < companions.length && chosen.size < KEY_BATCH; c++) add(companions[c]);
    for (let i = index + 1; chosen.size < KEY_BATCH && i < index + 4 * KEY_BATCH; i++) add(i);
    const refs = [...chosen].map((i) => ({ kind, index: i }));
    const ids = refs.map((r) => keyId(r.kind, r.index, this.map.entries[r.kind].get(r.index)!.gen));
    const p = this.request(refs, false);
    for (const id of ids) this.inFlight.set(id, p);
    try {
      await p;
    } finally {
      for (const id of ids) this.inFlight.delete(id);
    }
  }

  /**
   * One audited key request (read keys, or write keys with `write`), kept in the
   * ring. An answer that comes after the lease it was asked under ended is wiped,
   * not kept: keys never outlive their lease here.
   */
  private async request(refs: ChunkRef[], write: boolean, stateSize?: number): Promise<void> {
    this.stats.keyRequests++;
    const leaseId = this.lease.leaseId();
    const res = await this.fetcher.keys(refs, write, stateSize);
    const all = openSealed(this.id.box, b64u.decode(res.sealed));
    try {
      if (this.lease.state !== 'active' || this.lease.leaseId() !== leaseId) {
        throw new LetheError('LEASE_EXPIRED', 'the lease ended while keys were on their way; they were dropped');
      }
      const ids = res.chunks.map((c) => {
        const id = keyId(c.kind, c.index, c.gen);
        if (write) {
          this.map.writeGen = c.gen;
          this.map.writeCls.set(id, c.cls);
        }
        return id;
      });
      this.keys.setSensitiveKeys(ids, all.subarray(0, ids.length * KEY_BYTES), write);
    } finally {
      wipe(all);
    }
  }

  /** Whether this device holds the key to encrypt new content of a chunk. */
  hasWriteKey(kind: ChunkKind, index: number): boolean {
    return this.map.writeGen !== undefined && this.keys.hasSensitiveKey(keyId(kind, index, this.map.writeGen));
  }

  /** A chunk's class: the manifest's, or (for a chunk zero so far) the one its write key came with. */
  classOf(kind: ChunkKind, index: number): Sensitivity | undefined {
    const { writeGen } = this.map;
    return this.map.entries[kind].get(index)?.cls ?? (writeGen === undefined ? undefined : this.map.writeCls.get(keyId(kind, index, writeGen)));
  }

  /**
   * Asks for the write keys of these chunks that this device does not hold (one
   * audited request per MAX_BATCH), sharing requests already on their way. With
   * `stateSize`, the lease's draft first takes that device-state size.
   */
  async ensureWriteKeys(kind: ChunkKind, indices: number[], stateSize?: number): Promise<void> {
    const waits: Promise<void>[] = [];
    const todo: number[] = [];
    for (const i of indices) {
      const pending = this.inFlight.get(`w/${kind}/${i}`);
      if (pending) waits.push(pending);
      else if (stateSize !== undefined || !this.hasWriteKey(kind, i)) todo.push(i);
    }
    for (let at = 0; at < todo.length; at += MAX_BATCH) {
      const slice = todo.slice(at, at + MAX_BATCH);
      const p = this.request(
        slice.map((index) => ({ kind, index })),
        true,
        stateSize,
      );
      for (const i of slice) this.inFlight.set(`w/${kind}/${i}`, p);
      waits.push(
        p.finally(() => {
          for (const i of slice) this.inFlight.delete(`w/${kind}/${i}`);
        }),
      );
    }
    await Promise.all(waits);
  }

  /**
   * This chunk, then `companions` (as for fetchSensitive) and its next neighbours
   * by index, up to `limit` in all (within 4 × `limit` indices), without a write
   * key: batched into one audited request, as sensitive keys are.
   */
  writeNeighbours(kind: ChunkKind, index: number, companions: readonly number[] = [], limit = KEY_BATCH): number[] {
    const count = Math.ceil(this.map.sizeOf(kind) / CHUNK_SIZE[kind]);
    const out = new Set([index]);
    const add = (i: number) => {
      if (i < count && !out.has(i) && !this.hasWriteKey(kind, i) && !this.writeKeyPending(kind, i)) out.add(i);
    };
    for (let c = 0; c < companions.length && out.size < limit; c++) add(companions[c]);
    for (let i = index + 1; out.size < limit && i < Math.min(count, index + 4 * limit); i++) add(i);
    return [...out];
  }

  /** Derives the chunk key into `scratch`; false if this device holds no key for it. The caller wipes `scratch`. */
  keyInto(kind: ChunkKind, index: number, e: Entry): boolean {
    // A key held for this very chunk: a released sensitive key, or a write key.
    const held = this.keys.withSensitiveKey(keyId(kind, index, e.gen), (k) => {
      if (!k) return false;
      this.scratch.set(k);
      return true;
    });
    if (held || e.cls === 'sensitive') return held;
    return this.keys.withClassKey(e.gen, (ck) => {
      if (!ck) return false;
      chunkKeyInto(this.scratch, ck, this.map.coord(kind, index, e));
      return true;
    });
  }

  /** Drops this chunk's read key (a sensitive one) and its write key: the ciphertext left is unreadable here. */
  dropFor(kind: ChunkKind, index: number): void {
    const e = this.map.entries[kind].get(index);
    if (e?.cls === 'sensitive') this.keys.dropSensitiveKey(keyId(kind, index, e.gen));
    if (this.map.writeGen !== undefined) this.keys.dropSensitiveKey(keyId(kind, index, this.map.writeGen));
  }

  destroy(): void {
    wipe(this.scratch);
  }
}
