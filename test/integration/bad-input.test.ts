// Bad input gets a 4xx with a stable code and a clear message, never a 500 or
// a crash; the server answers normally afterwards.
import { expect } from 'chai';
import { LetheError } from '../../common/errors.js';
import { signRequest } from '../../common/signing.js';
import { admin, assign, enrolledDevice, pushImage, type TestDevice } from '../helpers/fixtures.js';
import { startServer, type ServerProc } from '../helpers/proc.js';
import type { AdminClient } from '../../cli/admin-client.js';

describe('bad input (real server process)', function () {
  let s: ServerProc;
  let a: AdminClient;
  let dev: TestDevice;
  const metricsToken = 'metrics-token-for-bad-input-tests';
  before(async () => {
    s = await startServer({ env: { LETHE_METRICS_TOKEN: metricsToken } });
    a = admin(s);
    await pushImage(s, 'img', { chunks: 1 });
    dev = await enrolledDevice(s);
    await assign(s, dev.deviceId, 'img');
  });
  after(async () => {
    a?.close();
    dev?.close();
    await s?.stop();
  });

  async function status(method: string, path: string, body?: Buffer | string, headers: Record<string, string> = {}) {
    try {
      const r = await a.http.request(method, path, {
        body: typeof body === 'string' ? Buffer.from(body) : body,
        headers: { authorization: `Bearer ${s.adminToken}`, 'content-type': 'application/json', ...headers },
      });
      return { status: r.status, code: undefined as string | undefined, message: '' };
    } catch (e) {
      if (!(e instanceof LetheError)) throw e;
      return { status: e.status, code: e.code as string, message: e.message };
    }
  }

  async function signed(path: string, body: Buffer) {
    const h = signRequest(dev.id.sign.secretKey, dev.deviceId, 'POST', path, body);
    try {
      const r = await dev.client.http.request('POST', path, { body, headers: { ...h, 'content-type': 'application/json' } });
      return { status: r.status, code: undefined as string | undefined, message: '' };
    } catch (e) {
      if (!(e instanceof LetheError)) throw e;
      return { status: e.status, code: e.code as string, message: e.message };
    }
  }

  it('admin routes', async () => {
    const cases: [string, string, string | Buffer | undefined, number, string, string?][] = [
      ['POST', '/v1/admin/images', '{"name": ', 400, 'BAD_JSON', 'request body is not valid JSON'],
      ['POST', '/v1/admin/images', '{"name": 5}', 400, 'BAD_REQUEST'],
      ['POST', '/v1/admin/images', '{"name": "../etc"}', 400, 'BAD_REQUEST'],
      ['POST', '/v1/admin/images', '{"name": "x", "extra": 1}', 400, 'BAD_REQUEST'],
      ['POST', '/v1/admin/images', '{"name": "img"}', 409, 'CONFLICT', "image 'img' already exists"],
      ['POST', '/v1/admin/images', JSON.stringify({ name: 'big', policy: 'x'.repeat(2 * 1024 * 1024) }), 413, 'BODY_TOO_LARGE'],
      ['POST', '/v1/admin/images', JSON.stringify({ name: 'p', policy: 'lease:\n  ttl: [1, 2]\n' }), 400, 'BAD_REQUEST'],
      ['POST', '/v1/admin/devices/dev-0000000000000000/revoke', undefined, 404, 'UNKNOWN_DEVICE', "no device 'dev-0000000000000000'"],
      ['POST', '/v1/admin/devices/dev-0000000000000000/wipe', undefined, 404, 'UNKNOWN_DEVICE'],
      ['POST', `/v1/admin/devices/${dev.deviceId}/assignments`, '{"image": "nope"}', 404, 'UNKNOWN_IMAGE', "no image 'nope'"],
      ['GET', '/v1/admin/images/img/versions/99/manifest', undefined, 404, 'UNKNOWN_VERSION'],
      ['GET', '/v1/admin/images/img/versions/x1/manifest', undefined, 400, 'BAD_REQUEST', "version must be a non-negative integer, got 'x1'"],
      ['PUT', '/v1/admin/images/img/versions/1/chunks/mem/0', Buffer.alloc(4096, 1), 409, 'CONFLICT'],
      ['PUT', '/v1/admin/images/img/versions/1/chunks/swap/0', Buffer.alloc(4096, 1), 400, 'BAD_REQUEST', "unknown chunk kind 'swap'"],
      ['POST', '/v1/admin/images/img/versions', '{"sizes": {"disk": 0, "mem": 1000, "state": 0}}', 400, 'BAD_REQUEST', 'memory size 1000 is not a multiple of 4096'],
      ['GET', '/v1/admin/audit/devices/DROP%20TABLE', undefined, 400, 'BAD_REQUEST'],
      ['GET', '/v1/admin/audit/devices/dev-1?since=someday', undefined, 400, 'BAD_REQUEST', "bad time: 'someday'"],
      ['GET', '/v1/nothing-here', undefined, 404, 'NOT_FOUND', 'no route GET /v1/nothing-here'],
    ];
    for (const [method, path, body, st, code, message] of cases) {
      const r = await status(method, path, body);
      expect([r.status, r.code], `${method} ${path}`).to.deep.equal([st, code]);
      if (message) expect(r.message, `${method} ${path}`).to.equal(message);
    }
  });

  it('a chunk of the wrong size or past the end is refused before anything is stored', async () => {
    const v = await a.json<{ version: number }>('POST', '/images/img/versions', { sizes: { disk: 0, mem: 8192, state: 0 } });
    expect((await status('PUT', `/v1/admin/images/img/versions/${v.version}/chunks/mem/0`, Buffer.alloc(100, 1))).message).to.equal(
      'mem chunk 0 is 100 bytes, expected 4096',
    );
    expect((await status('PUT', `/v1/admin/images/img/versions/${v.version}/chunks/mem/2`, Buffer.alloc(4096, 1))).message).to.equal(
      'mem chunk 2 is past the end (the mem has 2 chunks)',
    );
    expect((await status('PUT', `/v1/admin/images/img/versions/${v.version}/chunks/disk/0`, Buffer.alloc(200 * 1024, 1))).code).to.equal(
      'BODY_TOO_LARGE',
    );
  });

  it('device routes', async () => {
    const lease = await dev.client.lease('img');
    const cases: [string, string, number, string][] = [
      ['/v1/device/leases', '{"image":', 400, 'BAD_JSON'],
      ['/v1/device/leases', '{"image": "nope"}', 404, 'UNKNOWN_IMAGE'],
      ['/v1/device/leases', '[]', 400, 'BAD_REQUEST'],
      ['/v1/device/keys', JSON.stringify({ leaseId: lease.leaseId, chunks: [] }), 400, 'BAD_REQUEST'],
      ['/v1/device/keys', JSON.stringify({ leaseId: lease.leaseId, chunks: [{ kind: 'mem', index: -1 }] }), 400, 'BAD_REQUEST'],
      ['/v1/device/keys', JSON.stringify({ leaseId: lease.leaseId, chunks: Array(1025).fill({ kind: 'mem', index: 0 }) }), 400, 'BAD_REQUEST'],
      ['/v1/device/keys', JSON.stringify({ leaseId: 'lease-0000000000000000', chunks: [{ kind: 'mem', index: 0 }] }), 404, 'UNKNOWN_LEASE'],
      ['/v1/device/commands/cmd-0000000000000000/ack', '{"ok": true}', 404, 'UNKNOWN_COMMAND'],
      [`/v1/device/leases/${lease.leaseId}/checkin?final=0&part=0`, '', 400, 'BAD_REQUEST'],
      [`/v1/device/leases/${lease.leaseId}/checkin?final=0&part=x`, '', 400, 'BAD_REQUEST'],
      [`/v1/device/leases/${lease.leaseId}/checkin?final=0&part=1&part=2`, '', 400, 'BAD_REQUEST'],
      ['/v1/device/heartbeat', 'x'.repeat(2 * 1024 * 1024), 413, 'BODY_TOO_LARGE'],
    ];
    for (const [path, body, st, code] of cases) {
      const r = await signed(path, Buffer.from(body));
      expect([r.status, r.code], `${path} ${body.slice(0, 40)}`).to.deep.equal([st, code]);
    }
  });

  it('unauthenticated enrollment junk', async () => {
    for (const body of ['', 'null', '{"token": 1}', '{"token":"x","name":"n","signPublicKey":"AAAA","boxPublicKey":"AAAA"}']) {
      const r = await status('POST', '/v1/enroll', body);
      expect(r.status, body).to.equal(400);
    }
    const r = await status(
      'POST',
      '/v1/enroll',
      JSON.stringify({ token: 'lethe-enroll-abc', name: 'n', signPublicKey: 'A'.repeat(43), boxPublicKey: 'A'.repeat(43) }),
    );
    expect([r.status, r.code]).to.deep.equal([401, 'ENROLL_TOKEN_INVALID']);
  });

  it('the server is still up, and never answered 500', async () => {
    const r = await status('GET', '/healthz');
    expect(r.status).to.equal(200);
    expect(s.proc.exitCode).to.equal(null);
    const metrics = (await a.http.request('GET', '/metrics', { headers: { authorization: `Bearer ${metricsToken}` } })).body.toString();
    expect(metrics).to.not.match(/status="5\d\d"/);
    expect(metrics).to.match(/lethe_http_requests_total\{method="POST",route="\/v1\/device\/keys",status="400"\} \d+/);
    expect(s.stderr()).to.not.contain('error:');
  });
});
