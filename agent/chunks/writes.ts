// This device's writes: a guest write encrypted under its chunk's write key into
// the cache as dirty, a suspend's new device state written whole, and the check-in
// that sends the dirty chunks to the server as a new version.
import { CHUNK_OVERHEAD, CHUNK_SIZE, type ChunkKind } from '../../common/constants.js';
import { chunkSealParts, encryptChunk, encryptChunkInto, sealId } from '../../common/chunk.js';
import { sha256, wipe } from '../../common/crypto.js';
import { crashPoint } from '../../common/crash-point.js';
import { LetheError } from '../../common/errors.js';
import { encodeChunkFrame } from '../../common/frames.js';
import { sealWrite } from '../../native/index.js';
import type { LeaseKeeper } from '../keys/lease-keeper.js';
import { BufferPool } from './buffer-pool.js';
import type { ChunkCache, DirtyChunk, SlotRow } from './cache.js';
import type { CheckedBlobs } from './checked-blobs.js';
import { KEY_BATCH, type ChunkKeys } from './chunk-keys.js';
import { keyId, type ChunkMap, type Entry } from './chunk-map.js';

/** Check-in requests stay under the server's upload limit. */
const CHECKIN_PART_BYTES = 4 * 1024 * 1024;
/**
 * Rounds of a check-in sent while the guest writes on, before its last part goes with
 * writes held: each sends what was written since the one before, until that fits one
 * part or stops shrinking.
 */
const CHECKIN_ROUNDS_MAX = 8;
/**
 * Blob buffers for disk writes sealed off the event loop. A write waits for one when all
 * are out: a copy onto the disk keeps far more writes in flight than libuv's four pool
 * threads can seal at once, and making a 128 KiB buffer for each of them (which glibc
 * fills on malloc and again on free: agent/daemon/harden.ts) cost a first copy 3,000
 * new buffers a GiB, most of its page faults and a major collection after another.
 */
export const SEAL_BUFFERS = 32;

/**
 * The most write keys a run of disk writes asks for at once, ahead of it (64 MiB of the
 * disk). Write keys open nothing the server holds: they encrypt this device's own writes.
 */
export const WRITE_KEYS_AHEAD_MAX = 512;

export interface CheckinClient {
  /** `part`: this request's number among its lease's check-in parts, rising (the server refuses one at or below a part it took). */
  checkin(leaseId: string, frames: Buffer, final: boolean, part?: number): Promise<{ version: number; shared?: boolean }>;
}

export class ChunkWriter {
  constructor(
    private readonly map: ChunkMap,
    private readonly chunkKeys: ChunkKeys,
    private readonly cache: ChunkCache,
    private readonly lease: LeaseKeeper,
    private readonly checked: CheckedBlobs,
    private readonly stats: { writes: number },
    /** Told of a chunk whose entry a write replaced, before the write resolves. */
    private readonly changed?: (kind: ChunkKind, index: number) => void,
  ) {}

  /**
   * A guest write: encrypts `data` under this chunk's write key (asked for
   * once per chunk, audited) and stores it in the cache as dirty. Throws
   * BAD_REQUEST for a write that does not fit the chunk.
   */
  async write(kind: ChunkKind, index: number, data: Buffer): Promise<void> {
    const held = this.enter();
    if (held) await held;
    try {
      await this.writeNow(kind, index, data);
    } finally {
      this.leave();
    }
  }

  private async writeNow(kind: ChunkKind, index: number, data: Buffer): Promise<void> {
    await this.lease.whenActive();
    const expect = this.map.plainLength(kind, index);
    if (index < 0 || expect <= 0 || data.length !== expect) {
      throw new LetheError('BAD_REQUEST', `write of ${data.length} bytes to ${kind} chunk ${index} does not fit (expected ${Math.max(expect, 0)})`);
    }
    // A disk written once is often written on: the first write key comes with those of
    // the next chunks without one, in one audited request, as guest RAM's do.
    const k = this.chunkKeys;
    const batch = kind === 'disk' && !k.hasWriteKey(kind, index) && !k.writeKeyPending(kind, index) ? k.writeNeighbours(kind, index) : [index];
    await k.ensureWriteKeys(kind, batch);
    if (kind === 'disk') {
      this.writeKeysAhead(kind, index);
      this.writing.add(index);
      try {
        const w = await this.storeOffLoop(kind, index, data);
        try {
          this.adopt(kind, index, w);
        } finally {
          // Memory keeps a copy of the blob, if it keeps it at all.
          this.keepSealBuffer(w.buf);
        }
      } finally {
        this.writing.delete(index);
      }
      return;
    }
    // Stored and adopted in one turn: the blob can live in the one scratch buffer.
    this.adopt(kind, index, this.store(kind, index, data, this.blobScratch));
  }

