// The device's chunk cache: ciphertext exactly as the server sent it, plus
// dirty chunks the device encrypted itself. Never plaintext (invariant 1).
//
// One SQLite file in the device home. A write is one transaction, so a crash
// leaves the old row or the new one; a row that was damaged anyway (disk
// error, a hand edit) fails its SHA-256 or AEAD check, is dropped and is
// fetched again, never served. Bounded: clean chunks are evicted least
// recently used first; dirty chunks are never evicted (they are the only copy
// of a guest write until it is checked in).
import Database from 'better-sqlite3';
import path from 'node:path';
import type { ChunkKind, Sensitivity } from '../../common/constants.js';
import { sha256 } from '../../common/crypto.js';

export interface CacheKey {
  imageId: string;
  gen: number;
  kind: ChunkKind;
  index: number;
}

export interface CacheStats {
  chunks: number;
  bytes: number;
  dirty: number;
  limitBytes: number;
  hits: number;
  misses: number;
  evicted: number;
  damaged: number;
}

const SCHEMA = `
CREATE TABLE IF NOT EXISTS chunks (
  image_id TEXT NOT NULL,
  gen INTEGER NOT NULL,
  kind TEXT NOT NULL,
  idx INTEGER NOT NULL,
  data BLOB NOT NULL,
  sha256 BLOB NOT NULL,
  dirty INTEGER NOT NULL DEFAULT 0,
  cls TEXT,
  used INTEGER NOT NULL,
  PRIMARY KEY (image_id, gen, kind, idx)
);
CREATE INDEX IF NOT EXISTS chunks_lru ON chunks(dirty, used);
`;

