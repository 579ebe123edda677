// Two server replicas on one PostgreSQL database (docs/fleet.md): a device may
// call either; a nonce seen by one is refused by the other; an enrollment token
// used on both at once enrolls one device; a revoke on one refuses the device on
// the other from its next request; appends from both form one audit chain.
import { expect } from 'chai';
import fs from 'node:fs';
import path from 'node:path';
import { signRequest } from '../../common/signing.js';
import { b64u, boxKeyPair, signKeyPair, wipe } from '../../common/crypto.js';
import { LetheError } from '../../common/errors.js';
import { PinnedClient } from '../../common/http-client.js';
import { DeviceClient } from '../../agent/remote/device-client.js';
import { PushChannel } from '../../agent/remote/push-channel.js';
import { AuditLog } from '../../server/audit.js';
import { verifyAudit } from '../../server/audit-read.js';
import { loadDataDir } from '../../server/datadir.js';
import { openServerDb } from '../../server/db.js';
import { openCommand } from '../../common/push.js';
import { admin, assign, enrolledDevice, pushImage, rejects, testUnlock, type TestDevice } from '../helpers/fixtures.js';
import { lethe, startServer, tmpDir, waitFor, TEST_PASSPHRASE, type ServerProc } from '../helpers/proc.js';
import { freshDatabase, psql } from '../helpers/pg.js';
import { startHaproxy } from '../helpers/haproxy.js';
import { Link } from '../helpers/link.js';

/** A second replica: a copy of the first one's data dir (keys, certificate, config), started on its own port. */
async function replicaOf(a: ServerProc, runArgs?: string[]): Promise<ServerProc> {
  const dir = path.join(tmpDir('lethe-replica-'), 'data');
  fs.cpSync(a.dir, dir, { recursive: true });
  return startServer({ dir, adminToken: a.adminToken, auditKey: a.auditKey, runArgs });
}

/** The same device, talking to another replica (as after a failover). */
function via(d: TestDevice, s: ServerProc): DeviceClient {
  return new DeviceClient({ ...d.id, info: { ...d.id.info, server: s.url } });
}