  /**
   * A run of disk writes (this chunk's predecessor written under this lease, or being
   * written) asks for the next write keys once it is half way through the window it
   * holds, so that a copy onto the disk does not stop for a round trip to the server.
   * The window grows with the run: one batch, doubled for each of the chunks one, two
   * and four batches back that this lease wrote, up to WRITE_KEYS_AHEAD_MAX. A copy of
   * a gigabyte from its start then makes about 20 audited requests instead of 128, and
   * none of its writes waits for one; a journal rewriting a few chunks asks for nothing
   * more than its own batch. A failure is not reported here: a write that waits for that
   * request fails with it, as it would have with its own. The run asks ahead again only
   * a second later, so that a server refusing it does not get a request of up to 512
   * keys for every write.
   */
  private writeKeysAhead(kind: ChunkKind, index: number): void {
    const k = this.chunkKeys;
    const gen = this.map.writeGen;
    const entries = this.map.entries[kind];
    const written = (i: number) => this.writing.has(i) || (i >= 0 && entries.get(i)?.gen === gen);
    if (gen === undefined || !written(index - 1) || Date.now() < this.aheadRetryAt) return;
    let window = KEY_BATCH;
    while (window < WRITE_KEYS_AHEAD_MAX && written(index - window)) window *= 2;
    const ahead = index + window / 2;
    if (ahead * CHUNK_SIZE[kind] >= this.map.sizeOf(kind) || k.hasWriteKey(kind, ahead) || k.writeKeyPending(kind, ahead)) return;
    // The window's keys from the first chunk after this one without a key, not from `ahead`:
    // a run's writes finish out of order, and the chunks between were left to ask for alone.
    const want = k.writeNeighbours(kind, index, [], window + 1).slice(1); // [0] is this chunk's, held
    k.ensureWriteKeys(kind, want).catch(() => (this.aheadRetryAt = Date.now() + 1000));
  }

  /** When a run may ask for keys ahead again after such a request failed. */
  private aheadRetryAt = 0;

  /** The disk chunks being written now (writeKeysAhead: a run's writes may finish out of order). */
  private readonly writing = new Set<number>();

  /** Buffers for blobs sealed off the event loop: ciphertext only, so plain memory, not locked or wiped. */
  private readonly sealBuffers = new BufferPool(SEAL_BUFFERS, CHUNK_SIZE.disk + CHUNK_OVERHEAD, { ciphertextOnly: true });

  /**
   * store() of a disk chunk with its work on a libuv pool thread (native sealWrite):
   * the encryption and the slot write, which were four fifths of the event loop's time
   * in a stream of guest writes. The chunk key is derived here and copied by the call;
   * the cache's row is written here once the blob stands, named by its seal id.
   */
  private async storeOffLoop(kind: ChunkKind, index: number, data: Buffer): Promise<{ e: Entry; blob: Buffer; borrowed: true; buf: Buffer }> {
    const buf = await this.sealBuffers.take();
    const slot = this.cache.reserve(kind);
    let e: Entry;
    let blob: Buffer;
    try {
      let sealed: Promise<void>;
      try {
        e = this.writeEntry(kind, index);
        const parts = chunkSealParts(buf, this.map.coord(kind, index, e), data.length);
        blob = parts.blob;
        sealed = sealWrite(this.cache.slotFd(kind), slot.at, this.chunkKeys.scratch, parts.nonce, parts.ad, data, blob);
      } finally {
        wipe(this.chunkKeys.scratch); // the call copied the key
      }
      await sealed;
    } catch (err) {
      this.cache.unreserve(kind, slot.slot);
      this.keepSealBuffer(buf);
      throw err;
    }
    const hash = sealId(blob);
    e.ctHash = hash.toString('base64url');
    try {
      // A group that fails to commit frees its slots itself.
      await this.commitSoon({ k: this.map.cacheKey(kind, index, e), slot: slot.slot, len: blob.length, sha: hash, dirty: true, cls: e.cls });
    } catch (err) {
      this.keepSealBuffer(buf);
      throw err;
    }
    return { e, blob, borrowed: true, buf };
  }

