// Issue #14: what an unauthenticated caller can make the server spend. Headers are
// checked before a body is read; compressed bodies, floods, slow clients and too
// many connections are refused; /metrics needs its own token.
import { expect } from 'chai';
import { randomBytes } from 'node:crypto';
import tls from 'node:tls';
import zlib from 'node:zlib';
import { HDR_DEVICE, HDR_NONCE, HDR_SIGNATURE, HDR_TIMESTAMP } from '../../common/constants.js';
import { PinnedClient } from '../../common/http-client.js';
import type { LetheError } from '../../common/errors.js';
import { admin, enrolledDevice, rejects } from '../helpers/fixtures.js';
import { lethe, startServer, type ServerProc } from '../helpers/proc.js';

/** A TLS connection to the server, with everything it received and whether it was closed. */
function rawConnection(s: ServerProc) {
  const u = new URL(s.url);
  const sock = tls.connect({ host: u.hostname, port: Number(u.port), rejectUnauthorized: false });
  let received = '';
  sock.on('data', (d) => (received += d));
  sock.on('error', () => {});
  const closed = new Promise<void>((r) => sock.once('close', () => r()));
  const connected = new Promise<void>((resolve, reject) => {
    sock.once('secureConnect', () => resolve());
    sock.once('close', () => reject(new Error('closed before the TLS handshake finished')));
  });
  connected.catch(() => {});
  return { sock, connected, closed, received: () => received };
}

const within = <T>(p: Promise<T>, ms: number, what: string) =>
  Promise.race([p, new Promise<never>((_, reject) => setTimeout(() => reject(new Error(`not within ${ms} ms: ${what}`)), ms))]);

async function status(s: ServerProc, method: string, path: string, headers: Record<string, string>, body?: Buffer) {
  const c = new PinnedClient(s.url, s.fingerprint);
  try {
    const r = await c.request(method, path, { body, headers });
    return { status: r.status, code: undefined as string | undefined, headers: r.headers, body: r.body.toString() };
  } catch (e) {
    const err = e as { status: number; code: string };
    return { status: err.status, code: err.code, headers: {}, body: '' };
  } finally {
    c.close();
  }
}