export class ChunkCache {
  private readonly db: Database.Database;
  private readonly q;
  private bytes: number;
  /** Monotonic use counter; persisted with each write, refreshed in memory on reads. */
  private tick: number;
  private readonly touched = new Map<string, number>();
  private readonly counters = { hits: 0, misses: 0, evicted: 0, damaged: 0 };

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
    this.q = {
      get: this.db.prepare('SELECT data, sha256 FROM chunks WHERE image_id = ? AND gen = ? AND kind = ? AND idx = ?'),
      put: this.db.prepare(
        'INSERT OR REPLACE INTO chunks(image_id, gen, kind, idx, data, sha256, dirty, cls, used) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)',
      ),
      size: this.db.prepare('SELECT LENGTH(data) AS n FROM chunks WHERE image_id = ? AND gen = ? AND kind = ? AND idx = ?'),
      del: this.db.prepare('DELETE FROM chunks WHERE image_id = ? AND gen = ? AND kind = ? AND idx = ?'),
      touch: this.db.prepare('UPDATE chunks SET used = ? WHERE image_id = ? AND gen = ? AND kind = ? AND idx = ?'),
      oldest: this.db.prepare('SELECT image_id, gen, kind, idx, LENGTH(data) AS n FROM chunks WHERE dirty = 0 ORDER BY used LIMIT 64'),
      total: this.db.prepare('SELECT COALESCE(SUM(LENGTH(data)), 0) AS n, COUNT(*) AS c, COALESCE(SUM(dirty), 0) AS d FROM chunks'),
      maxUsed: this.db.prepare('SELECT COALESCE(MAX(used), 0) AS m FROM chunks'),
      dirty: this.db.prepare('SELECT image_id, gen, kind, idx, data, cls FROM chunks WHERE dirty = 1 AND image_id = ? ORDER BY kind, idx'),
      has: this.db.prepare('SELECT 1 FROM chunks WHERE image_id = ? AND gen = ? AND kind = ? AND idx = ?'),
      clean: this.db.prepare('UPDATE chunks SET dirty = 0 WHERE image_id = ? AND gen = ? AND kind = ? AND idx = ?'),
    };
    this.bytes = (this.q.total.get() as { n: number }).n;
    this.tick = (this.q.maxUsed.get() as { m: number }).m;
  }

  static inHome(home: string, limitBytes: number): ChunkCache {
    return new ChunkCache(path.join(home, 'cache.db'), limitBytes);
  }

  private id(k: CacheKey): string {
    return `${k.imageId}/${k.gen}/${k.kind}/${k.index}`;
  }

  /** The cached blob, or undefined. A damaged row is dropped and reported as a miss. */
  get(k: CacheKey): Buffer | undefined {
    return this.getWithHash(k)?.data;
  }

  /**
   * The cached blob and its stored SHA-256. With `verify` false the data is
   * not hashed again: the caller compares the stored hash to the signed
   * manifest and lets the AEAD tag catch damaged data (then drop() and fetch).
   */
  getWithHash(k: CacheKey, verify = true): { data: Buffer; sha256: Buffer } | undefined {
    const row = this.q.get.get(k.imageId, k.gen, k.kind, k.index) as { data: Buffer; sha256: Buffer } | undefined;
    if (!row) {
      this.counters.misses++;
      return undefined;
    }
    if (verify && !sha256(row.data).equals(row.sha256)) {
      this.drop(k);
      this.counters.damaged++;
      this.counters.misses++;
      return undefined;
    }
    this.counters.hits++;
    this.touched.set(this.id(k), ++this.tick);
    return row;
  }

  /**
   * Stores a blob (server ciphertext, or a dirty chunk the device encrypted), then
   * trims to the limit. `hash` is the blob's SHA-256 when the caller has it already.
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
    this.db.transaction(() => {
      for (const { k, blob, hash } of items) this.store(k, blob, false, undefined, hash);
    })();
    if (this.bytes > this.limitBytes) this.trim();
  }

  /** Runs `fn` as one transaction: every write in it stands, or (a throw, a crash) none does. */
  batch<T>(fn: () => T): T {
    return this.db.transaction(fn)();
  }

  private store(k: CacheKey, blob: Buffer, dirty: boolean, cls: Sensitivity | undefined, hash: Buffer | undefined): void {
    const old = this.q.size.get(k.imageId, k.gen, k.kind, k.index) as { n: number } | undefined;
    this.q.put.run(k.imageId, k.gen, k.kind, k.index, blob, hash ?? sha256(blob), dirty ? 1 : 0, cls ?? null, ++this.tick);
    this.bytes += blob.length - (old?.n ?? 0);
    this.touched.delete(this.id(k));
  }

  /** Drops one entry (a damaged one, or a clean one the caller knows is stale). */
  drop(k: CacheKey): void {
    const old = this.q.size.get(k.imageId, k.gen, k.kind, k.index) as { n: number } | undefined;
    if (!old) return;
    this.q.del.run(k.imageId, k.gen, k.kind, k.index);
    this.bytes -= old.n;
    this.touched.delete(this.id(k));
  }

  /** Writes remembered read times, then evicts clean chunks, oldest first, until under the limit. */
  private trim(): void {
    this.persistTouches();
    while (this.bytes > this.limitBytes) {
      const victims = this.q.oldest.all() as { image_id: string; gen: number; kind: string; idx: number; n: number }[];
      if (victims.length === 0) return; // only dirty chunks left: they stay
      this.db.transaction(() => {
        for (const v of victims) {
          if (this.bytes <= this.limitBytes) break;
          this.q.del.run(v.image_id, v.gen, v.kind, v.idx);
          this.bytes -= v.n;
          this.counters.evicted++;
        }
      })();
    }
  }

  private persistTouches(): void {
    if (this.touched.size === 0) return;
    this.db.transaction(() => {
      for (const [id, used] of this.touched) {
        const [imageId, gen, kind, idx] = id.split('/');
        this.q.touch.run(used, imageId, Number(gen), kind, Number(idx));
      }
    })();
    this.touched.clear();
  }

  /** Makes every write so far durable (fsync of the WAL). */
  flush(): void {
    this.persistTouches();
    this.db.pragma('wal_checkpoint(FULL)');
  }

  has(k: CacheKey): boolean {
    return this.q.has.get(k.imageId, k.gen, k.kind, k.index) !== undefined;
  }

  dirtyChunks(imageId: string): (CacheKey & { data: Buffer; cls: Sensitivity | null })[] {
    type Row = { image_id: string; gen: number; kind: ChunkKind; idx: number; data: Buffer; cls: Sensitivity | null };
    return (this.q.dirty.all(imageId) as Row[]).map((r) => ({
      imageId: r.image_id,
      gen: r.gen,
      kind: r.kind,
      index: r.idx,
      data: r.data,
      cls: r.cls,
    }));
  }

  markClean(k: CacheKey): void {
    this.q.clean.run(k.imageId, k.gen, k.kind, k.index);
  }

  stats(): CacheStats {
    const t = this.q.total.get() as { n: number; c: number; d: number };
    return { chunks: t.c, bytes: t.n, dirty: t.d, limitBytes: this.limitBytes, ...this.counters };
  }

  close(): void {
    try {
      this.persistTouches();
    } finally {
      this.db.close();
    }
  }
}