  private keepSealBuffer(buf: Buffer): void {
    this.sealBuffers.give(buf);
  }

  /** Sealed writes' index rows waiting for this turn's transaction, each with its write's resolvers. */
  private rows: { row: SlotRow; done: () => void; fail: (e: unknown) => void }[] = [];

  /**
   * The index row of a sealed write, committed with the rows of the other writes whose
   * seals came back in the same turn: one WAL write for them all (a row each was a
   * tenth of the event loop in a stream of writes). Resolves once the row stands.
   */
  private commitSoon(row: SlotRow): Promise<void> {
    return new Promise((done, fail) => {
      if (this.rows.push({ row, done, fail }) > 1) return;
      setImmediate(() => {
        const rows = this.rows;
        this.rows = [];
        try {
          this.cache.commitMany(rows.map((r) => r.row));
        } catch (e) {
          for (const r of rows) r.fail(e);
          return;
        }
        for (const r of rows) r.done();
      });
    });
  }

  /**
   * A guest write's blob, encrypted here and written to the cache file at once: one
   * buffer for them all, not a new 128 KiB one a write for the collector (a copy onto
   * the disk spent a fifth of its time collecting them). Kept blobs are copied out.
   */
  private readonly blobScratch = Buffer.allocUnsafe(Math.max(...Object.values(CHUNK_SIZE)) + CHUNK_OVERHEAD);

  /** Encrypts a write under its write key (held) into the cache as dirty (into `into` if given); the caller adopts it once it stands. */
  private store(kind: ChunkKind, index: number, data: Buffer, into?: Buffer): { e: Entry; blob: Buffer; borrowed?: boolean } {
    const e = this.writeEntry(kind, index);
    const scratch = this.chunkKeys.scratch;
    try {
      const coord = this.map.coord(kind, index, e);
      const blob = into ? encryptChunkInto(into, scratch, coord, data) : encryptChunk(scratch, coord, data);
      const hash = sealId(blob);
      e.ctHash = hash.toString('base64url');
      this.cache.put(this.map.cacheKey(kind, index, e), blob, true, e.cls, hash);
      return { e, blob, borrowed: into !== undefined };
    } finally {
      wipe(scratch);
    }
  }

  /**
   * The entry a write of this chunk makes in the lease's draft generation, with its
   * write key (held) derived into the chunk keys' scratch, which the caller wipes.
   * Throws LEASE_EXPIRED when the key is gone.
   */
  private writeEntry(kind: ChunkKind, index: number): Entry {
    const gen = this.map.writeGen!;
    const e: Entry = { gen, cls: this.map.writeCls.get(keyId(kind, index, gen))!, ctHash: '' };
    if (!this.chunkKeys.keyInto(kind, index, e)) throw new LetheError('LEASE_EXPIRED', `no write key for ${kind} chunk ${index}: the lease ended`);
    return e;
  }

  private adopt(kind: ChunkKind, index: number, w: { e: Entry; blob: Buffer; borrowed?: boolean }): void {
    const old = this.map.entries[kind].get(index);
    this.map.entries[kind].set(index, w.e);
    this.changed?.(kind, index);
    // Encrypted here, so checked: a read of part of it decrypts only that part. It takes
    // the place in memory of the blob it replaces, if that one had a place: a chunk the
    // guest keeps reading stays there, and a long run of writes (a copy onto the disk)
    // does not fill memory with blobs nobody has read.
    const oldId = old && keyId(kind, index, old.gen);
    const kept = oldId !== undefined && this.checked.has(oldId);
    if (oldId !== undefined) this.checked.delete(oldId);
    if (kind === 'disk' && kept) this.checked.put(keyId(kind, index, w.e.gen), w.e.ctHash, w.blob, { borrowed: w.borrowed });
    // The version's blob the draft's first write of a chunk replaces is stale: the cache
    // drops it once this write is durable, and a later write takes its slot.
    if (old && old.gen !== w.e.gen) this.cache.supersede(this.map.cacheKey(kind, index, old));
    this.stats.writes++;
  }

