// The device's chunk cache: ciphertext exactly as the server sent it, plus
// dirty chunks the device encrypted itself. Never plaintext (invariant 1).
//
// The blobs live in one slot file per chunk kind (cache-disk.blobs, …: a blob a slot,
// at slot × slot size), so a warm read is an index lookup in memory and one pread. The
// index — which chunk is in which slot, its SHA-256 (a dirty blob's seal id until its
// check-in: common/chunk.ts), dirty or not, when last used — is SQLite (cache.db, WAL),
// in memory while the cache is open.
//
// Crash safety. A blob is written to a free slot first, then its row commits, so a
// crash leaves the old row or the new one, never a row over a half-written slot
// that was in use: a changed chunk always goes to a new slot. The slot a chunk leaves
// is reused only after the index is synced, and the slot files before it whenever a
// dirty blob went in since their last fsync (the next flush(), or settleHeld() in
// the background once 16 MiB are held): until then the old row may be what a power
// cut brings back. Only a guest write needs its bytes synced: a server blob a power
// cut loses fails its check, like a row whose slot holds something else (disk damage,
// a slot shared after a power cut), and is dropped and fetched again, never served.
// A version's clean blob a draft write made stale goes once that write is durable, by
// the same syncs (supersede()). A cache opened with dirty rows syncs at its first flush.
// Bounded: clean chunks are evicted least recently used first, their slots punched out
// (a stale blob's is not: the next writes take it); dirty chunks never are (they are
// the only copy of a guest write until it is checked in).
import Database from 'better-sqlite3';
import fs from 'node:fs';
import path from 'node:path';
import { CHUNK_KINDS, type ChunkKind, type Sensitivity } from '../../common/constants.js';
import { sha256 } from '../../common/crypto.js';
import { punchHole } from '../../native/index.js';
import { cacheQueries, indexEntries, migrateRowsWithData, namesBlob, PAGE, SCHEMA, SLOT_BYTES, slotFile, type CacheKey, type CacheStats, type DirtyChunk, type Entry, type SlotRow } from './cache-layout.js';
import { settleHeld, Slots } from './slots.js';

export { cacheFiles, slotFile, SLOT_BYTES, type CacheKey, type CacheStats, type DirtyChunk, type SlotRow } from './cache-layout.js';

export class ChunkCache {
  private readonly db: Database.Database;
  private readonly q;
  private readonly fds = {} as Record<ChunkKind, number>;
  private readonly slots = {} as Record<ChunkKind, Slots>;
  private readonly index = new Map<string, Entry>();
  private readonly imageNumbers = new Map<string, number>();
  /** The clean entries, least recently used first (a use moves one to the end): what trim() evicts, in order. */
  private readonly cleanOrder = new Map<string, Entry>();
  private bytes = 0;
  private dirtyCount = 0;
  private unsynced = false; // a dirty blob was written since the slot files' last fsync
  private settling?: Promise<void>; // settleHeld() under way
  /** Clean entries writes made stale (supersede()), dropped once those writes are durable; and their bytes. */
  private stale = new Set<Entry>();
  private staleBytes = 0;
  /** Moved on by forgetStale(): a settle that began before drops nothing. */
  private staleEpoch = 0;
  private closed = false;
  /** Monotonic use counter; persisted with each write, refreshed in memory on reads. */
  private tick = 0;
  private readonly touched = new Set<Entry>();
  private readonly counters = { hits: 0, misses: 0, evicted: 0, damaged: 0, slotSyncs: 0 };
  /** Told of every key whose index entry is replaced or dropped, as it happens (before its slot can be reused): the native disk-read table forgets what it read there. */
  onReplace?: (k: CacheKey) => void;
  /** Told of each blob that is the cached blob of its key once that stands (its transaction committed): where it lies, its length and name (Entry.sha). Must not throw. */
  onStored?: (k: CacheKey, at: number, len: number, sha: Buffer, dirty: boolean) => void;
  /** The transaction under way (batch): how to undo its index changes, and what to release once it commits. */
  private tx: { undo: (() => void)[]; onCommit: (() => void)[] } | null = null;

  constructor(
    readonly file: string,
    readonly limitBytes: number,
  ) {
    this.db = new Database(file);
    this.db.pragma('journal_mode = WAL');
    // A cache entry lost to power failure is fetched again; dirty writes go
    // through flush(), which makes them durable.
    this.db.pragma('synchronous = NORMAL');
    this.db.exec(SCHEMA);
    for (const kind of CHUNK_KINDS) {
      this.fds[kind] = fs.openSync(slotFile(file, kind), fs.constants.O_RDWR | fs.constants.O_CREAT, 0o600);
      this.slots[kind] = new Slots();
    }
    this.q = cacheQueries(this.db);
    migrateRowsWithData(this.db, this.fds, SLOT_BYTES, this.q.put);
    this.load();
  }

