// Transactions on PostgreSQL (server/sql.ts): one opened with `durable: false`
// commits without waiting for its flush, and only it; what it wrote is there.
import { expect } from 'chai';
import { openPostgres, type Sql } from '../../server/sql.js';
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
});