  /**
   * Replaces the device state with `state` (a suspend's new one, of any size):
   * the draft takes its size, and every chunk of it is written as dirty, in one
   * cache transaction: a crash leaves the old state or the whole new one.
   */
  async replaceState(state: Buffer): Promise<void> {
    // Its parts so far hold the state it would replace; a suspend writes its state before it checks in.
    if (this.checkingIn) throw new LetheError('CONFLICT', 'a check-in is under way: try the suspend again once it is done');
    const held = this.enter();
    if (held) await held;
    try {
      await this.replaceStateNow(state);
    } finally {
      this.leave();
    }
  }

  private async replaceStateNow(state: Buffer): Promise<void> {
    const m = this.map.must();
    if (state.length === 0) throw new LetheError('BAD_REQUEST', 'an empty device state cannot replace the image\'s');
    await this.lease.whenActive();
    const count = Math.ceil(state.length / CHUNK_SIZE.state);
    await this.chunkKeys.ensureWriteKeys('state', Array.from({ length: count }, (_, i) => i), state.length);
    const gen = this.map.writeGen!;
    const written = this.cache.batch(() => {
      // Dirty chunks of a larger state an earlier (failed) suspend wrote would be checked in past the end.
      for (const d of this.cache.dirtyChunks(m.imageId)) if (d.kind === 'state' && d.gen === gen && d.index >= count) this.cache.drop(d);
      return Array.from({ length: count }, (_, i) => {
        const w = this.store('state', i, state.subarray(i * CHUNK_SIZE.state, Math.min((i + 1) * CHUNK_SIZE.state, state.length)));
        crashPoint('agent.state-chunk-written');
        return w;
      });
    });
    this.map.manifest = { ...m, sizes: { ...m.sizes, state: state.length } };
    for (const index of [...this.map.entries.state.keys()]) if (index >= count) this.map.entries.state.delete(index);
    written.forEach((w, i) => this.adopt('state', i, w));
  }

  /**
   * Uploads this lease's dirty chunks; the server checks each and commits
   * them as a new version, this device's own unless `shared` (docs/branches.md),
   * and this lease ends there. Marks them clean once committed, then runs
   * `moveLease` (to a lease on the new version) before guest writes go on.
   *
   * The guest may write on meanwhile. The bulk goes up in parts while it does, in
   * rounds, each sending what was written (again) since the one before; the last part,
   * which commits, goes with new writes held and those under way finished, so that the
   * version holds every write that came before it and none is left behind in a draft
   * nobody sends. A write held then waits for the new lease (a write key of its draft).
   */
  async checkin(client: CheckinClient, moveLease?: (r: CheckinResult) => Promise<void>): Promise<CheckinResult> {
    const m = this.map.must();
    const gen = this.map.writeGen;
    const mine = () => (gen === undefined ? [] : this.cache.dirtyChunks(m.imageId).filter((d) => d.gen === gen));
    if (this.checkingIn) throw new LetheError('CONFLICT', 'a check-in is already under way');
    if (mine().length === 0) throw new LetheError('BAD_REQUEST', 'nothing to check in: no chunk was written since the last check-in');
    this.checkingIn = true;
    try {
      const leaseId = this.lease.leaseId();
      // What the server holds of each chunk so far: the name of the blob sent (a seal id) and the SHA-256 the version names it by.
      const sent = new Map<string, { d: DirtyChunk; sha: Buffer }>();
      const unsent = () => mine().filter((d) => !sent.get(keyId(d.kind, d.index, d.gen))?.d.sha.equals(d.sha));
      // Rounds while what is left does not fit one part and keeps shrinking (a guest writing faster than the link stops them).
      for (let round = 0, left = Infinity; round < CHECKIN_ROUNDS_MAX; round++) {
        const todo = unsent();
        const bytes = todo.reduce((n, d) => n + d.len, 0);
        if (bytes <= CHECKIN_PART_BYTES || bytes >= left) break;
        left = bytes;
        await this.sendParts(client, leaseId, todo, sent, false);
      }
      const release = await this.holdWrites();
      try {
        const result = await this.sendParts(client, leaseId, unsent(), sent, true);
        crashPoint('agent.checkin-committed');
        for (const { d, sha } of sent.values()) {
          this.cache.markClean(d, d.sha, sha);
          const e = this.map.entries[d.kind].get(d.index);
          if (e?.gen === d.gen && e.ctHash === d.sha.toString('base64url')) e.ctHash = sha.toString('base64url');
        }
        this.cache.flush();
        this.map.writeGen = undefined;
        const chunks = [...sent.values()];
        // A server from before device branches made every check-in shared.
        const r = { version: result.version, shared: result.shared ?? true, chunks: chunks.length, bytes: chunks.reduce((n, c) => n + c.d.len, 0) };
        try {
          await moveLease?.(r);
        } catch (e) {
          // The version stands: say so with why the lease stays behind (a held write goes on and fails with the ended lease, or waits for the next).
          const why = e instanceof Error ? e.message : String(e);
          throw new LetheError(e instanceof LetheError ? e.code : 'INTERNAL', `checked in ${r.chunks} chunk(s) as version ${r.version}, but the lease did not move to it: ${why}`, { cause: e });
        }
        return r;
      } finally {
        release();
      }
    } finally {
      this.checkingIn = false;
    }
  }