  static inHome(home: string, limitBytes: number): ChunkCache {
    return new ChunkCache(path.join(home, 'cache.db'), limitBytes);
  }

  /** An entry's key in the maps: the image by its number here, so that a million ids are short strings. */
  private id(k: CacheKey): string {
    let n = this.imageNumbers.get(k.imageId);
    if (n === undefined) this.imageNumbers.set(k.imageId, (n = this.imageNumbers.size));
    return `${n}/${k.gen}/${k.kind}/${k.index}`;
  }

  /** The index into memory, and the free slots. Two rows on one slot (a power cut): the one its bytes match stays. */
  private load(): void {
    // Dirty rows first: of two rows on one slot, a clean one never displaces a dirty one whose bytes are there.
    const bySlot = Object.fromEntries(CHUNK_KINDS.map((k) => [k, new Map<number, Entry>()])) as Record<ChunkKind, Map<number, Entry>>;
    const doomed: Entry[] = []; // deleted once the rows are read: not while SQLite iterates them
    for (const e of indexEntries(this.db)) {
      const other = bySlot[e.key.kind].get(e.slot);
      if (other && (this.matches(other) || !this.matches(e))) {
        doomed.push(e);
        continue;
      }
      if (other) {
        doomed.push(other);
        this.index.delete(this.id(other.key));
        this.account(other, -1);
      }
      bySlot[e.key.kind].set(e.slot, e);
      const id = this.id(e.key);
      this.index.set(id, e);
      this.account(e, 1, id);
      this.tick = Math.max(this.tick, e.used);
    }
    for (const e of doomed) this.q.del.run(e.key.imageId, e.key.gen, e.key.kind, e.key.index);
    for (const kind of CHUNK_KINDS) this.slots[kind].rebuild(bySlot[kind]);
    this.unsynced = this.dirtyCount > 0; // a guest write an agent crash left unflushed may be in the page cache only
  }

  private account(e: Entry, sign: 1 | -1, id = this.id(e.key)): void {
    this.bytes += sign * e.len;
    if (e.dirty) this.dirtyCount += sign;
    if (sign < 0 || e.dirty) this.cleanOrder.delete(id);
    else this.cleanOrder.set(id, e);
  }

  /** Whether the slot holds the bytes the row names. */
  private matches(e: Entry): boolean {
    return namesBlob(e, this.readSlot(e));
  }

  /** Bytes [at, at + len) of an entry's blob from its slot (all of it by default), into `into` when large enough. */
  private readSlot(e: Entry, into?: Buffer, at = 0, len = e.len - at): Buffer | undefined {
    if (at + len > e.len) return undefined;
    const data = into && into.length >= len ? into.subarray(0, len) : Buffer.allocUnsafe(len);
    const n = fs.readSync(this.fds[e.key.kind], data, 0, len, e.slot * SLOT_BYTES[e.key.kind] + at);
    return n === len ? data : undefined;
  }

  /** The cached blob, or undefined. A damaged entry is dropped and reported as a miss. */
  get(k: CacheKey): Buffer | undefined {
    return this.getWithHash(k)?.data;
  }

  /**
   * The cached blob and its stored name (Entry.sha). With `verify` false it is not checked
   * against the data: the caller compares it to the chunk map's and lets the AEAD
   * tag catch damaged data (then drop() and fetch). With `into` (large enough) the blob
   * is read into it, and the data is a view of it.
   */
  getWithHash(k: CacheKey, verify = true, into?: Buffer): { data: Buffer; sha256: Buffer } | undefined {
    const e = this.index.get(this.id(k));
    const data = e && this.readSlot(e, into);
    if (!e || !data || (verify && !namesBlob(e, data))) {
      if (e) {
        this.drop(k);
        this.counters.damaged++;
      }
      this.counters.misses++;
      return undefined;
    }
    this.used(this.id(k), e);
    return { data, sha256: e.sha };
  }

  /** Bytes [at, at + into.length) of a cached blob into `into`, not checked (the caller checks its pieces); false when not cached, or shorter. */
  readPart(k: CacheKey, at: number, into: Buffer): boolean {
    const id = this.id(k);
    const e = this.index.get(id);
    if (!e || !this.readSlot(e, into, at, into.length)) {
      this.counters.misses++;
      return false;
    }
    this.used(id, e);
    return true;
  }

