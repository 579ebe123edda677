// The agent's chunk cache opened at real disk sizes: its index (a row per cached blob,
// in SQLite) read into memory at start, for caches of 4, 50 and 200 GiB of disk chunks.
// The yardstick, in the same run on the same index: the rows read all at once as
// objects and kept as entries with their own SHA-256 Buffers and two id strings each,
// as the agent did before (agent/chunks/cache-layout.ts, indexEntries).
//
//   node --expose-gc --import tsx bench/cache-open.ts [--gib 4,50,200]
import Database from 'better-sqlite3';
import { randomBytes } from 'node:crypto';
import fs from 'node:fs';
import path from 'node:path';
import { parseArgs } from 'node:util';
import { ChunkCache } from '../agent/index.js';
import { CHUNK_OVERHEAD, CHUNK_SIZE } from '../common/constants.js';
import { tmpDir } from '../test/helpers/proc.js';

const { values } = parseArgs({ options: { gib: { type: 'string', default: '4,50,200' } } });
const gc = (globalThis as { gc?: () => void }).gc;
if (!gc) throw new Error('run with node --expose-gc');
function heap(): number {
  gc!();
  gc!();
  return process.memoryUsage().heapUsed + process.memoryUsage().arrayBuffers;
}
/** Time and heap kept by what `open` returns (kept alive until measured). */
function measure(open: () => unknown): { ms: number; mb: number } {
  const before = heap();
  const t0 = performance.now();
  const kept = open();
  const ms = performance.now() - t0;
  const mb = (heap() - before) / 1e6;
  if (!kept) throw new Error('nothing opened');
  if (kept instanceof ChunkCache) kept.close();
  return { ms, mb };
}

console.log('| cache | rows | before: ms | MB | open: ms | ×before | MB | ×before |');
console.log('|---|---|---|---|---|---|---|---|');
for (const gib of values.gib!.split(',').map(Number)) {
  const n = (gib * 2 ** 30) / CHUNK_SIZE.disk;
  const dir = tmpDir('lethe-bench-cache-');
  try {
    const file = path.join(dir, 'cache.db');
    new ChunkCache(file, 2 ** 50).close(); // its schema
    const db = new Database(file);
    const put = db.prepare('INSERT INTO blobs(image_id, gen, kind, idx, slot, len, sha256, dirty, cls, used) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)');
    const image = randomBytes(16).toString('hex');
    db.transaction(() => {
      for (let i = 0; i < n; i++) put.run(image, 3 + (i % 2), 'disk', i, i, CHUNK_SIZE.disk + CHUNK_OVERHEAD, randomBytes(32), i % 10 === 0 ? 1 : 0, i % 10 === 0 ? 'normal' : null, i);
    })();
    db.close();
    const before = measure(() => {
      const d = new Database(file, { readonly: true });
      type Row = { image_id: string; gen: number; kind: string; idx: number; slot: number; len: number; sha256: Buffer; dirty: number; cls: string | null; used: number };
      const rows = d.prepare('SELECT * FROM blobs ORDER BY dirty DESC, used').all() as Row[];
      const index = new Map<string, unknown>();
      const clean = new Map<string, unknown>();
      for (const r of rows) {
        const e = { key: { imageId: r.image_id, gen: r.gen, kind: r.kind, index: r.idx }, slot: r.slot, len: r.len, sha: r.sha256, dirty: r.dirty === 1, cls: r.cls, used: r.used };
        index.set(`${r.image_id}/${r.gen}/${r.kind}/${r.idx}`, e);
        if (!e.dirty) clean.set(`${r.image_id}/${r.gen}/${r.kind}/${r.idx}`, e);
      }
      d.close();
      return [index, clean];
    });
    const now = measure(() => new ChunkCache(file, 2 ** 50));
    const f = (x: number) => x.toFixed(0);
    console.log(`| ${gib} GiB | ${n.toLocaleString('en')} | ${f(before.ms)} | ${f(before.mb)} | ${f(now.ms)} | ${(now.ms / before.ms).toFixed(2)} | ${f(now.mb)} | ${(now.mb / before.mb).toFixed(2)} |`);
  } finally {
    fs.rmSync(dir, { recursive: true, force: true });
  }
}
