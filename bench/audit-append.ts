// What signing the audit head in every append costs (docs/audit-log.md, Checkpoints).
//   node --import tsx bench/audit-append.ts [--entries 20000] [--commits 1000] [--rounds 3]
// Yardstick, in the same run and on the same database: the append that signed only
// every AUDIT_CHECKPOINT_EVERY-th entry (the scheme before the head was signed).
// Two costs each: CPU per append (many appends in one transaction) and an append
// in its own transaction with synchronous=FULL (what one request pays).
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { parseArgs } from 'node:util';
import { AUDIT_CHECKPOINT_EVERY, AUDIT_GENESIS_HASH } from '../common/constants.js';
import { checkpointMessage, entryHash } from '../common/audit-hash.js';
import { b64u, sign, signKeyPair } from '../common/crypto.js';
import { iso } from '../common/duration.js';
import { AuditLog } from '../server/audit.js';
import { migrate } from '../server/db.js';
import { openSqlite, type Sql, type SqliteSql } from '../server/sql.js';

const { values } = parseArgs({
  options: { entries: { type: 'string', default: '20000' }, commits: { type: 'string', default: '1000' }, rounds: { type: 'string', default: '3' } },
});
const ENTRIES = Number(values.entries);
const COMMITS = Number(values.commits);
const ROUNDS = Number(values.rounds);

type Append = (t: Sql) => Promise<void> | void;

/** The yardstick: insert the entry, sign only on an interval. */
function intervalOnly(sql: SqliteSql, key: Uint8Array): Append {
  const db = sql.raw;
  const last = db.prepare('SELECT seq, hash FROM audit ORDER BY seq DESC LIMIT 1');
  const insert = db.prepare('INSERT INTO audit(seq, ts, type, device, data, hash) VALUES (?, ?, ?, ?, ?, ?)');
  const cp = db.prepare('INSERT OR REPLACE INTO checkpoints(seq, hash, signature) VALUES (?, ?, ?)');
  return () => {
    const prev = last.get() as { seq: number; hash: string } | undefined;
    const seq = (prev?.seq ?? 0) + 1;
    const e = { seq, ts: iso(Date.now()), type: 'keys.release', device: 'dev-bench', data: DATA };
    const hash = entryHash(prev?.hash ?? AUDIT_GENESIS_HASH, e);
    insert.run(seq, e.ts, e.type, e.device, JSON.stringify(DATA), hash);
    if (seq % AUDIT_CHECKPOINT_EVERY === 0) cp.run(seq, hash, b64u.encode(sign(key, checkpointMessage(seq, hash))));
  };
}

const DATA = { lease: 'lease-0123456789abcdef', image: 'desk', version: 1, count: 1, sensitive: 1, chunks: { mem: [[0, 0]] } };

async function measure(db: Sql, append: Append): Promise<{ batchedUs: number; committedUs: number }> {
  let t0 = performance.now();
  await db.tx(async (t) => {
    for (let i = 0; i < ENTRIES; i++) await append(t);
  });
  const batchedUs = ((performance.now() - t0) * 1000) / ENTRIES;
  t0 = performance.now();
  for (let i = 0; i < COMMITS; i++) await db.tx(async (t) => append(t));
  const committedUs = ((performance.now() - t0) * 1000) / COMMITS;
  return { batchedUs, committedUs };
}

const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'lethe-bench-audit-'));
const key = signKeyPair();
const dbs = { yardstick: openSqlite(path.join(dir, 'a.db')), signedHead: openSqlite(path.join(dir, 'b.db')) };
for (const db of Object.values(dbs)) await migrate(db, 'sqlite');
const log = new AuditLog(dbs.signedHead, key.secretKey);
const variants: [keyof typeof dbs, Append][] = [
  ['yardstick', intervalOnly(dbs.yardstick, key.secretKey)],
  ['signedHead', async (t) => void (await log.on(t).append('keys.release', 'dev-bench', DATA))],
];
console.log(`load average at start ${os.loadavg()[0].toFixed(2)} (well above 0: run again)`);
const sums = { yardstick: { batchedUs: 0, committedUs: 0 }, signedHead: { batchedUs: 0, committedUs: 0 } };
try {
  for (let r = 0; r < ROUNDS; r++) {
    for (const [name, append] of variants) {
      const m = await measure(dbs[name], append);
      sums[name].batchedUs += m.batchedUs / ROUNDS;
      sums[name].committedUs += m.committedUs / ROUNDS;
    }
  }
  for (const [name] of variants) {
    const s = sums[name];
    console.log(`${name.padEnd(10)} append ${s.batchedUs.toFixed(1)} µs (CPU), append + commit ${s.committedUs.toFixed(1)} µs`);
  }
  const a = sums.yardstick;
  const b = sums.signedHead;
  console.log(`signed head / yardstick: CPU ${(b.batchedUs / a.batchedUs).toFixed(2)}×, with commit ${(b.committedUs / a.committedUs).toFixed(2)}×`);
} finally {
  dbs.yardstick.close();
  dbs.signedHead.close();
  fs.rmSync(dir, { recursive: true, force: true });
}
