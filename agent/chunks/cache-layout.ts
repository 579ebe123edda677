// The chunk cache's files and rows (cache.ts): the index's schema, the slot files
// and their slot size, and the move from the earlier layout, which kept each blob in
// its SQLite row, to slot files (dirty blobs too, in one step, when such a cache is opened).
import type Database from 'better-sqlite3';
import fs from 'node:fs';
import path from 'node:path';
import { sealId } from '../../common/chunk.js';
import { CHUNK_KINDS, CHUNK_OVERHEAD, CHUNK_SIZE, type ChunkKind, type Sensitivity } from '../../common/constants.js';
import { sha256 } from '../../common/crypto.js';

export interface CacheKey {
  imageId: string;
  gen: number;
  kind: ChunkKind;
  index: number;
}

/** A dirty chunk as dirtyChunks() lists it: its blob's length and name (Entry.sha) and its class (dirtyBlob reads the blob). */
export type DirtyChunk = CacheKey & { len: number; sha: Buffer; cls: Sensitivity | null };

/** A blob of `len` bytes written whole into a reserved slot, for the index to name as the cached blob of `k` (commitMany). */
export type SlotRow = { k: CacheKey; slot: number; len: number; sha: Buffer; dirty: boolean; cls?: Sensitivity };

export interface CacheStats {
  chunks: number;
  bytes: number;
  dirty: number;
  limitBytes: number;
  hits: number;
  misses: number;
  evicted: number;
  damaged: number;
  /** Flushes that fsynced the slot files: those after a dirty blob went in. */
  slotSyncs: number;
}

export const PAGE = 4096;

/** A slot holds the largest blob of its kind: the chunk and the envelope's overhead. */
export const SLOT_BYTES: Record<ChunkKind, number> = {
  disk: CHUNK_SIZE.disk + CHUNK_OVERHEAD,
  mem: CHUNK_SIZE.mem + CHUNK_OVERHEAD,
  state: CHUNK_SIZE.state + CHUNK_OVERHEAD,
};

export const SCHEMA = `
CREATE TABLE IF NOT EXISTS blobs (
  image_id TEXT NOT NULL,
  gen INTEGER NOT NULL,
  kind TEXT NOT NULL,
  idx INTEGER NOT NULL,
  slot INTEGER NOT NULL,
  len INTEGER NOT NULL,
  sha256 BLOB NOT NULL,
  dirty INTEGER NOT NULL DEFAULT 0,
  cls TEXT,
  used INTEGER NOT NULL,
  PRIMARY KEY (image_id, gen, kind, idx)
);
CREATE INDEX IF NOT EXISTS blobs_lru ON blobs(dirty, used);
`;

/** A row of the index, in memory. */
export interface Entry {
  key: CacheKey;
  slot: number;
  len: number;
  /** The blob's name: its SHA-256, or a dirty blob's seal id (common/chunk.ts) until its check-in. */
  sha: Buffer;
  dirty: boolean;
  cls: Sensitivity | null;
  used: number;
}

/** Whether `data` is the blob the row names: by its SHA-256, or a dirty one by its seal id (or its SHA-256: an older agent's, or a put's without a name). */
export function namesBlob(e: Entry, data: Buffer | undefined): boolean {
  if (data === undefined) return false; // not read back whole
  return (e.dirty && data.length >= CHUNK_OVERHEAD && sealId(data).equals(e.sha)) || sha256(data).equals(e.sha);
}

/**
 * The index's rows as entries, dirty first, then least recently used first. Row by
 * row, not all at once: a cache of 200 GiB has 1.6 million rows. The few distinct
 * strings are shared, and the SHA-256s copied into slabs (a Buffer of its own for each
 * cost more than all the rest of its entry). No other statement may run on `db` until
 * the rows are all read.
 */
