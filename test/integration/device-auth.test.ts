// Signed device requests: replays, stale timestamps and forgeries are refused;
// a revoked device is refused from its next request on; a wipe is handed out
// at the next heartbeat, acted on and acknowledged.
import { expect } from 'chai';
import fs from 'node:fs';
import { signRequest } from '../../common/signing.js';
import { signKeyPair } from '../../common/crypto.js';
import { admin, assign, rejects, enrolledDevice, pushImage, type TestDevice } from '../helpers/fixtures.js';
import { lethe, startServer, TEST_PASSPHRASE, type ServerProc } from '../helpers/proc.js';

describe('device authentication (real server process)', function () {
  let s: ServerProc;
  let dev: TestDevice;
  before(async () => {
    s = await startServer();
    dev = await enrolledDevice(s);
  });
  after(async () => {
    dev?.close();
    await s?.stop();
  });

  function raw(headers: Record<string, string>, body = Buffer.from('{}')) {
    return dev.client.http.request('POST', '/v1/device/heartbeat', { body, headers: { ...headers, 'content-type': 'application/json' } });
  }

  it('a replayed request is refused', async () => {
    const body = Buffer.from('{}');
    const h = { ...signRequest(dev.id.sign.secretKey, dev.deviceId, 'POST', '/v1/device/heartbeat', body) };
    expect((await raw(h, body)).status).to.equal(200);
    const e = await rejects(raw(h, body));
    expect(e.status).to.equal(401);
    expect(e.code).to.equal('SIGNATURE_REPLAYED');
  });

  it('a stale or future timestamp is refused', async () => {
    const body = Buffer.from('{}');
    for (const skew of [-120_000, 120_000]) {
      const h = signRequest(dev.id.sign.secretKey, dev.deviceId, 'POST', '/v1/device/heartbeat', body, Date.now() + skew);
      const e = await rejects(raw(h, body));
      expect(e.code).to.equal('SIGNATURE_STALE');
    }
  });

  it('a bad signature, another key, an unknown device and a changed body all get the same 401', async () => {
    const body = Buffer.from('{}');
    const other = signKeyPair();
    const cases = [
      signRequest(other.secretKey, dev.deviceId, 'POST', '/v1/device/heartbeat', body),
      signRequest(dev.id.sign.secretKey, 'dev-0000000000000000', 'POST', '/v1/device/heartbeat', body),
      signRequest(dev.id.sign.secretKey, dev.deviceId, 'POST', '/v1/device/leases', body),
      {},
    ];
    const seen = new Set<string>();
    for (const h of cases) {
      const e = await rejects(raw(h as Record<string, string>, body));
      expect(e.status).to.equal(401);
      seen.add(JSON.stringify(e.toJSON()));
    }
    const changed = signRequest(dev.id.sign.secretKey, dev.deviceId, 'POST', '/v1/device/heartbeat', body);
    seen.add(JSON.stringify((await rejects(raw(changed, Buffer.from('{"status":{}}')))).toJSON()));
    expect([...seen]).to.deep.equal([JSON.stringify({ code: 'AUTH_FAILED', message: 'device authentication failed' })]);
  });

  it('a revoked device gets 403 on every device call from its next request on', async () => {
    await pushImage(s, 'revoke-img', { chunks: 1 });
    const d = await enrolledDevice(s, 'to-revoke');
    await assign(s, d.deviceId, 'revoke-img');
    const lease = await d.client.lease('revoke-img');
    await d.client.keys(lease.leaseId, [{ kind: 'mem', index: 0 }]);

    const r = await lethe(['admin', 'revoke', d.deviceId, '--json'], s.env);
    expect(r.code, r.stderr).to.equal(0);
    const out = JSON.parse(r.stdout) as { id: string; status: string; command: string };
    expect(out).to.deep.equal({ id: d.deviceId, status: 'revoked', command: out.command });
    expect(out.command, 'the revoke command pushed to the device').to.match(/^cmd-[0-9a-f]{16}$/);

    const calls: [string, () => Promise<unknown>][] = [
      ['heartbeat', () => d.client.heartbeat()],
      ['lease', () => d.client.lease('revoke-img')],
      ['renew', () => d.client.renew(lease.leaseId)],
      ['manifest', () => d.client.manifest(lease.leaseId)],
      ['keys', () => d.client.keys(lease.leaseId, [{ kind: 'mem', index: 0 }])],
      ['chunks', () => d.client.chunks(lease.leaseId, [{ kind: 'mem', index: 0 }])],
    ];
    for (const [what, call] of calls) {
      const e = await rejects(call());
      expect(e.status, what).to.equal(403);
      expect(e.code, what).to.equal('DEVICE_REVOKED');
    }
    // Revocation implies a wipe on the device: 'lethe heartbeat' erases its keys, acknowledges, and says so.
    const hb = await lethe(['heartbeat', '--home', d.home, '--passphrase-fd', '0'], {}, TEST_PASSPHRASE);
    expect(hb.code).to.equal(3);
    expect(hb.stderr).to.match(
      new RegExp(
        `^lethe: error: device ${d.deviceId} was revoked by IT \\(\\S+\\); its keys and cache are deleted\n` +
          `lethe: hint: this machine must be enrolled again: ask IT for a new token, then 'lethe enroll TOKEN --home ${d.home}'\n$`,
      ),
    );
    expect(fs.readdirSync(d.home).sort()).to.deep.equal(['device.json', 'revoked.json', 'server-cert.pem']);
    d.close();
  });

  it('a wipe is handed out at the next heartbeat, acted on, acknowledged and audited', async () => {
    const d = await enrolledDevice(s, 'to-wipe');
    const w = await lethe(['admin', 'wipe', d.deviceId], s.env);
    expect(w.code, w.stderr).to.equal(0);
    expect(w.stdout).to.equal(`device ${d.deviceId} is wipe-pending: it wipes itself now if it is online, else at its next heartbeat\n`);

    // Until it heartbeats, the device can get nothing else.
    expect((await rejects(d.client.lease('revoke-img'))).code).to.equal('DEVICE_WIPE_PENDING');

    const hb = await lethe(['heartbeat', '--home', d.home, '--json', '--passphrase-fd', '0'], {}, TEST_PASSPHRASE);
    expect(hb.code, hb.stderr).to.equal(0);
    const out = JSON.parse(hb.stdout) as { wiped: boolean; acknowledged: boolean; command: string };
    expect(out).to.include({ wiped: true, acknowledged: true });
    expect(fs.existsSync(d.home), 'device home removed').to.equal(false);

    const list = JSON.parse((await lethe(['admin', 'devices', '--json'], s.env)).stdout) as { devices: { id: string; status: string }[] };
    expect(list.devices.find((x) => x.id === d.deviceId)!.status).to.equal('wiped');

    const rep = await lethe(['audit', 'device', d.deviceId, '--since', '1h', '--json'], s.env);
    const types = (JSON.parse(rep.stdout) as { entries: { type: string; data: { command?: string; ok?: boolean } }[] }).entries;
    expect(types.map((e) => e.type)).to.deep.equal(['enroll', 'device.wipe', 'wipe.delivered', 'wipe.ack']);
    expect(types[3].data).to.include({ command: out.command, ok: true });

    // A wiped device is refused from then on.
    expect((await rejects(d.client.heartbeat())).code).to.equal('DEVICE_WIPED');
    d.close();
  });

  it('a wipe acknowledged as failed stays pending and is handed out again', async () => {
    const d = await enrolledDevice(s, 'stubborn');
    const a = admin(s);
    await a.json('POST', `/devices/${d.deviceId}/wipe`);
    a.close();
    const first = await d.client.heartbeat();
    expect(await d.client.ack(first.commands[0].id, false, 'disk busy')).to.deep.equal({ id: first.commands[0].id, acked: false });
    const second = await d.client.heartbeat();
    expect(second.status).to.equal('wipe-pending');
    expect(second.commands.map((c) => c.id)).to.deep.equal([first.commands[0].id]);
    await d.client.ack(second.commands[0].id, true);
    expect((await rejects(d.client.heartbeat())).code).to.equal('DEVICE_WIPED');
    d.close();
  });

  it('a revoked device that is also ordered to wipe still receives the wipe', async () => {
    const d = await enrolledDevice(s, 'lost');
    const a = admin(s);
    await a.json('POST', `/devices/${d.deviceId}/revoke`);
    await a.json('POST', `/devices/${d.deviceId}/wipe`);
    a.close();
    const hb = await d.client.heartbeat();
    expect(hb.status).to.equal('wipe-pending');
    // Both orders, in the order given; the wipe is the one carried out, and its acknowledgement answers the revoke too.
    expect(hb.commands.map((c) => [c.seq, c.type])).to.deep.equal([
      [1, 'revoke'],
      [2, 'wipe'],
    ]);
    await d.client.ack(hb.commands[1].id, true);
    expect((await rejects(d.client.heartbeat())).code).to.equal('DEVICE_WIPED');
    const a2 = admin(s);
    try {
      const revoke = await a2.json<{ ackedAt: string | null; result?: { detail?: string } }>('GET', `/commands/${hb.commands[0].id}`);
      expect(revoke.ackedAt).to.be.a('string');
      expect(revoke.result?.detail).to.equal(`erased by the wipe (${hb.commands[1].id})`);
    } finally {
      a2.close();
    }
    d.close();
  });
});
