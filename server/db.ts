// Opening the server's storage: SQLite files in the data dir (the default), or a
// PostgreSQL database (`--db postgres://…`, $LETHE_DB) that any number of replicas
// share. Versioned migrations (server/migrations/<set>/NNNN_name.sql) are applied
// at open, each once, in one transaction with its record in schema_migrations.
import fs from 'node:fs';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import { isPostgresUrl, openSqlite, type Sql, type SqliteSql } from './sql.js';
import { openPostgres } from './sql-postgres.js';

export type { Sql } from './sql.js';

const MIGRATIONS = path.join(path.dirname(fileURLToPath(import.meta.url)), 'migrations');

export type MigrationSet = 'sqlite' | 'sqlite-chunks' | 'postgres';

export interface Migration {
  version: number;
  name: string;
  sql: string;
}

/** The migrations of a set, in order. */
export function migrations(set: MigrationSet): Migration[] {
  const dir = path.join(MIGRATIONS, set);
  return fs
    .readdirSync(dir)
    .filter((f) => /^\d{4}_[a-z0-9_-]+\.sql$/.test(f))
    .sort()
    .map((f) => ({ version: Number(f.slice(0, 4)), name: f.slice(5, -4), sql: fs.readFileSync(path.join(dir, f), 'utf8') }));
}

/**
 * Columns added to SQLite tables before migrations were versioned: a database
 * from then has the tables of 0001 without some of these.
 */
const ADDED_COLUMNS: [table: string, column: string, decl: string][] = [
  ['versions', 'lease_id', 'TEXT'],
  ['leases', 'write_gen', 'INTEGER'],
  ['devices', 'revoke_acked_at', 'INTEGER'],
  // how the device keeps its identity keys at rest, as it reported at enrollment
  ['devices', 'seal', "TEXT NOT NULL DEFAULT 'none'"],
  ['versions', 'device_id', 'TEXT'],
  ['versions', 'base', 'INTEGER'],
  ['versions', 'promoted_at', 'INTEGER'],
];

function addColumns(db: SqliteSql): void {
  for (const [table, column, decl] of ADDED_COLUMNS) {
    const cols = db.allSync<{ name: string }>(`PRAGMA table_info(${table})`);
    if (!cols.some((c) => c.name === column)) db.raw.exec(`ALTER TABLE ${table} ADD COLUMN ${column} ${decl}`);
  }
}

/**
 * A SQLite script without its `ALTER TABLE t ADD COLUMN c …;` statements whose
 * column is there already: SQLite has no ADD COLUMN IF NOT EXISTS, and a database
 * from before versioned migrations (schema_migrations missing) runs every
 * migration again over tables that may have them.
 */
function withoutPresentColumns(db: SqliteSql, sql: string): string {
  return sql.replace(/^\s*ALTER TABLE (\w+) ADD COLUMN (\w+)\b[^;]*;/gim, (stmt, table: string, column: string) => {
    const cols = db.allSync<{ name: string }>(`PRAGMA table_info(${table})`);
    return cols.some((c) => c.name === column) ? '' : stmt;
  });
}

const MIGRATION_TABLE = 'CREATE TABLE IF NOT EXISTS schema_migrations (version INTEGER PRIMARY KEY, name TEXT NOT NULL, applied_at BIGINT NOT NULL)';

/** Applies the migrations `db` has not had; returns the versions applied now. Safe to run from several replicas at once. */
export async function migrate(db: Sql, set: MigrationSet, now = Date.now()): Promise<number[]> {
  if (db.dialect === 'sqlite') (db as SqliteSql).raw.exec(MIGRATION_TABLE);
  const applied: number[] = [];
  for (const m of migrations(set)) {
    const done = await db.tx(async (t) => {
      if (t.dialect === 'postgres') {
        await t.lock('lethe.migrate');
        await t.run(MIGRATION_TABLE);
      }
      if (await t.get('SELECT 1 AS x FROM schema_migrations WHERE version = ?', m.version)) return false;
      if (t.dialect === 'sqlite') {
        // better-sqlite3 runs a script of many statements with exec, inside this transaction.
        (db as SqliteSql).raw.exec(withoutPresentColumns(db as SqliteSql, m.sql));
        if (set === 'sqlite' && m.version === 1) addColumns(db as SqliteSql);
      } else {
        await t.run(m.sql);
      }
      await t.run('INSERT INTO schema_migrations(version, name, applied_at) VALUES (?, ?, ?)', m.version, m.name, now);
      return true;
    });
    if (done) applied.push(m.version);
  }
  return applied;
}

export interface ServerDb {
  /** Devices, images, leases, audit and the rest. */
  db: Sql;
  /** The encrypted chunks: chunks.db beside lethe.db, or the same PostgreSQL database. */
  store: Sql;
  close(): Promise<void>;
}

/** Where the server keeps its data: a PostgreSQL URL, or the data dir's SQLite files. */
export interface DbLocation {
  /** postgres://… (or postgresql://…); without one, SQLite in `dir`. */
  url?: string;
  dir: string;
}

export const sqliteFiles = (dir: string) => ({ db: path.join(dir, 'lethe.db'), chunks: path.join(dir, 'chunks.db') });

/** Opens (and migrates) the server's storage. */
export async function openServerDb(loc: DbLocation, opts: { readonly?: boolean; poolSize?: number } = {}): Promise<ServerDb> {
  if (loc.url !== undefined && isPostgresUrl(loc.url)) {
    const db = openPostgres(loc.url, { max: opts.poolSize });
    try {
      if (!opts.readonly) await migrate(db, 'postgres');
    } catch (e) {
      await db.close();
      throw e;
    }
    return { db, store: db, close: () => db.close() };
  }
  const f = sqliteFiles(loc.dir);
  const db = openSqlite(f.db, { readonly: opts.readonly });
  if (!opts.readonly) await migrate(db, 'sqlite');
  if (opts.readonly) return { db, store: db, close: () => db.close() };
  const store = openSqlite(f.chunks);
  await migrate(store, 'sqlite-chunks');
  return {
    db,
    store,
    async close() {
      await db.close();
      await store.close();
    },
  };
}
