import Database from 'better-sqlite3';
import fs from 'node:fs';
import { randomBytes } from 'node:crypto';
import { ChunkCache } from '../agent/chunks/cache.js';
import { SCHEMA } from '../agent/chunks/cache-layout.js';
const gc = (globalThis as any).gc;
for (const n of (process.env.NS ?? '409600').split(',').map(Number)) {
  const dir = fs.mkdtempSync('/tmp/co-'); const file = `${dir}/cache.db`;
  const db = new Database(file); db.pragma('journal_mode = WAL'); db.exec(SCHEMA);
  const put = db.prepare('INSERT INTO blobs(image_id, gen, kind, idx, slot, len, sha256, dirty, cls, used) VALUES (?,?,?,?,?,?,?,?,?,?)');
  const img = 'ab'.repeat(16);
  db.transaction(() => { for (let i = 0; i < n; i++) put.run(img, 3, 'disk', i, i, 131112, randomBytes(32), 0, null, i); })();
  db.close();
  gc(); const h0 = process.memoryUsage().heapUsed + process.memoryUsage().arrayBuffers;
  const t0 = performance.now();
  const c = new ChunkCache(file, 1e15);
  const ms = performance.now() - t0;
  gc(); const h1 = process.memoryUsage().heapUsed + process.memoryUsage().arrayBuffers;
  console.log(n, 'rows: open', ms.toFixed(0), 'ms; heap kept', ((h1 - h0) / 1e6).toFixed(1), 'MB');
  c.close(); fs.rmSync(dir, { recursive: true });
}
