// Transactions on PostgreSQL (server/sql.ts): one opened with `durable: false`
// commits without waiting for its flush, and only it; what it wrote is there.
// One opened with `lock` holds that lock from its first round trip to its end.
import { expect } from 'chai';
import type { Sql } from '../../server/sql.js';
import { openPostgres } from '../../server/sql-postgres.js';
import { freshDatabase } from '../helpers/pg.js';

describe('postgres transactions', () => {
  it('durable: false turns synchronous_commit off inside that transaction only', async () => {
    const db = openPostgres(freshDatabase(), { max: 1 });
    try {
      await db.run('CREATE TABLE t (x INTEGER)');
      const setting = (t: Sql) => t.get<{ synchronous_commit: string }>('SHOW synchronous_commit');
      const inside = await db.tx(async (t) => {
        await t.run('INSERT INTO t VALUES (1)');
        return (await setting(t))!.synchronous_commit;
      }, { durable: false });
      expect(inside).to.equal('off');
      // The same pooled connection: the setting went with the transaction.
      expect((await setting(db))!.synchronous_commit).to.equal('on');
      expect((await db.tx(async (t) => (await setting(t))!.synchronous_commit))).to.equal('on');
      expect(await db.all('SELECT x FROM t')).to.deep.equal([{ x: 1 }]);
    } finally {
      await db.close();
    }
  });

  it('lock: the transaction holds the lock from BEGIN to its end, and lock() of the same name is no second wait', async () => {
    const url = freshDatabase();
    const db = openPostgres(url, { max: 2 });
    const other = openPostgres(url, { max: 1 });
    const free = async () => (await other.tx(async (t) => (await t.get<{ ok: boolean }>("SELECT pg_try_advisory_xact_lock(hashtext('lethe.test''s')) AS ok"))!.ok));
    try {
      expect(await free()).to.equal(true);
      const seen = await db.tx(async (t) => {
        const during = await free();
        await t.lock("lethe.test's");
        return during;
      }, { lock: "lethe.test's" });
      expect(seen).to.equal(false);
      expect(await free()).to.equal(true);
    } finally {
      await db.close();
      await other.close();
    }
  });
});