describe('issue #14: unauthenticated resource use (real server process)', function () {
  this.timeout(60_000);

  describe('with the default limits', () => {
    let s: ServerProc;
    before(async () => {
      s = await startServer();
    });
    after(async () => {
      await s?.stop();
    });

    it("an unknown device's large body is refused from its headers, before the client sent any of it, and the connection is closed", async () => {
      const c = rawConnection(s);
      await c.connected;
      const headers = [
        'POST /v1/device/leases HTTP/1.1',
        'Host: x',
        'Content-Type: application/json',
        `Content-Length: ${1024 * 1024}`,
        `${HDR_DEVICE}: dev-0000000000000000`,
        `${HDR_TIMESTAMP}: ${Date.now()}`,
        `${HDR_NONCE}: ${randomBytes(16).toString('base64url')}`,
        `${HDR_SIGNATURE}: ${randomBytes(64).toString('base64url')}`,
      ];
      c.sock.write(headers.join('\r\n') + '\r\n\r\n');
      // The body never comes: the old server waited for it (until its 60 s request timeout).
      await within(c.closed, 5_000, 'the server answering and closing');
      expect(c.received()).to.match(/^HTTP\/1\.1 401 /);
      expect(c.received()).to.contain('"code":"AUTH_FAILED"');
    });

    it('a signed request with no signature headers is refused the same way before its body', async () => {
      const c = rawConnection(s);
      await c.connected;
      c.sock.write(`POST /v1/device/heartbeat HTTP/1.1\r\nHost: x\r\nContent-Length: ${8 * 1024 * 1024}\r\n\r\n`);
      await within(c.closed, 5_000, 'the server answering and closing');
      expect(c.received()).to.match(/^HTTP\/1\.1 401 /);
      expect(c.received()).to.contain('{"code":"AUTH_FAILED","message":"device authentication failed"}');
    });

    it('a compressed body is refused with 415 UNSUPPORTED_ENCODING, on open, device and admin routes', async () => {
      const body = zlib.gzipSync(JSON.stringify({ token: 'lethe-enroll-abc', name: 'n', signPublicKey: 'A'.repeat(43), boxPublicKey: 'A'.repeat(43) }));
      const enc = { 'content-type': 'application/json', 'content-encoding': 'gzip' };
      expect(await status(s, 'POST', '/v1/enroll', enc, body)).to.include({ status: 415, code: 'UNSUPPORTED_ENCODING' });
      expect(await status(s, 'POST', '/v1/admin/images', { ...enc, authorization: `Bearer ${s.adminToken}` }, zlib.deflateSync('{"name":"z"}'))).to.include({
        status: 415,
        code: 'UNSUPPORTED_ENCODING',
      });
      expect(await status(s, 'POST', '/v1/device/heartbeat', { ...enc, 'content-encoding': 'br' }, Buffer.from('{}'))).to.include({
        status: 415,
        code: 'UNSUPPORTED_ENCODING',
      });
      // identity is no encoding at all
      const a = admin(s);
      try {
        const r = await a.http.request('POST', '/v1/admin/images', {
          body: Buffer.from('{"name":"plain"}'),
          headers: { authorization: `Bearer ${s.adminToken}`, 'content-type': 'application/json', 'content-encoding': 'identity' },
        });
        expect(r.status).to.equal(201);
      } finally {
        a.close();
      }
    });

    it('GET /metrics is not served without a configured token', async () => {
      const r = await status(s, 'GET', '/metrics', {});
      expect(r).to.include({ status: 404, code: 'NOT_FOUND' });
      expect(await status(s, 'GET', '/metrics', { authorization: `Bearer ${s.adminToken}` })).to.include({ status: 404 });
    });

    it('a time the audit query cannot hold is a 400 that quotes it, not a 500', async () => {
      const a = admin(s);
      try {
        for (const [since, message] of [
          ['99999999999999999999h', "bad time: '99999999999999999999h' is longer than 36500d"],
          ['1960-01-01T00:00:00Z', "bad time: '1960-01-01T00:00:00Z' is before 1970"],
        ]) {
          const e = await rejects(a.json('GET', `/audit/devices/dev-1?since=${encodeURIComponent(since)}`));
          expect([e.status, e.code, e.message]).to.deep.equal([400, 'BAD_REQUEST', message]);
        }
        const cli = await lethe(['audit', 'device', 'dev-1', '--since', '99999999999999999999h'], s.env);
        expect([cli.code, cli.stderr.split('\n')[0]]).to.deep.equal([2, "lethe: error: bad time: '99999999999999999999h' is longer than 36500d"]);
      } finally {
        a.close();
      }
      expect(s.stderr()).to.not.contain('error:');
    });
  });

  describe('with a metrics token', () => {
    const token = randomBytes(24).toString('hex');
    let s: ServerProc;
    before(async () => {
      s = await startServer({ env: { LETHE_METRICS_TOKEN: token } });
    });
    after(async () => {
      await s?.stop();
    });

    it('GET /metrics needs the token: missing or wrong is 401 METRICS_AUTH_FAILED, the admin token is not it', async () => {
      expect(await status(s, 'GET', '/metrics', {})).to.include({ status: 401, code: 'METRICS_AUTH_FAILED' });
      expect(await status(s, 'GET', '/metrics', { authorization: `Bearer ${s.adminToken}` })).to.include({ status: 401, code: 'METRICS_AUTH_FAILED' });
      const ok = await status(s, 'GET', '/metrics', { authorization: `Bearer ${token}` });
      expect(ok.status).to.equal(200);
      expect(ok.body).to.match(/lethe_http_requests_total\{method="GET",route="\/metrics",status="401"\} 2/);
    });

    it('a short metrics token is refused at start', async () => {
      const r = await lethe(['server', 'run', '--data', s.dir, '--listen', '127.0.0.1:0', '--metrics-token', 'short']);
      expect([r.code, r.stderr]).to.deep.equal([
        2,
        'lethe: error: the metrics token is shorter than 16 characters or holds white space\nlethe: hint: use a long random token, e.g. from: openssl rand -hex 24\n',
      ]);
    });
  });

  describe('rate limits', () => {
    let s: ServerProc;
    before(async () => {
      s = await startServer({ runArgs: ['--rate-enroll', '3/min', '--rate-auth-failures', '2/min', '--rate-device', '5/min'] });
    });
    after(async () => {
      await s?.stop();
    });

    it('enrollment past its rate per address gets 429 RATE_LIMITED with Retry-After', async () => {
      const junk = Buffer.from(JSON.stringify({ token: 'lethe-enroll-abc', name: 'n', signPublicKey: 'A'.repeat(43), boxPublicKey: 'A'.repeat(43) }));
      const codes: (string | undefined)[] = [];
      for (let i = 0; i < 3; i++) codes.push((await status(s, 'POST', '/v1/enroll', { 'content-type': 'application/json' }, junk)).code);
      expect(codes).to.deep.equal(['ENROLL_TOKEN_INVALID', 'ENROLL_TOKEN_INVALID', 'ENROLL_TOKEN_INVALID']);
      const c = new PinnedClient(s.url, s.fingerprint);
      try {
        const e = await rejects(c.request('POST', '/v1/enroll', { body: junk, headers: { 'content-type': 'application/json' } }));
        expect([e.status, e.code, e.message]).to.deep.equal([429, 'RATE_LIMITED', 'too many enrollment requests from this address']);
        expect(e.hint).to.match(/^retry after (1[5-9]|20) s$/);
      } finally {
        c.close();
      }
      const raw = rawConnection(s);
      await raw.connected;
      raw.sock.write('POST /v1/enroll HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\nConnection: close\r\n\r\n{}');
      await within(raw.closed, 5_000, 'the answer');
      expect(raw.received()).to.match(/^HTTP\/1\.1 429 /);
      expect(raw.received()).to.match(/\r\nRetry-After: (1[5-9]|20)\r\n/i);
    });

    it('failed admin tokens past their rate hold back every admin request from that address', async () => {
      const bad = { authorization: 'Bearer wrong-token' };
      expect((await status(s, 'GET', '/v1/admin/devices', bad)).code).to.equal('ADMIN_AUTH_FAILED');
      expect((await status(s, 'GET', '/v1/admin/devices', bad)).code).to.equal('ADMIN_AUTH_FAILED');
      // Even the right token waits now: the address spent its failures.
      expect(await status(s, 'GET', '/v1/admin/devices', { authorization: `Bearer ${s.adminToken}` })).to.include({ status: 429, code: 'RATE_LIMITED' });
    });

    it('a device past its rate gets 429 RATE_LIMITED; the requests counted are its verified ones', async () => {
      const s2 = await startServer({ runArgs: ['--rate-device', '5/min'] });
      try {
        const d = await enrolledDevice(s2);
        try {
          // Forged requests in its name do not spend its budget.
          for (let i = 0; i < 5; i++) {
            const e = await rejects(
              d.client.http.request('POST', '/v1/device/heartbeat', {
                body: Buffer.from('{}'),
                headers: {
                  [HDR_DEVICE]: d.deviceId,
                  [HDR_TIMESTAMP]: String(Date.now()),
                  [HDR_NONCE]: randomBytes(16).toString('base64url'),
                  [HDR_SIGNATURE]: randomBytes(64).toString('base64url'),
                  'content-type': 'application/json',
                },
              }),
            );
            expect(e.code).to.equal('AUTH_FAILED');
          }
          for (let i = 0; i < 5; i++) await d.client.heartbeat();
          const e = await rejects(d.client.heartbeat());
          expect([e.status, e.code, e.message]).to.deep.equal([429, 'RATE_LIMITED', 'too many requests from this device']);
          expect(e.hint).to.match(/^retry after \d+ s$/);
        } finally {
          d.close();
        }
      } finally {
        await s2.stop();
      }
    });

    it('push channel upgrades count against the same budgets: per device once verified, per address before anything', async () => {
      const s2 = await startServer({ runArgs: ['--rate-device', '3/min', '--rate-device-address', '6/min'] });
      try {
        const d = await enrolledDevice(s2);
        try {
          const open = () =>
            d.client.openPush().then(
              (ws) => {
                ws.terminate();
                return 'open';
              },
              (e: LetheError) => `${e.status} ${e.code}: ${e.message} (${e.hint})`,
            );
          const seen: string[] = [];
          for (let i = 0; i < 4; i++) seen.push(await open());
          expect(seen.slice(0, 3)).to.deep.equal(['open', 'open', 'open']);
          expect(seen[3]).to.match(/^429 RATE_LIMITED: too many requests from this device \(retry after \d+ s\)$/);
          for (let i = 0; i < 2; i++) await open();
          // The address has spent its 6: refused before the device is even looked up.
          expect(await open()).to.match(/^429 RATE_LIMITED: too many device requests from this address \(retry after \d+ s\)$/);
        } finally {
          d.close();
        }
      } finally {
        await s2.stop();
      }
    });

    it('a bad rate is refused at start, quoted', async () => {
      const r = await lethe(['server', 'run', '--data', s.dir, '--rate-device', 'lots']);
      expect([r.code, r.stderr]).to.deep.equal([2, "lethe: error: bad --rate-device: 'lots'\nlethe: hint: use a count per second, minute or hour, e.g. 200/s or 60/min, or off\n"]);
    });
  });

  describe('connections', () => {
    let s: ServerProc;
    before(async () => {
      s = await startServer({ runArgs: ['--max-connections', '2', '--headers-timeout', '1s', '--request-timeout', '5s'] });
    });
    after(async () => {
      await s?.stop();
    });

    it('a client that sends headers slowly is cut off at the headers timeout (slow loris)', async () => {
      const c = rawConnection(s);
      await c.connected;
      const t0 = Date.now();
      c.sock.write('GET /healthz HTTP/1.1\r\nHost: x\r\n');
      const drip = setInterval(() => c.sock.write('X-Slow: 1\r\n'), 200);
      try {
        await within(c.closed, 4_000, 'the server closing a slow client');
      } finally {
        clearInterval(drip);
      }
      expect(Date.now() - t0).to.be.within(800, 4_000);
      expect(c.received()).to.not.contain('"ok":true');
    });

    it('past --max-connections a new connection is closed at once; one frees a place', async () => {
      const held = [rawConnection(s), rawConnection(s)];
      await Promise.all(held.map((h) => h.connected));
      const third = rawConnection(s);
      const refused = await third.connected.then(
        () => false,
        () => true,
      );
      expect(refused, 'the third connection was closed').to.equal(true);
      held[0].sock.destroy();
      await held[0].closed;
      await new Promise((r) => setTimeout(r, 100));
      const fourth = rawConnection(s);
      await fourth.connected;
      fourth.sock.write('GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n');
      await within(fourth.closed, 4_000, 'the answer');
      expect(fourth.received()).to.match(/^HTTP\/1\.1 200 /);
      held[1].sock.destroy();
    });
  });
});