describe('two replicas on one PostgreSQL database', function () {
  this.timeout(120_000);
  let url: string;
  let a: ServerProc;
  let b: ServerProc;
  let dev: TestDevice;
  let onB: DeviceClient;

  before(async () => {
    url = freshDatabase();
    a = await startServer({ db: ['--db', url] });
    b = await replicaOf(a);
    await pushImage(a, 'desk', { chunks: 8 });
    dev = await enrolledDevice(a, 'laptop');
    await assign(b, dev.deviceId, 'desk');
    onB = via(dev, b);
  });
  after(async () => {
    onB?.close();
    dev?.close();
    await b?.stop();
    await a?.stop();
  });

  it('share one fleet: a lease granted by one replica is renewed and used on the other', async () => {
    const lease = await dev.client.lease('desk');
    const keys = await onB.keys(lease.leaseId, [{ kind: 'mem', index: 0 }]);
    expect(keys.chunks).to.have.length(1);
    const renewed = await onB.renew(lease.leaseId);
    expect(renewed.leaseId).to.equal(lease.leaseId);
    const blobs = await dev.client.chunks(lease.leaseId, [{ kind: 'mem', index: 0 }]);
    expect(blobs).to.have.length(1);
    const devices = await admin(b).json<{ devices: { id: string }[] }>('GET', '/devices');
    expect(devices.devices.map((d) => d.id)).to.include(dev.deviceId);
  });

  it('a request replayed to the other replica is refused (SIGNATURE_REPLAYED)', async () => {
    const body = Buffer.from('{}');
    const h = signRequest(dev.id.sign.secretKey, dev.deviceId, 'POST', '/v1/device/heartbeat', body);
    const send = (c: DeviceClient) => c.http.request('POST', '/v1/device/heartbeat', { body, headers: { ...h, 'content-type': 'application/json' } });
    expect((await send(dev.client)).status).to.equal(200);
    const e = await rejects(send(onB));
    expect(e.status).to.equal(401);
    expect(e.code).to.equal('SIGNATURE_REPLAYED');
  });

  it('one enrollment token used on both replicas at once enrolls exactly one device', async () => {
    for (let round = 0; round < 5; round++) {
      const { token } = await admin(a).json<{ token: string }>('POST', '/enroll-tokens', {});
      const results = await Promise.allSettled(
        [a, b].map((s, i) => {
          const http = new PinnedClient(s.url, s.fingerprint);
          const body = { token, name: `race-${round}-${i}`, signPublicKey: b64u.encode(signKeyPair().publicKey), boxPublicKey: b64u.encode(boxKeyPair().publicKey) };
          return http.json<{ deviceId: string }>('POST', '/v1/enroll', body).finally(() => http.close());
        }),
      );
      const won = results.filter((r) => r.status === 'fulfilled');
      expect(won, `round ${round}`).to.have.length(1);
      const lost = results.find((r) => r.status === 'rejected') as PromiseRejectedResult;
      expect((lost.reason as LetheError).code).to.equal('ENROLL_TOKEN_INVALID');
    }
    expect(Number(psql(url, "SELECT COUNT(*) FROM devices WHERE name LIKE 'race-%'"))).to.equal(5);
  });

  it('appends from both replicas at once form one chain: no fork, no gap, every entry signed at the head', async () => {
    const lease = await dev.client.lease('desk');
    const before = Number(psql(url, 'SELECT MAX(seq) FROM audit'));
    const calls = [];
    for (let i = 0; i < 40; i++) {
      const c = i % 2 === 0 ? dev.client : onB;
      calls.push(c.keys(lease.leaseId, [{ kind: 'mem', index: (i % 4) * 2 }]));
    }
    await Promise.all(calls);
    const after = Number(psql(url, 'SELECT MAX(seq) FROM audit'));
    expect(after - before).to.equal(40);
    expect(Number(psql(url, 'SELECT COUNT(*) FROM audit'))).to.equal(after);
    for (const s of [a, b]) {
      const r = await lethe(['audit', 'verify', '--json'], s.env);
      expect(r.code, r.stderr).to.equal(0);
      expect(JSON.parse(r.stdout)).to.include({ ok: true, entries: after });
    }
    const offline = await lethe(['audit', 'verify', '--data', a.dir, '--json'], a.env);
    expect(offline.code, offline.stderr).to.equal(0);
    expect(JSON.parse(offline.stdout)).to.include({ ok: true, entries: after });
  });

  it('while another replica appends, a starting replica finds the head signed and a verify of the live log passes (one consistent read)', async () => {
    const data = loadDataDir(a.dir);
    const sdb = await openServerDb({ url, dir: a.dir });
    const log = new AuditLog(sdb.db, data.signingKey);
    let stop = false;
    const mint = async () => {
      const c = admin(a);
      try {
        while (!stop) await c.json('POST', '/enroll-tokens', {});
      } finally {
        c.close();
      }
    };
    const appenders = [mint(), mint(), mint()];
    try {
      for (let i = 0; i < 150; i++) expect(await log.checkHead(), `check ${i}`).to.equal(undefined);
      // An auditor verifying the live log sees one moment of it: no head without its checkpoint, no checkpoint without its entry.
      for (let i = 0; i < 30; i++) expect(await verifyAudit(sdb.db, { serverKey: data.signPublicKey }), `verify ${i}`).to.include({ ok: true });
    } finally {
      stop = true;
      await Promise.all(appenders);
      await sdb.close();
      wipe(data.masterKey, data.signingKey);
    }
  });

  it('a revoke on one replica refuses the device on the other from its next request', async () => {
    const other = await enrolledDevice(a, 'stolen');
    await assign(a, other.deviceId, 'desk');
    const otherOnB = via(other, b);
    try {
      const lease = await otherOnB.lease('desk');
      await admin(a).json('POST', `/devices/${other.deviceId}/revoke`, {});
      const e = await rejects(otherOnB.keys(lease.leaseId, [{ kind: 'mem', index: 0 }]));
      expect(e.code).to.equal('DEVICE_REVOKED');
    } finally {
      otherOnB.close();
      other.close();
    }
  });

  it('a replica given another data dir is refused at start, and init refuses a database already in use', async () => {
    const stranger = path.join(tmpDir('lethe-server-'), 'data');
    const init = await lethe(['server', 'init', '--data', stranger, '--listen', '127.0.0.1:0', '--db', url]);
    expect(init.code).to.equal(2);
    expect(init.stderr).to.contain("already holds a Lethe server's data");
    const own = path.join(tmpDir('lethe-server-'), 'data');
    expect((await lethe(['server', 'init', '--data', own, '--listen', '127.0.0.1:0'])).code).to.equal(0);
    const cfg = JSON.parse(fs.readFileSync(path.join(own, 'config.json'), 'utf8'));
    fs.writeFileSync(path.join(own, 'config.json'), JSON.stringify({ ...cfg, db: url }));
    const run = await lethe(['server', 'run', '--data', own, '--listen', '127.0.0.1:0']);
    expect(run.code).to.equal(2);
    expect(run.stderr).to.match(/the database's audit key is \S+, not this data dir's/);
  });

  it('an unreachable database is named without its password', async () => {
    const dir = path.join(tmpDir('lethe-server-'), 'data');
    const r = await lethe(['server', 'init', '--data', dir, '--listen', '127.0.0.1:0', '--db', 'postgres://lethe:hunter2@127.0.0.1:1/none']);
    expect(r.code).to.equal(1);
    expect(r.stderr).to.contain('cannot reach the database at postgres://lethe:***@127.0.0.1:1/none');
    expect(r.stderr).to.not.contain('hunter2');
  });
});