export function* indexEntries(db: Database.Database): Generator<Entry> {
  type Row = [imageId: string, gen: number, kind: ChunkKind, idx: number, slot: number, len: number, sha: Buffer, dirty: number, cls: Sensitivity | null, used: number];
  const rows = db.prepare('SELECT image_id, gen, kind, idx, slot, len, sha256, dirty, cls, used FROM blobs ORDER BY dirty DESC, used').raw().iterate() as IterableIterator<Row>;
  const strings = new Map<string, string>();
  const shared = <T extends string | null>(x: T): T => (x === null ? x : ((strings.get(x) ?? (strings.set(x, x), x)) as T));
  const SLAB = 65_536;
  let slab = Buffer.alloc(0);
  let at = 0;
  const name = (sha: Buffer): Buffer => {
    if (sha.length !== 32) return sha;
    if (at === slab.length) [slab, at] = [Buffer.allocUnsafeSlow(32 * SLAB), 0];
    sha.copy(slab, at);
    return slab.subarray(at, (at += 32));
  };
  for (const [imageId, gen, kind, index, slot, len, sha, dirty, cls, used] of rows) {
    yield { key: { imageId: shared(imageId), gen, kind: shared(kind), index }, slot, len, sha: name(sha), dirty: dirty === 1, cls: shared(cls), used };
  }
}

/** The index's statements. */
export function cacheQueries(db: Database.Database) {
  return {
    put: db.prepare('INSERT OR REPLACE INTO blobs(image_id, gen, kind, idx, slot, len, sha256, dirty, cls, used) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)'),
    del: db.prepare('DELETE FROM blobs WHERE image_id = ? AND gen = ? AND kind = ? AND idx = ?'),
    touch: db.prepare('UPDATE blobs SET used = ? WHERE image_id = ? AND gen = ? AND kind = ? AND idx = ?'),
    clean: db.prepare('UPDATE blobs SET dirty = 0, sha256 = ? WHERE image_id = ? AND gen = ? AND kind = ? AND idx = ?'),
  };
}

/** The files of a device home's cache: the index and its WAL, and the slot files. */
export function cacheFiles(home: string): string[] {
  const db = path.join(home, 'cache.db');
  return [db, `${db}-wal`, `${db}-shm`, ...CHUNK_KINDS.map((k) => slotFile(db, k))];
}

export const slotFile = (db: string, kind: ChunkKind) => path.join(path.dirname(db), `${path.basename(db, '.db')}-${kind}.blobs`);

/** Moves every row of the old `chunks` table into the slot files and `put` rows, then drops the table; nothing when there is none. */
export function migrateRowsWithData(db: Database.Database, fds: Record<ChunkKind, number>, slotBytes: Record<ChunkKind, number>, put: Database.Statement): void {
  const old = db.prepare("SELECT name FROM sqlite_master WHERE type = 'table' AND name = 'chunks'").get();
  if (!old) return;
  type Row = { image_id: string; gen: number; kind: ChunkKind; idx: number; data: Buffer; sha256: Buffer; dirty: number; cls: Sensitivity | null; used: number };
  const next = {} as Record<ChunkKind, number>;
  for (const kind of CHUNK_KINDS) next[kind] = 0;
  db.transaction(() => {
    // A page of rows at a time: an old cache may hold gigabytes.
    const page = db.prepare('SELECT rowid AS rid, * FROM chunks WHERE rowid > ? ORDER BY rowid LIMIT 256');
    for (let after = 0; ; ) {
      const rows = page.all(after) as (Row & { rid: number })[];
      if (rows.length === 0) break;
      for (const r of rows) {
        const slot = next[r.kind]++;
        fs.writeSync(fds[r.kind], r.data, 0, r.data.length, slot * slotBytes[r.kind]);
        put.run(r.image_id, r.gen, r.kind, r.idx, slot, r.data.length, r.sha256, r.dirty, r.cls, r.used);
      }
      after = rows[rows.length - 1].rid;
    }
    for (const kind of CHUNK_KINDS) fs.fsyncSync(fds[kind]);
    db.exec('DROP TABLE chunks');
  })();
  db.pragma('wal_checkpoint(FULL)');
  db.exec('VACUUM');
}