  /** A hit: the entry is the most recently used. */
  private used(id: string, e: Entry): void {
    this.counters.hits++;
    e.used = ++this.tick;
    this.touched.add(e);
    if (!e.dirty) {
      this.cleanOrder.delete(id);
      this.cleanOrder.set(id, e);
    }
  }

  /**
   * Stores a blob (server ciphertext, or a dirty chunk the device encrypted), then trims
   * to the limit. `hash` names it (Entry.sha) when given; else its SHA-256 does.
   */
  put(k: CacheKey, blob: Buffer, dirty = false, cls?: Sensitivity, hash?: Buffer): void {
    this.store(k, blob, dirty, cls, hash);
    if (this.bytes > this.limitBytes) this.trim();
  }

  /**
   * Stores clean blobs in one transaction, then trims: a prefetch batch costs one
   * commit, not one a chunk (each commit is a WAL write that holds the event loop).
   */
  putMany(items: { k: CacheKey; blob: Buffer; hash?: Buffer }[]): void {
    this.batch(() => {
      for (const { k, blob, hash } of items) this.store(k, blob, false, undefined, hash);
    });
    if (this.bytes > this.limitBytes) this.trim();
  }

  /** Runs `fn` as one transaction: every write in it stands, or (a throw, a crash) none does. */
  batch<T>(fn: () => T): T {
    if (this.tx) return fn(); // nested: part of the outer transaction
    const tx = { undo: [] as (() => void)[], onCommit: [] as (() => void)[] };
    this.tx = tx;
    try {
      const r = this.db.transaction(fn)();
      this.tx = null;
      for (const f of tx.onCommit) f();
      return r;
    } catch (e) {
      this.tx = null;
      for (const f of tx.undo.reverse()) f();
      throw e;
    }
  }

  private store(k: CacheKey, blob: Buffer, dirty: boolean, cls: Sensitivity | undefined, hash: Buffer | undefined): void {
    if (blob.length > SLOT_BYTES[k.kind]) throw new RangeError(`a ${k.kind} blob of ${blob.length} bytes does not fit a ${SLOT_BYTES[k.kind]}-byte slot`);
    const slot = this.reserve(k.kind);
    try {
      fs.writeSync(this.fds[k.kind], blob, 0, blob.length, slot.at);
    } catch (err) {
      this.unreserve(k.kind, slot.slot);
      throw err;
    }
    this.commit({ k, slot: slot.slot, len: blob.length, sha: hash ?? sha256(blob), dirty, cls });
  }

  /**
   * A free slot for a blob of `kind` that someone else writes (a guest write sealed
   * off the event loop: native sealWrite), and where it starts in slotFd(kind). Then
   * commitMany() names the blob in it, or unreserve() gives it back.
   */
  reserve(kind: ChunkKind): { slot: number; at: number } {
    const slot = this.slots[kind].take();
    return { slot, at: slot * SLOT_BYTES[kind] };
  }

  unreserve(kind: ChunkKind, slot: number): void {
    this.slots[kind].give(slot, false);
  }

  /** A blob written whole into a reserved slot becomes the cached blob of its key (as put() with it would). */
  private commit({ k, slot, len, sha, dirty, cls }: SlotRow): void {
    try {
      if (len > SLOT_BYTES[k.kind]) throw new RangeError(`a ${k.kind} blob of ${len} bytes does not fit a ${SLOT_BYTES[k.kind]}-byte slot`);
      const e: Entry = { key: { ...k }, slot, len, sha, dirty, cls: cls ?? null, used: ++this.tick };
      this.unsynced ||= dirty;
      this.q.put.run(k.imageId, k.gen, k.kind, k.index, slot, e.len, e.sha, dirty ? 1 : 0, e.cls, e.used);
      this.replace(this.id(k), e);
    } catch (err) {
      this.unreserve(k.kind, slot);
      throw err;
    }
  }

  /** commit() of several reserved slots in one transaction (one WAL write), then a trim: all stand, or none. */
  commitMany(rows: SlotRow[]): void {
    let i = 0;
    try {
      this.batch(() => {
        for (; i < rows.length; i++) this.commit(rows[i]);
      });
    } catch (e) {
      // The rows before the failing one gave their slots back with the transaction, the failing one in commit(); these were never reached.
      for (let j = i + 1; j < rows.length; j++) this.unreserve(rows[j].k.kind, rows[j].slot);
      throw e;
    }
    if (this.bytes > this.limitBytes) this.trim();
  }