describe('lethe server migrate: a SQLite server moved into PostgreSQL', function () {
  this.timeout(120_000);

  it('keeps every device, image, lease and audit entry; the chain verifies there under the pinned key', async () => {
    let s = await startServer({ db: [] });
    try {
      const img = await pushImage(s, 'desk', { chunks: 4 });
      const dev = await enrolledDevice(s, 'laptop');
      await assign(s, dev.deviceId, 'desk');
      const lease = await dev.client.lease('desk');
      await dev.client.keys(lease.leaseId, [{ kind: 'mem', index: 0 }]);
      const before = JSON.parse((await lethe(['audit', 'verify', '--json'], s.env)).stdout) as { entries: number };
      await s.stop();

      const url = freshDatabase();
      const r = await lethe(['server', 'migrate', '--from', s.dir, '--to', url, '--json']);
      expect(r.code, r.stderr).to.equal(0);
      const moved = JSON.parse(r.stdout) as { rows: Record<string, number>; verify: { ok: boolean; entries: number } };
      expect(moved.verify).to.include({ ok: true, entries: before.entries });
      expect(moved.rows).to.include({ devices: 1, images: 1, leases: 1, audit: before.entries });
      expect(Number(psql(url, 'SELECT COUNT(*) FROM blobs'))).to.equal(moved.rows.blobs).and.to.be.greaterThan(0);

      // The same data dir now serves from PostgreSQL: the device's lease and keys go on.
      s = await s.restart();
      const renewed = await dev.client.renew(lease.leaseId);
      expect(renewed.version).to.equal(img.version);
      const [blob] = await dev.client.chunks(lease.leaseId, [{ kind: 'mem', index: 0 }]);
      expect(blob.length).to.be.greaterThan(4096);
      const v = await lethe(['audit', 'verify', '--json'], s.env);
      expect(v.code, v.stderr).to.equal(0);
      expect(JSON.parse(v.stdout)).to.include({ ok: true, key: 'pinned' });
      expect(Number(psql(url, "SELECT COUNT(*) FROM audit WHERE type = 'lease.renew'"))).to.equal(1);

      const again = await lethe(['server', 'migrate', '--from', s.dir, '--to', freshDatabase()]);
      expect(again.code).to.equal(2);
      expect(again.stderr).to.contain('already keeps its data in PostgreSQL');
      dev.close();
    } finally {
      await s.stop();
    }
  });

  it('refuses a database that is not empty, and changes nothing', async () => {
    const s = await startServer({ db: [] });
    await s.stop();
    const taken = freshDatabase();
    const other = await startServer({ db: ['--db', taken] });
    await other.stop();
    const r = await lethe(['server', 'migrate', '--from', s.dir, '--to', taken]);
    expect(r.code).to.equal(2);
    expect(r.stderr).to.contain('is not empty');
    expect(JSON.parse(fs.readFileSync(path.join(s.dir, 'config.json'), 'utf8'))).to.not.have.property('db');
  });
});

