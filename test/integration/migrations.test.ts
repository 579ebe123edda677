// Versioned schema migrations (server/migrations/<backend>/NNNN_name.sql): applied
// to an empty database in order, each once, recorded in schema_migrations;
// running them again, or from two replicas starting at once, applies nothing twice.
import { expect } from 'chai';
import path from 'node:path';
import { migrate, migrations } from '../../server/db.js';
import { openSqlite } from '../../server/sql.js';
import { openPostgres } from '../../server/sql-postgres.js';
import { freshDatabase } from '../helpers/pg.js';
import { tmpDir } from '../helpers/proc.js';

describe('schema migrations', () => {
  for (const set of ['sqlite', 'postgres'] as const) {
    it(`${set}: an empty database gets every migration once, in order; again, nothing`, async () => {
      const db = set === 'sqlite' ? openSqlite(path.join(tmpDir(), 'lethe.db')) : openPostgres(freshDatabase());
      try {
        const all = migrations(set).map((m) => m.version);
        expect(all[0]).to.equal(1);
        expect(all).to.deep.equal([...all].sort((a, b) => a - b));
        expect(await migrate(db, set)).to.deep.equal(all);
        expect(await migrate(db, set)).to.deep.equal([]);
        const rows = await db.all<{ version: number; name: string }>('SELECT version, name FROM schema_migrations ORDER BY version');
        expect(rows.map((r) => r.version)).to.deep.equal(all);
        expect(rows.map((r) => r.name)).to.deep.equal(migrations(set).map((m) => m.name));
        // The schema is usable: the tables of the last migration exist.
        expect(await db.all('SELECT term FROM master_keys')).to.deep.equal([]);
      } finally {
        await db.close();
      }
    });
  }

  it('postgres: two replicas starting at once on an empty database apply each migration once', async () => {
    const url = freshDatabase();
    const a = openPostgres(url);
    const b = openPostgres(url);
    try {
      const [ra, rb] = await Promise.all([migrate(a, 'postgres'), migrate(b, 'postgres')]);
      const all = migrations('postgres').map((m) => m.version);
      expect([...ra, ...rb].sort((x, y) => x - y)).to.deep.equal(all);
      expect((await a.get<{ n: number }>('SELECT COUNT(*) AS n FROM schema_migrations'))!.n).to.equal(all.length);
    } finally {
      await a.close();
      await b.close();
    }
  });
});
