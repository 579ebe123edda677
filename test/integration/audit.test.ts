// The audit chain: `lethe audit verify` passes on an untouched log, and names
// the first entry a person edited in SQLite, or the point where it was cut.
import { expect } from 'chai';
import { serverDb } from '../helpers/server-db.js';
import { AUDIT_CHECKPOINT_EVERY } from '../../common/constants.js';
import { assign, enrolledDevice, pushImage } from '../helpers/fixtures.js';
import { lethe, startServer, type ServerProc } from '../helpers/proc.js';

describe('audit log (real server process)', function () {
  let s: ServerProc;
  let deviceId: string;
  before(async () => {
    s = await startServer();
    await pushImage(s, 'audited', { chunks: 2 });
    const d = await enrolledDevice(s);
    deviceId = d.deviceId;
    await assign(s, deviceId, 'audited');
    const lease = await d.client.lease('audited');
    // Enough entries to cross a signed checkpoint.
    for (let i = 0; i < AUDIT_CHECKPOINT_EVERY; i++) await d.client.keys(lease.leaseId, [{ kind: 'mem', index: 2 * (i % 2) }]);
    await d.client.chunks(lease.leaseId, [{ kind: 'disk', index: 0 }]);
    d.close();
  });
  after(async () => {
    await s?.stop();
  });

  const verify = async (extra: string[] = []) => {
    const r = await lethe(['audit', 'verify', '--json', ...extra], s.env);
    return { ...r, body: JSON.parse(r.stdout) as { ok: boolean; entries: number; firstBad: number | null; reason?: string; checkpoints: number } };
  };

  it('an untouched chain verifies, online and offline, with a signed checkpoint', async () => {
    const on = await verify();
    expect(on.code, on.stderr).to.equal(0);
    expect(on.body).to.include({ ok: true, firstBad: null });
    expect(on.body.entries).to.be.greaterThan(AUDIT_CHECKPOINT_EVERY);
    expect(on.body.checkpoints).to.be.at.least(1);
    const off = await verify(['--data', s.dir]);
    expect(off.body).to.deep.equal(on.body);
    const text = await lethe(['audit', 'verify'], s.env);
    expect(text.stdout).to.equal(`audit log intact: ${on.body.entries} entries, ${on.body.checkpoints} signed checkpoint(s)\n`);
  });

  it('the device report lists what the device was given', async () => {
    const r = await lethe(['audit', 'device', deviceId, '--since', '1h', '--json'], s.env);
    expect(r.code, r.stderr).to.equal(0);
    const rep = JSON.parse(r.stdout) as { summary: Record<string, unknown>; entries: { type: string }[] };
    expect(rep.summary).to.deep.equal({
      leases: 1,
      renewals: 0,
      sensitiveKeys: AUDIT_CHECKPOINT_EVERY,
      keysReleased: AUDIT_CHECKPOINT_EVERY,
      chunksServed: 1,
      images: ['audited'],
    });
    const future = await lethe(['audit', 'device', deviceId, '--since', new Date(Date.now() + 60_000).toISOString(), '--json'], s.env);
    expect((JSON.parse(future.stdout) as { entries: unknown[] }).entries).to.have.length(0);
    const bad = await lethe(['audit', 'device', deviceId, '--since', 'yesterday-ish'], s.env);
    expect(bad.code).to.equal(2);
    expect(bad.stderr).to.contain("lethe: error: bad time: 'yesterday-ish'\n");
  });

  it('a row edited in SQLite makes verify fail and name it', async () => {
    const db = await serverDb(s);
    const target = (await db.sql.get<{ seq: number; data: string }>("SELECT seq, data FROM audit WHERE type = 'chunks.serve' ORDER BY seq LIMIT 1"))!;
    const edited = JSON.stringify({ ...JSON.parse(target.data), count: 0 });
    await db.sql.run('UPDATE audit SET data = ? WHERE seq = ?', edited, target.seq);
    try {
      const r = await verify();
      expect(r.code).to.equal(1);
      expect(r.body).to.include({ ok: false, firstBad: target.seq, reason: `entry ${target.seq} does not match its hash` });
      const text = await lethe(['audit', 'verify', '--data', s.dir]);
      expect(text.code).to.equal(1);
      expect(text.stdout).to.equal(
        `audit log BROKEN at entry ${target.seq}: entry ${target.seq} does not match its hash (${target.seq - 1} entries verified before it)\n`,
      );
    } finally {
      await db.sql.run('UPDATE audit SET data = ? WHERE seq = ?', target.data, target.seq);
      await db.close();
    }
    expect((await verify()).body.ok).to.equal(true);
  });

  it('an edit that recomputes the hash is caught by the next entry; a cut log by its checkpoint', async () => {
    const db = await serverDb(s);
    const rows = await db.sql.all<{ seq: number; hash: string }>('SELECT seq, hash FROM audit ORDER BY seq');
    const mid = rows[10];
    await db.sql.run('UPDATE audit SET hash = ? WHERE seq = ?', 'f'.repeat(64), mid.seq);
    try {
      expect((await verify()).body).to.include({ ok: false, firstBad: mid.seq });
    } finally {
      await db.sql.run('UPDATE audit SET hash = ? WHERE seq = ?', mid.hash, mid.seq);
    }
    type Row = { seq: number; ts: string; type: string; device: string | null; data: string; hash: string };
    const backup = await db.sql.all<Row>('SELECT * FROM audit WHERE seq > ?', AUDIT_CHECKPOINT_EVERY - 1);
    await db.sql.run('DELETE FROM audit WHERE seq > ?', AUDIT_CHECKPOINT_EVERY - 1);
    try {
      const r = await verify();
      expect(r.body).to.include({ ok: false, firstBad: AUDIT_CHECKPOINT_EVERY });
      expect(r.body.reason).to.equal(`entry ${AUDIT_CHECKPOINT_EVERY} is missing (the log was truncated before signed entry ${AUDIT_CHECKPOINT_EVERY})`);
    } finally {
      for (const r of backup) await db.sql.run('INSERT INTO audit(seq, ts, type, device, data, hash) VALUES (?, ?, ?, ?, ?, ?)', r.seq, r.ts, r.type, r.device, r.data, r.hash);
      await db.close();
    }
    expect((await verify()).body.ok).to.equal(true);
  });
});
