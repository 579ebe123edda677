// AuditLog.appendMany (a batch of entries in one stretch of the chain, used for a
// push fan-out's acknowledgements) writes the same chain as appending one by one:
// it verifies, keeps checkpoints every 256 entries and at the head only, and a
// single append goes on from it. AuditLog.commit (group commit) writes the entries
// of everyone waiting in one transaction, in the order they came, and a group that
// cannot be written fails every entry in it. On the test server's backend (SQLite
// or PostgreSQL).
import { expect } from 'chai';
import { wipe } from '../../common/crypto.js';
import { isLetheError } from '../../common/errors.js';
import { AuditLog } from '../../server/audit.js';
import { verifyAudit } from '../../server/audit-read.js';
import { dataDirDb, loadDataDir } from '../../server/datadir.js';
import { openServerDb } from '../../server/db.js';
import type { Sql } from '../../server/sql.js';
import { startServer } from '../helpers/proc.js';
import { serverDb } from '../helpers/server-db.js';

/** `db`, counting its transactions. */
function counting(db: Sql): { db: Sql; txs: () => number } {
  let n = 0;
  const counted = new Proxy(db, {
    get(target, prop, receiver) {
      if (prop === 'tx') {
        return <T>(fn: (t: Sql) => Promise<T>) => {
          n++;
          return target.tx(fn);
        };
      }
      const v = Reflect.get(target, prop, receiver);
      return typeof v === 'function' ? v.bind(target) : v;
    },
  });
  return { db: counted, txs: () => n };
}

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

  it('commit: entries waiting meanwhile go in one transaction, in the order they came; a group that cannot be written fails every entry in it', async () => {
    const s = await startServer();
    await s.stop();
    const data = loadDataDir(s.dir);
    const sdb = await openServerDb({ url: dataDirDb(s.dir), dir: s.dir });
    const refusing = await serverDb(s);
    try {
      const { db, txs } = counting(sdb.db);
      const log = new AuditLog(db, data.signingKey);
      const start = (await sdb.db.get<{ n: number }>('SELECT COUNT(*) AS n FROM audit'))!.n;
      // The first goes at once; the 49 that come while it commits go together after it.
      await Promise.all(Array.from({ length: 50 }, (_, i) => log.by('user:ann').commit('keys.release', `dev-${i}`, { n: i })));
      expect(txs()).to.equal(2);
      const rows = await sdb.db.all<{ seq: number; device: string; data: string }>("SELECT seq, device, data FROM audit WHERE type = 'keys.release' ORDER BY seq");
      expect(rows.map((r) => r.device)).to.deep.equal(Array.from({ length: 50 }, (_, i) => `dev-${i}`));
      expect(rows[0].seq).to.equal(start + 1);
      expect(JSON.parse(rows[7].data)).to.deep.equal({ n: 7, actor: 'user:ann' });
      expect(await verifyAudit(sdb.db, { serverKey: data.signPublicKey })).to.include({ ok: true, entries: start + 50 });

      // Inside a transaction it would wait for itself: refused at once.
      await sdb.db.tx(async (t) => {
        expect(() => log.on(t).commit('keys.release', null, {})).to.throw(/outside/);
      });

      await refusing.refuseAudit();
      const outcomes = await Promise.allSettled(Array.from({ length: 20 }, (_, i) => log.commit('chunks.serve', `dev-${i}`, { n: i })));
      await refusing.allowAudit();
      expect(outcomes.map((o) => o.status === 'rejected' && isLetheError(o.reason, 'AUDIT_UNAVAILABLE'))).to.deep.equal(Array(20).fill(true));
      expect((await sdb.db.get<{ n: number }>('SELECT COUNT(*) AS n FROM audit'))!.n).to.equal(start + 50);
      // The log goes on once it can be written.
      await log.commit('chunks.serve', 'dev-0', { n: 0 });
      expect(await verifyAudit(sdb.db, { serverKey: data.signPublicKey })).to.include({ ok: true, entries: start + 51 });
    } finally {
      await refusing.allowAudit();
      await refusing.close();
      await sdb.close();
      wipe(data.masterKey, data.signingKey);
    }
  });
});