describe('device failover between replicas', function () {
  this.timeout(180_000);
  let url: string;
  let a: ServerProc;
  let b: ServerProc;

  before(async () => {
    url = freshDatabase();
    a = await startServer({ db: ['--db', url], runArgs: ['--rate-device', 'off', '--rate-device-address', 'off'] });
    b = await replicaOf(a, ['--rate-device', 'off', '--rate-device-address', 'off']);
    await pushImage(a, 'desk', { chunks: 8 });
  });
  after(async () => {
    await b?.stop();
    await a?.stop();
  });

  it('a device enrolled with both URLs goes on with the other when one replica is killed', async () => {
    const { token } = await admin(a).json<{ token: string }>('POST', '/enroll-tokens', {});
    const home = tmpDir('lethe-home-');
    const r = await lethe(
      ['enroll', token, '--home', home, '--seal', 'passphrase', '--argon2', 'interactive', '--passphrase-fd', '0', '--server', b.url, '--json'],
      {},
      `${TEST_PASSPHRASE}\n`,
    );
    expect(r.code, r.stderr).to.equal(0);
    const info = JSON.parse(fs.readFileSync(path.join(home, 'device.json'), 'utf8')) as { deviceId: string; server: string; servers: string[] };
    expect(info).to.include({ server: a.url });
    expect(info.servers).to.deep.equal([b.url]);
    await assign(a, info.deviceId, 'desk');
    const { loadIdentity } = await import('../../agent/keys/identity.js');
    const client = new DeviceClient(await loadIdentity(home, testUnlock()));
    try {
      const lease = await client.lease('desk');
      await a.kill9();
      const renewed = await client.renew(lease.leaseId);
      expect(renewed.leaseId).to.equal(lease.leaseId);
      expect(client.http.baseUrl).to.equal(b.url);
      expect(await client.keys(lease.leaseId, [{ kind: 'mem', index: 0 }])).to.have.property('sealed');
    } finally {
      client.close();
      a = await a.restart();
    }
  });

  it('push across replicas: a command issued on one reaches a device connected to the other at once; when that one is killed the device reconnects to the next and gets the next command', async () => {
    await pushImage(a, 'pushed', { chunks: 2 });
    const t = await enrolledDevice(a, 'pushed-across');
    await assign(a, t.deviceId, 'pushed');
    // Connected to b first (its first URL), a second.
    const client = new DeviceClient({ ...t.id, info: { ...t.id.info, server: b.url, servers: [a.url] } });
    const got: { seq: number; type: string; replica?: string }[] = [];
    const push = new PushChannel(client, (signed) => {
      const cmd = openCommand(b64u.decode(t.id.info.serverSignPublicKey), t.deviceId, signed);
      got.push({ seq: cmd.seq, type: cmd.type, replica: push.replica });
      void client.ack(cmd.id, true, 'seen');
    });
    try {
      await client.lease('pushed');
      push.start();
      await waitFor(async () => push.connected && push.replica !== undefined, 20_000, 'the channel open to b');
      expect(client.http.baseUrl).to.equal(b.url);
      const onB = push.replica;
      await admin(a).json('PUT', '/images/pushed/policy', { policy: 'eviction:\n  idle: 30s\n' });
      await waitFor(async () => got.length >= 1, 20_000, 'the command issued on a, pushed by b');
      expect(got[0]).to.deep.equal({ seq: 1, type: 'policy', replica: onB });

      await b.kill9();
      await waitFor(async () => push.connected && push.replica !== onB, 60_000, 'the channel open again, to a');
      expect(client.http.baseUrl).to.equal(a.url);
      await admin(a).json('PUT', '/images/pushed/policy', { policy: 'eviction:\n  idle: 40s\n' });
      await waitFor(async () => got.length >= 2, 20_000, 'the next command, pushed by a');
      expect(got[1]).to.deep.include({ seq: 2, type: 'policy' });
      expect(got[1].replica).to.not.equal(onB);
    } finally {
      push.stop();
      client.close();
      t.close();
      if (b.proc.exitCode !== null || b.proc.signalCode !== null) b = await b.restart();
    }
  });

  it('a replica that loses its database says so on /healthz (503, DATABASE_UNAVAILABLE), devices go to the next, and it comes back', async () => {
    const link = await Link.start({ port: Number(new URL(url).port) });
    const dir = path.join(tmpDir('lethe-replica-'), 'data');
    fs.cpSync(a.dir, dir, { recursive: true });
    const c = await startServer({ dir, adminToken: a.adminToken, auditKey: a.auditKey, runArgs: ['--db', link.via(url)] });
    const t = await enrolledDevice(a, 'cut-off');
    await assign(a, t.deviceId, 'desk');
    const client = new DeviceClient({ ...t.id, info: { ...t.id.info, server: c.url, servers: [a.url] } });
    const health = async () => {
      const h = new PinnedClient(c.url, c.fingerprint);
      try {
        return await h.request('GET', '/healthz').then(
          (r) => ({ status: r.status, code: undefined as string | undefined }),
          (e: LetheError) => ({ status: e.status, code: e.code as string | undefined }),
        );
      } finally {
        h.close();
      }
    };
    try {
      const lease = await client.lease('desk');
      expect(client.http.baseUrl).to.equal(c.url);
      expect(await health()).to.deep.equal({ status: 200, code: undefined });
      link.drop(8_000, 'reset');
      expect(await health()).to.deep.equal({ status: 503, code: 'DATABASE_UNAVAILABLE' });
      const renewed = await client.renew(lease.leaseId);
      expect(renewed.leaseId).to.equal(lease.leaseId);
      expect(client.http.baseUrl, 'the device went on with the replica that has its database').to.equal(a.url);
      await waitFor(async () => ((await health()).status === 200 ? true : undefined), 30_000, 'the replica back once its database is');
    } finally {
      client.close();
      t.close();
      await c.stop();
      await link.close();
    }
  });

  it('8 devices through HAProxy while a replica is killed and restarted: every call answered, no lease lost, one chain', async () => {
    const lb = await startHaproxy([a, b].map((s) => new URL(s.url).host));
    const devs: { t: TestDevice; c: DeviceClient; lease: string }[] = [];
    let stop = false;
    let work: Promise<void>[] = [];
    try {
      for (let i = 0; i < 8; i++) {
        const t = await enrolledDevice(a, `lb-${i}`);
        await assign(a, t.deviceId, 'desk');
        const c = new DeviceClient({ ...t.id, info: { ...t.id.info, server: lb.url } });
        devs.push({ t, c, lease: (await c.lease('desk')).leaseId });
      }
      const failures: string[] = [];
      let calls = 0;
      work = devs.map(async (d, i) => {
        for (let round = 0; !stop; round++) {
          try {
            if (round % 3 === 0) expect((await d.c.renew(d.lease)).leaseId).to.equal(d.lease);
            else if (round % 3 === 1) await d.c.keys(d.lease, [{ kind: 'mem', index: ((i + round) % 8) * 2 }]);
            else await d.c.chunks(d.lease, [{ kind: 'mem', index: ((i + round) % 8) * 2 }]);
            calls++;
          } catch (e) {
            failures.push(`device ${i} round ${round}: ${(e as Error).message}`);
          }
        }
      });
      const waitCalls = async (n: number) => {
        const target = calls + n;
        while (calls < target && failures.length === 0) await new Promise((r) => setTimeout(r, 20));
      };
      await waitCalls(40);
      const before = await lb.sessions();
      expect(before.r2, 'the replica about to be killed was serving').to.be.greaterThan(0);
      await b.kill9();
      await waitCalls(40);
      const during = await lb.sessions();
      expect(during.r1, 'the other replica took the connections').to.be.greaterThan(before.r1);
      b = await b.restart();
      await waitCalls(80);
      stop = true;
      await Promise.all(work);
      expect(failures, failures.join('\n')).to.deep.equal([]);
      for (const d of devs) expect((await d.c.renew(d.lease)).leaseId).to.equal(d.lease);
      const max = Number(psql(url, 'SELECT MAX(seq) FROM audit'));
      expect(Number(psql(url, 'SELECT COUNT(DISTINCT seq) FROM audit'))).to.equal(max);
      const v = await lethe(['audit', 'verify', '--json'], a.env);
      expect(v.code, v.stderr).to.equal(0);
      expect(JSON.parse(v.stdout)).to.include({ ok: true, entries: max });
    } finally {
      stop = true;
      await Promise.allSettled(work);
      for (const d of devs) {
        d.c.close();
        d.t.close();
      }
      await lb.stop();
    }
  });
});
