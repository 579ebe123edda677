// Issue #22, the API-abuse part beyond bad-input.test.ts: hostile ids in paths,
// one enrollment token raced by many, a device reaching for another device's
// lease, a thousand idle TLS connections. Each gets its documented 4xx, the
// server never answers 500 nor stops, and the audit chain verifies afterwards.
import { expect } from 'chai';
import tls from 'node:tls';
import { LetheError } from '../../common/errors.js';
import { enrollDevice } from '../../agent/keys/identity.js';
import { admin, assign, enrolledDevice, pushImage, testUnlock, type TestDevice } from '../helpers/fixtures.js';
import { lethe, startServer, tmpDir, waitFor, type ServerProc } from '../helpers/proc.js';
import type { AdminClient } from '../../cli/admin-client.js';

/** The status and code a request got, refused or not. */
async function outcome(p: Promise<unknown>): Promise<[number, string]> {
  try {
    await p;
    return [200, 'OK'];
  } catch (e) {
    if (!(e instanceof LetheError)) throw e;
    return [e.status, e.code];
  }
}

describe('API abuse (issue #22; real server process)', function () {
  this.timeout(120_000);
  let s: ServerProc;
  let a: AdminClient;
  let mine: TestDevice;
  let other: TestDevice;
  const metricsToken = 'metrics-token-for-the-abuse-tests';

  before(async () => {
    s = await startServer({ env: { LETHE_METRICS_TOKEN: metricsToken } });
    a = admin(s);
    await pushImage(s, 'img', { chunks: 2 });
    mine = await enrolledDevice(s, 'mine');
    other = await enrolledDevice(s, 'other');
    await assign(s, mine.deviceId, 'img');
    await assign(s, other.deviceId, 'img');
  });
  after(async () => {
    a?.close();
    mine?.close();
    other?.close();
    await s?.stop();
  });

  it('ids with ../, NUL, control characters and 10 KB names in admin paths are 4xx, never a 500', async () => {
    const long = 'a'.repeat(10 * 1024);
    const ids = ['..%2F..%2Fetc%2Fpasswd', '../x', 'a%00b', '%00', '%0d%0aX-Injected:%201', long, '%E2%80%AE', 'dev-%FF'];
    for (const id of ids) {
      for (const [method, path] of [
        ['GET', `/devices/${id}`],
        ['POST', `/devices/${id}/revoke`],
        ['POST', `/devices/${id}/assignments`],
        ['GET', `/images/${id}/versions/1/manifest`],
        ['DELETE', `/images/${id}`],
        ['GET', `/audit/devices/${id}`],
        ['GET', `/commands/${id}`],
        ['DELETE', `/users/${id}`],
        ['DELETE', `/tokens/${id}`],
      ] as const) {
        const [st, code] = await outcome(a.json(method, path, method === 'POST' ? { image: 'img' } : undefined));
        expect(st, `${method} ${path.slice(0, 60)} → ${code}`).to.be.within(400, 499);
      }
    }
  });

  it('a NUL in a JSON string is refused as BAD_REQUEST, never stored (PostgreSQL cannot hold it)', async () => {
    expect(await outcome(a.json('POST', '/images', { name: 'nul', policy: 'name: a\u0000b\n' }))).to.deep.equal([400, 'BAD_REQUEST']);
    const { token } = await a.json<{ token: string }>('POST', '/enroll-tokens', {});
    const named = await outcome(enrollDevice(tmpDir('lethe-nul-'), token, 'lap\u0000top', { seal: 'passphrase', unlock: testUnlock(), argon2: 'interactive' }));
    expect(named).to.deep.equal([400, 'BAD_REQUEST']);
    // The token was not spent on the refused request.
    await enrollDevice(tmpDir('lethe-nul-'), token, 'laptop-after-nul', { seal: 'passphrase', unlock: testUnlock(), argon2: 'interactive' });
  });

  it('hostile ids in device paths are 4xx too, and an image name of 10 KB is refused at lease', async () => {
    for (const id of ['../lease', 'lease-%00', 'x'.repeat(10 * 1024)]) {
      const [st] = await outcome(mine.client.renew(id));
      expect(st, id.slice(0, 20)).to.be.within(400, 499);
      const [st2] = await outcome(mine.client.manifest(id));
      expect(st2, id.slice(0, 20)).to.be.within(400, 499);
    }
    expect((await outcome(mine.client.lease('x'.repeat(10 * 1024))))[0]).to.be.within(400, 499);
  });

  it('one enrollment token raced by eight enrollments makes exactly one device; the token is spent after', async () => {
    const { token } = await a.json<{ token: string }>('POST', '/enroll-tokens', {});
    const tries = await Promise.allSettled(
      Array.from({ length: 8 }, (_, i) => enrollDevice(tmpDir('lethe-race-'), token, `race-${i}`, { seal: 'passphrase', unlock: testUnlock(), argon2: 'interactive' })),
    );
    const won = tries.filter((t) => t.status === 'fulfilled');
    const lost = tries.filter((t): t is PromiseRejectedResult => t.status === 'rejected');
    expect(won).to.have.length(1);
    expect(lost.map((l) => (l.reason as LetheError).code)).to.deep.equal(Array(7).fill('ENROLL_TOKEN_INVALID'));
    const again = await outcome(enrollDevice(tmpDir('lethe-race-'), token, 'late', { seal: 'passphrase', unlock: testUnlock(), argon2: 'interactive' }));
    expect(again).to.deep.equal([401, 'ENROLL_TOKEN_INVALID']);
    const devices = await a.json<{ devices: { name: string }[] }>('GET', '/devices');
    expect(devices.devices.filter((d) => d.name.startsWith('race-'))).to.have.length(1);
  });

  it("a device cannot use another device's lease: renew, manifest, keys, chunks, trace, prefetch and check-in are all UNKNOWN_LEASE", async () => {
    const lease = await mine.client.lease('img');
    const theirs = other.client;
    const calls: [string, () => Promise<unknown>][] = [
      ['renew', () => theirs.renew(lease.leaseId)],
      ['manifest', () => theirs.manifest(lease.leaseId)],
      ['keys', () => theirs.keys(lease.leaseId, [{ kind: 'mem', index: 0 }])],
      ['chunks', () => theirs.chunks(lease.leaseId, [{ kind: 'mem', index: 0 }])],
      ['trace', () => theirs.uploadTrace(lease.leaseId, Uint32Array.from([0, 1]))],
      ['prefetch', () => theirs.prefetchOrder(lease.leaseId)],
      ['checkin', () => theirs.checkin(lease.leaseId, Buffer.alloc(0), true)],
    ];
    for (const [what, call] of calls) expect(await outcome(call()), what).to.deep.equal([404, 'UNKNOWN_LEASE']);
    // Nothing of the lease reached the other device's audit record.
    const report = await a.json<{ entries: { type: string }[] }>('GET', `/audit/devices/${other.deviceId}`);
    expect(report.entries.map((e) => e.type)).to.not.include.members(['keys.release', 'chunks.serve', 'trace.upload', 'checkin']);
    // The lease still works for its own device.
    expect((await mine.client.keys(lease.leaseId, [{ kind: 'mem', index: 0 }])).chunks).to.have.length(1);
  });

  it('a thousand idle TLS connections hold no request back, and are closed by the server in time', async () => {
    const url = new URL(s.url);
    const sockets: tls.TLSSocket[] = [];
    const closed = { n: 0, secure: 0, errors: [] as string[] };
    try {
      for (let i = 0; i < 1000; i++) {
        const sock = tls.connect({ host: url.hostname, port: Number(url.port), rejectUnauthorized: false });
        sock.on('secureConnect', () => closed.secure++);
        // Reading (nothing comes) is what notices the server's end of the connection.
        sock.resume();
        sock.on('error', (e) => closed.errors.push(e.message));
        sock.on('close', () => closed.n++);
        sockets.push(sock);
      }
      // Requests are still answered while they sit there.
      expect((await a.http.request('GET', '/healthz')).status).to.equal(200);
      expect((await mine.client.heartbeat()).status).to.equal('active');
      // With no request on them, Node's headers timeout (10 s by default) ends them too.
      await waitFor(async () => (closed.n === 1000 ? true : undefined), 90_000, `the server to close the idle connections (${closed.n} closed, ${closed.secure} connected, errors: ${[...new Set(closed.errors)].join('; ')})`);
    } finally {
      for (const sock of sockets) sock.destroy();
    }
  });

  it('after all of it: the server is up, never answered 500, and the audit chain verifies', async () => {
    expect(s.proc.exitCode).to.equal(null);
    const metrics = (await a.http.request('GET', '/metrics', { headers: { authorization: `Bearer ${metricsToken}` } })).body.toString();
    expect(metrics).to.not.match(/status="5\d\d"/);
    const v = await lethe(['audit', 'verify', '--json'], s.env);
    expect(v.code, v.stderr).to.equal(0);
    expect(JSON.parse(v.stdout)).to.include({ ok: true });
  });
});