  /** Points `id` at `e` (or at nothing) in memory; the entry it replaces gives its slot back once that stands (release()). */
  private replace(id: string, e: Entry | undefined, punch = true): void {
    const prev = this.index.get(id);
    if (prev) this.onReplace?.(prev.key);
    if (e) this.index.set(id, e);
    else this.index.delete(id);
    if (prev) this.account(prev, -1, id);
    if (e) this.account(e, 1, id);
    if (prev) this.touched.delete(prev);
    const release = () => prev && this.release(prev, punch);
    const stored = () => e && this.index.get(id) === e && this.onStored?.(e.key, e.slot * SLOT_BYTES[e.key.kind], e.len, e.sha, e.dirty);
    if (!this.tx) return void (release(), stored());
    this.tx.onCommit.push(release, stored);
    this.tx.undo.push(() => {
      if (e) this.account(e, -1, id);
      if (prev) this.account(prev, 1, id);
      if (prev) this.index.set(id, prev);
      else this.index.delete(id);
      if (e) this.slots[e.key.kind].give(e.slot, false);
    });
  }

  /**
   * A slot no row names any more: a dirty chunk's waits for the next flush; a clean
   * one is free at once, its whole pages punched out unless `punch` is false (a slot
   * the next writes will take: writing into pages the page cache holds is cheaper).
   */
  private release(e: Entry, punch: boolean): void {
    const { kind } = e.key;
    if (e.dirty) {
      this.slots[kind].give(e.slot, true);
      this.settleSoon();
      return;
    }
    const from = Math.ceil((e.slot * SLOT_BYTES[kind]) / PAGE) * PAGE;
    const to = Math.floor(((e.slot + 1) * SLOT_BYTES[kind]) / PAGE) * PAGE;
    // Disk space only: a file system without hole punching keeps the bytes until the slot is reused.
    if (punch && to > from) {
      try {
        punchHole(this.fds[kind], from, to - from);
      } catch {
        // the slot is reused all the same
      }
    }
    this.slots[kind].give(e.slot, false);
  }

  /**
   * A clean blob a write made stale: its chunk now lives in a newer generation (a
   * version's chunk the draft overwrote). The chunk map no longer names it, but it stays until
   * the write that replaced it is durable (the next flush, or a settle, which it
   * counts towards), so that a power cut before then still finds the old bytes. It is
   * then dropped, and its slot is reused without being punched out: a copy onto the
   * disk writes into pages the page cache already holds instead of growing the file.
   * A new chunk map (forgetStale()) cancels what was marked before it.
   */
  supersede(k: CacheKey): void {
    const e = this.index.get(this.id(k));
    if (!e || e.dirty || this.stale.has(e)) return;
    this.stale.add(e);
    this.staleBytes += e.len;
    this.settleSoon();
  }

  /** settleHeld() once the held slots and the stale blobs are worth it, then the stale blobs dropped. */
  private settleSoon(): void {
    if (this.settling) return;
    const stale = this.stale;
    const epoch = this.staleEpoch;
    const settled = settleHeld(this.slots, this.fds, SLOT_BYTES, `${this.file}-wal`, this.staleBytes);
    if (!settled) return;
    this.stale = new Set();
    this.staleBytes = 0;
    this.settling = settled
      .then((durable) => {
        if (epoch !== this.staleEpoch) return;
        if (durable) this.dropStale(stale);
        else for (const e of stale) this.supersede(e.key); // the next flush or settle tries again
      })
      .finally(() => (this.settling = undefined));
  }

  /** Resolves once the settle under way, if any, is done. */
  settled(): Promise<void> {
    return this.settling ?? Promise.resolve();
  }

  /** Forgets every stale mark (a new chunk map may name those blobs again), those a settle under way holds too. */
  forgetStale(): void {
    this.staleEpoch++;
    this.stale = new Set();
    this.staleBytes = 0;
  }

  /**
   * Drops the stale entries still as they were (evicted or written since: left alone), their slots not
   * punched. Never throws: a stale blob is only a clean row too many, as a closed cache or a failing database leaves it.
   */
  private dropStale(stale: Set<Entry>): void {
    if (this.closed || stale.size === 0) return;
    try {
      this.batch(() => {
        for (const e of stale) {
          const id = this.id(e.key);
          if (this.index.get(id) !== e || e.dirty) continue;
          this.q.del.run(e.key.imageId, e.key.gen, e.key.kind, e.key.index);
          this.replace(id, undefined, false);
        }
      });
    } catch {
      // left as clean rows, evicted in their turn
    }
  }

