// AuditLog.appendMany (a batch of entries in one stretch of the chain, used for a
// push fan-out's acknowledgements) writes the same chain as appending one by one:
// it verifies, keeps checkpoints every 256 entries and at the head only, and a
// single append goes on from it. On the test server's backend (SQLite or PostgreSQL).
import { expect } from 'chai';
import { wipe } from '../../common/crypto.js';
import { AuditLog, verifyAudit } from '../../server/audit.js';
import { dataDirDb, loadDataDir } from '../../server/datadir.js';
import { openServerDb } from '../../server/db.js';
import { startServer } from '../helpers/proc.js';

describe('audit appendMany (the server data dir, its backend)', function () {
  this.timeout(120_000);

  it('a batch of 600 across two checkpoint intervals verifies, with checkpoints where the log keeps them, and single appends go on from it', async () => {
    const s = await startServer();
    await s.stop();
    const data = loadDataDir(s.dir);
    const sdb = await openServerDb({ url: dataDirDb(s.dir), dir: s.dir });
    try {
      const log = new AuditLog(sdb.db, data.signingKey);
      const start = (await sdb.db.get<{ n: number }>('SELECT COUNT(*) AS n FROM audit'))!.n;
      await log.append('enroll.token', null, { expiresAt: 'x' });
      await log.appendMany(Array.from({ length: 600 }, (_, i) => ({ type: 'policy.ack' as const, device: `dev-${i}`, data: { command: `cmd-${i}`, ok: true } })));
      await log.append('enroll.token', null, { expiresAt: 'y' });
      const total = start + 602;
      const v = await verifyAudit(sdb.db, { serverKey: data.signPublicKey });
      expect(v).to.include({ ok: true, entries: total });
      const cps = (await sdb.db.all<{ seq: number }>('SELECT seq FROM checkpoints ORDER BY seq')).map((c) => c.seq);
      const want = [...Array.from({ length: Math.floor(total / 256) }, (_, i) => (i + 1) * 256), total].filter((x, i, a) => a.indexOf(x) === i);
      expect(cps).to.deep.equal(want);
      const seqs = (await sdb.db.all<{ seq: number }>("SELECT seq FROM audit WHERE type = 'policy.ack' ORDER BY seq")).map((r) => r.seq);
      expect(seqs[0]).to.equal(start + 2);
      expect(seqs.at(-1)).to.equal(start + 601);
      // An empty batch writes nothing.
      await log.appendMany([]);
      expect((await sdb.db.get<{ n: number }>('SELECT COUNT(*) AS n FROM audit'))!.n).to.equal(total);
    } finally {
      await sdb.close();
      wipe(data.masterKey, data.signingKey);
    }
  });
});
