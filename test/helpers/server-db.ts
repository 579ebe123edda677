// A test's own connection to a test server's database, whichever backend it runs
// on (SQLite files in its data dir, or its PostgreSQL database): for reading what
// the server stored and for tampering with it as an attacker holding the database would.
import { openServerDb, type Sql } from '../../server/db.js';
import { dataDirDb } from '../../server/datadir.js';
import type { ServerProc } from './proc.js';

export interface ServerDb {
  sql: Sql;
  /** The chunk store (chunks.db, or the same PostgreSQL database). */
  store: Sql;
  /** Makes every audit append fail (as a full disk would) until allowAudit(). */
  refuseAudit(): Promise<void>;
  allowAudit(): Promise<void>;
  close(): Promise<void>;
}

export async function serverDb(s: Pick<ServerProc, 'dir'>): Promise<ServerDb> {
  const db = await openServerDb({ url: dataDirDb(s.dir), dir: s.dir }, { poolSize: 2 });
  const pg = db.db.dialect === 'postgres';
  return {
    sql: db.db,
    store: db.store,
    async refuseAudit() {
      if (pg) {
        await db.db.run("CREATE OR REPLACE FUNCTION lethe_refuse() RETURNS trigger AS $$ BEGIN RAISE EXCEPTION 'disk full'; END $$ LANGUAGE plpgsql");
        await db.db.run('CREATE TRIGGER refuse_audit BEFORE INSERT ON audit FOR EACH ROW EXECUTE FUNCTION lethe_refuse()');
      } else {
        await db.db.run("CREATE TRIGGER refuse_audit BEFORE INSERT ON audit BEGIN SELECT RAISE(ABORT, 'disk full'); END");
      }
    },
    async allowAudit() {
      await db.db.run(pg ? 'DROP TRIGGER IF EXISTS refuse_audit ON audit' : 'DROP TRIGGER IF EXISTS refuse_audit');
    },
    close: () => db.close(),
  };
}