  /** Drops one entry (a damaged one, or a clean one the caller knows is stale). */
  drop(k: CacheKey): void {
    const id = this.id(k);
    if (!this.index.has(id)) return;
    this.q.del.run(k.imageId, k.gen, k.kind, k.index);
    this.replace(id, undefined);
  }

  /** Writes remembered read times, then evicts clean chunks, oldest first, until under the limit. */
  private trim(): void {
    this.batch(() => {
      for (const e of this.cleanOrder.values()) {
        if (this.bytes <= this.limitBytes) break;
        this.drop(e.key);
        this.counters.evicted++;
      }
    });
  }

  private persistTouches(): void {
    if (this.touched.size === 0) return;
    this.db.transaction(() => {
      for (const e of this.touched) this.q.touch.run(e.used, e.key.imageId, e.key.gen, e.key.kind, e.key.index);
    })();
    this.touched.clear();
  }

  /** Makes every write so far durable: the slot files (when a dirty blob went in since their last fsync), then the index (fsync of the WAL). */
  flush(): void {
    if (this.unsynced) {
      for (const kind of CHUNK_KINDS) fs.fsyncSync(this.fds[kind]);
      this.counters.slotSyncs++;
    }
    this.unsynced = false;
    this.persistTouches();
    this.db.pragma('wal_checkpoint(FULL)');
    for (const kind of CHUNK_KINDS) this.slots[kind].flushed();
    const stale = this.stale;
    this.stale = new Set();
    this.staleBytes = 0;
    this.dropStale(stale);
  }

  /** Where a cached blob starts in its kind's slot file (slotFd), its length and stored name (to compare with the chunk map's); undefined when it is not cached. */
  place(k: CacheKey): { at: number; len: number; sha: Buffer } | undefined {
    const e = this.index.get(this.id(k));
    return e && { at: e.slot * SLOT_BYTES[k.kind], len: e.len, sha: e.sha };
  }

  /** place() of every cached blob of an image's kind, of any generation, in the index's order. */
  *placesOf(imageId: string, kind: ChunkKind): Generator<{ key: CacheKey; at: number; len: number; sha: Buffer }> {
    for (const e of this.index.values()) if (e.key.imageId === imageId && e.key.kind === kind) yield { key: e.key, at: e.slot * SLOT_BYTES[kind], len: e.len, sha: e.sha };
  }

  /** The slot file of a kind, open for reading and writing; the cache closes it. */
  slotFd(kind: ChunkKind): number {
    return this.fds[kind];
  }

  has(k: CacheKey): boolean {
    return this.index.has(this.id(k));
  }

  /** The dirty chunks of an image, by kind and index. */
  dirtyChunks(imageId: string): DirtyChunk[] {
    const out: DirtyChunk[] = [];
    for (const e of this.index.values()) if (e.dirty && e.key.imageId === imageId) out.push({ ...e.key, len: e.len, sha: e.sha, cls: e.cls });
    return out.sort((a, b) => (a.kind < b.kind ? -1 : a.kind > b.kind ? 1 : a.index - b.index));
  }

  /** The blob of a chunk dirtyChunks() listed, one at a time (a check-in's may be gigabytes); undefined once written again or dropped. */
  dirtyBlob(d: DirtyChunk): Buffer | undefined {
    const e = this.index.get(this.id(d));
    if (!e?.dirty || !e.sha.equals(d.sha)) return undefined;
    const data = this.readSlot(e);
    if (data) return data;
    throw new Error(`the cache's ${e.key.kind} slot ${e.slot} is shorter than its dirty chunk ${e.key.index}`);
  }

  /** A dirty blob named `was` the server committed is clean, named now by its SHA-256 `sha`; false when the chunk was written again since (it stays dirty). */
  markClean(k: CacheKey, was: Buffer, sha: Buffer): boolean {
    const e = this.index.get(this.id(k));
    if (!e?.dirty || !e.sha.equals(was)) return false;
    this.q.clean.run(sha, k.imageId, k.gen, k.kind, k.index);
    this.account(e, -1);
    e.dirty = false;
    e.sha = sha;
    this.account(e, 1);
    return true;
  }

  stats = (): CacheStats => ({ chunks: this.index.size, bytes: this.bytes, dirty: this.dirtyCount, limitBytes: this.limitBytes, ...this.counters });

  close(): void {
    this.closed = true;
    try {
      this.persistTouches();
    } finally {
      this.db.close();
      for (const kind of CHUNK_KINDS) fs.closeSync(this.fds[kind]);
    }
  }
}
