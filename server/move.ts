// `lethe server migrate`: moves a SQLite server's data into an empty PostgreSQL
// database in one transaction, row for row (the audit chain keeps its hashes and
// signed checkpoints), checks the chain there with the data dir's audit key, and
// only then points the data dir's config at the new database. The SQLite files
// stay where they were until the operator removes them.
import fs from 'node:fs';
import { LetheError } from '../common/errors.js';
import { writeFileAtomic } from '../common/fsutil.js';
import { verifyAudit, type VerifyResult } from './audit-read.js';
import { checkDbUrl, dataDirAuditKey, dataDirDb, files, type ServerConfig } from './datadir.js';
import { openServerDb } from './db.js';
import { redactUrl, type Sql } from './sql.js';

/** Tables in an order that keeps every foreign key satisfied, with the database each lives in. */
const TABLES: [name: string, from: 'db' | 'store'][] = [
  ['settings', 'db'],
  ['master_keys', 'db'],
  ['enroll_tokens', 'db'],
  ['devices', 'db'],
  ['images', 'db'],
  ['versions', 'db'],
  ['chunks', 'db'],
  ['assignments', 'db'],
  ['leases', 'db'],
  ['commands', 'db'],
  ['audit', 'db'],
  ['checkpoints', 'db'],
  ['traces', 'db'],
  ['key_releases', 'db'],
  ['key_windows', 'db'],
  ['trusted_tracers', 'db'],
  ['users', 'db'],
  ['api_tokens', 'db'],
  ['sessions', 'db'],
  ['blobs', 'store'],
];

/** Rows per INSERT: a few MiB of chunks at most, well under PostgreSQL's parameter limit. */
const ROWS_PER_INSERT = 64;

export interface MoveResult {
  from: string;
  to: string;
  rows: Record<string, number>;
  verify: VerifyResult;
}

async function columns(db: Sql, table: string): Promise<string[]> {
  if (db.dialect === 'sqlite') return (await db.all<{ name: string }>(`PRAGMA table_info(${table})`)).map((c) => c.name);
  return (await db.all<{ column_name: string }>('SELECT column_name FROM information_schema.columns WHERE table_name = ? ORDER BY ordinal_position', table)).map(
    (c) => c.column_name,
  );
}

async function copyTable(from: Sql, to: Sql, table: string): Promise<number> {
  const target = new Set(await columns(to, table));
  const cols = (await columns(from, table)).filter((c) => target.has(c));
  const rows = await from.all<Record<string, unknown>>(`SELECT ${cols.join(', ')} FROM ${table}`);
  for (let i = 0; i < rows.length; i += ROWS_PER_INSERT) {
    const part = rows.slice(i, i + ROWS_PER_INSERT);
    const values = part.map(() => `(${cols.map(() => '?').join(', ')})`).join(', ');
    await to.run(`INSERT INTO ${table} (${cols.join(', ')}) VALUES ${values}`, ...part.flatMap((r) => cols.map((c) => r[c])));
  }
  return rows.length;
}

/** Moves the data of the SQLite server in `dir` to the empty PostgreSQL database at `url`. */
export async function moveToPostgres(dir: string, url: string): Promise<MoveResult> {
  checkDbUrl(url);
  if (dataDirDb(dir) !== undefined) {
    throw new LetheError('CONFIG', `the data dir '${dir}' already keeps its data in PostgreSQL (${redactUrl(dataDirDb(dir)!)})`, {
      hint: 'migrate moves a SQLite server; there is nothing to move',
    });
  }
  const f = files(dir);
  if (!fs.existsSync(f.db)) throw new LetheError('CONFIG', `no SQLite database at '${f.db}'`, { hint: `check --from (the server's data dir)` });
  const source = await openServerDb({ dir });
  try {
    const target = await openServerDb({ url, dir });
    try {
      if (await target.db.get('SELECT 1 AS x FROM settings LIMIT 1')) {
        throw new LetheError('CONFIG', `the database at ${redactUrl(url)} is not empty`, { hint: 'give an empty database (createdb)' });
      }
      const rows: Record<string, number> = {};
      await target.db.tx(async (t) => {
        for (const [table, where] of TABLES) rows[table] = await copyTable(where === 'db' ? source.db : source.store, t, table);
      });
      const verify = await verifyAudit(target.db, { serverKey: dataDirAuditKey(dir) });
      if (!verify.ok) {
        throw new LetheError('TAMPERED', `the audit log does not verify in the new database: ${verify.reason}`, {
          hint: `check the SQLite log with 'lethe audit verify --data ${dir}'; the data dir still uses SQLite`,
        });
      }
      const config = JSON.parse(fs.readFileSync(f.config, 'utf8')) as ServerConfig;
      writeFileAtomic(f.config, JSON.stringify({ ...config, db: url } satisfies ServerConfig, null, 2) + '\n', 0o600);
      return { from: dir, to: redactUrl(url), rows, verify };
    } finally {
      await target.close();
    }
  } finally {
    await source.close();
  }
}