  /**
   * Sends these dirty chunks in parts under the server's upload limit, the last with
   * `final` (which commits: one part, empty if nothing is left). Each blob is read
   * from the cache as its part is made, and its SHA-256 taken then (the version names
   * it by that, where the cache named it by its seal id). A chunk written again since
   * it was listed is left to the next round.
   */
  private async sendParts(client: CheckinClient, leaseId: string, todo: DirtyChunk[], sent: Map<string, { d: DirtyChunk; sha: Buffer }>, final: boolean) {
    let part: Buffer[] = [];
    let bytes = 0;
    let result: { version: number; shared?: boolean } | undefined;
    for (let i = 0; i <= todo.length; i++) {
      const d = todo[i];
      const blob = d && this.cache.dirtyBlob(d);
      if (blob) {
        sent.set(keyId(d.kind, d.index, d.gen), { d, sha: sha256(blob) });
        part.push(...encodeChunkFrame(d.kind, d.index, blob));
        bytes += blob.length + 13;
      }
      const last = i === todo.length;
      if ((last && (final || bytes > 0)) || bytes >= CHECKIN_PART_BYTES) {
        result = await client.checkin(leaseId, Buffer.concat(part), last && final, this.nextPart(leaseId));
        if (!(last && final)) crashPoint('agent.checkin-part-sent');
        part = [];
        bytes = 0;
      }
    }
    return result!;
  }

  /** A check-in is under way (one at a time). */
  private checkingIn = false;

  /**
   * The number of a lease's next check-in part: 1, 2, … across all its check-ins, so
   * that a part that outlived a later one (on another replica) is refused, not applied
   * over it. A lease is this process's own: a new one (the server adopting the draft
   * for it) starts again from 1.
   */
  private nextPart(leaseId: string): number {
    if (this.parts.leaseId !== leaseId) this.parts = { leaseId, sent: 0 };
    return ++this.parts.sent;
  }

  private parts = { leaseId: '', sent: 0 };

  /** Guest writes under way, and the hold a check-in's last part puts on new ones. */
  private active = 0;
  private held?: Promise<void>;
  private drained?: () => void;

  /** Waits for a hold on writes to end (no wait when there is none), and counts this write as under way until `leave`. */
  private enter(): Promise<void> | undefined {
    if (!this.held) return void this.active++;
    return this.held.then(() => this.enter());
  }

  private leave(): void {
    if (--this.active === 0) this.drained?.();
  }

  /** Holds new writes and waits for those under way; the function returned lets them go on. */
  private async holdWrites(): Promise<() => void> {
    let open!: () => void;
    this.held = new Promise<void>((r) => (open = r));
    if (this.active > 0) await new Promise<void>((r) => (this.drained = r));
    this.drained = undefined;
    return () => {
      this.held = undefined;
      open();
    };
  }
}

export type CheckinResult = { version: number; shared: boolean; chunks: number; bytes: number };
