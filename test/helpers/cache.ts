// Damage to a device's chunk cache behind the agent's back, as a failing disk or a
// hand edit would do it: the bytes of one cached blob, with its index row's SHA-256
// made to match, so only the signed manifest and the AEAD tag can tell.
import fs from 'node:fs';
import path from 'node:path';
import Database from 'better-sqlite3';
import { SLOT_BYTES, slotFile } from '../../agent/chunks/cache.js';
import type { ChunkKind } from '../../common/constants.js';
import { sha256 } from '../../common/crypto.js';

export interface CachedRow {
  gen: number;
  kind: ChunkKind;
  idx: number;
  slot: number;
  len: number;
}

/** The index rows of a cache file (cache.db), in slot order, of one kind. */
export function cachedRows(db: string, kind: ChunkKind): CachedRow[] {
  const d = new Database(db, { readonly: true });
  try {
    return d.prepare('SELECT gen, kind, idx, slot, len FROM blobs WHERE kind = ? ORDER BY idx').all(kind) as CachedRow[];
  } finally {
    d.close();
  }
}

/** Flips bits of byte `at` of a cached blob; with `rehash` the row's SHA-256 is made to match the damaged bytes. */
export function damageCachedBlob(db: string, kind: ChunkKind, idx: number, at: number, rehash = true): void {
  const d = new Database(db);
  const fd = fs.openSync(slotFile(db, kind), 'r+');
  try {
    const row = d.prepare('SELECT gen, slot, len FROM blobs WHERE kind = ? AND idx = ?').get(kind, idx) as { gen: number; slot: number; len: number } | undefined;
    if (!row) throw new Error(`no cached ${kind} chunk ${idx} in ${path.basename(db)}`);
    const blob = Buffer.alloc(row.len);
    fs.readSync(fd, blob, 0, row.len, row.slot * SLOT_BYTES[kind]);
    blob[at] ^= 0x40;
    fs.writeSync(fd, blob, 0, row.len, row.slot * SLOT_BYTES[kind]);
    if (rehash) d.prepare('UPDATE blobs SET sha256 = ? WHERE kind = ? AND idx = ? AND gen = ?').run(sha256(blob), kind, idx, row.gen);
  } finally {
    fs.closeSync(fd);
    d.close();
  }
}
