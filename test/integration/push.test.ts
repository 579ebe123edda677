// The push channel (docs/push.md): a real server process, agents in this process
// whose heartbeat is minutes away, so that only the push can bring the command.
import { expect } from 'chai';
import fs from 'node:fs';
import https from 'node:https';
import path from 'node:path';
import { WebSocketServer, type WebSocket } from 'ws';
import { startAgent, type RunningAgent } from '../../agent/daemon/start.js';
import { readLastSeq } from '../../agent/remote/push-channel.js';
import { readNextPin } from '../../agent/remote/pins.js';
import { b64u, signKeyPair } from '../../common/crypto.js';
import { signCommand, type TPushCommand } from '../../common/push.js';
import { adminCall as adminCallOn, agentInProcess, assign, deviceAudit, enrolledDevice, pushImage, testUnlock } from '../helpers/fixtures.js';
import { lethe, startServer, TEST_PASSPHRASE, waitFor, type ServerProc } from '../helpers/proc.js';
import { serverDb } from '../helpers/server-db.js';

const HOUR = 3_600_000;

describe('push channel (real server, agents in this process)', function () {
  this.timeout(60_000);
  let s: ServerProc;
  const running: RunningAgent[] = [];
  const adminCall = <T>(method: string, p: string, body?: unknown) => adminCallOn<T>(s, method, p, body);
  const audit = (deviceId: string) => deviceAudit(s, deviceId);
  const connected = async (deviceId: string) =>
    (await adminCall<{ devices: { id: string; connected: boolean }[] }>('GET', '/devices')).devices.find((d) => d.id === deviceId)?.connected;
  /** An agent with a lease and its push channel open; its heartbeat an hour away. */
  const pushedAgent = async (image: string, logs: string[] = []) => {
    const { agent, home } = await agentInProcess(s, image, {}, { push: true, heartbeatMs: HOUR, log: (l) => logs.push(l) });
    running.push(agent);
    const deviceId = agent.status().device;
    await waitFor(async () => agent.status().push.connected && (await connected(deviceId)), 20_000, 'the push channel open and listed');
    return { agent, home, deviceId, logs };
  };

  before(async () => {
    s = await startServer();
  });
  afterEach(async () => {
    for (const a of running.splice(0)) {
      a.stop();
      await a.done;
    }
  });
  after(async () => {
    await s?.stop();
  });

  it('lethe admin wipe --wait: the online device wipes itself at once, the CLI prints the acknowledgement, and the audit log has delivery by push and the times', async () => {
    const { agent, home, deviceId } = await pushedAgent('push-wipe');
    const r = await lethe(['admin', 'wipe', deviceId, '--wait', '60s', '--json'], s.env);
    expect(r.code, r.stderr).to.equal(0);
    const out = JSON.parse(r.stdout) as { status: string; command: string; ack: { deliveredVia: string; elapsedMs: number; result: { ok: boolean; zeroedAfterMs: number } } };
    expect(out.ack.deliveredVia).to.equal('push');
    expect(out.ack.result.ok).to.equal(true);
    expect(out.ack.result.zeroedAfterMs).to.be.a('number').at.least(0);
    expect(await agent.done).to.equal(3);
    expect(fs.existsSync(home), 'the wipe removed the device home').to.equal(false);
    expect(agent.lease.renewals).to.equal(0);
    const entries = await audit(deviceId);
    const types = entries.map((e) => e.type);
    expect(types.slice(-3)).to.deep.equal(['device.wipe', 'wipe.delivered', 'wipe.ack']);
    expect(entries.at(-2)!.data).to.deep.include({ command: out.command, via: 'push' });
    expect(entries.at(-1)!.data).to.deep.include({ command: out.command, ok: true, zeroedAfterMs: out.ack.result.zeroedAfterMs });
    expect(entries.at(-1)!.data.elapsedMs).to.equal(out.ack.elapsedMs);
    expect((await adminCall<{ status: string }>('GET', `/devices/${deviceId}`)).status).to.equal('wiped');

    const text = await lethe(['admin', 'devices'], s.env);
    expect(text.stdout).to.match(new RegExp(`${deviceId}\\s+\\S+\\s+wiped\\s+-\\s`));
  });

  it('lethe admin revoke --wait: keys zeroed and the erasure acknowledged at once; the text names the time', async () => {
    const { agent, deviceId } = await pushedAgent('push-revoke');
    const r = await lethe(['admin', 'revoke', deviceId, '--wait'], s.env);
    expect(r.code, r.stderr).to.equal(0);
    expect(r.stdout).to.match(new RegExp(`^device ${deviceId} is revoked\\nacknowledged by the device \\d+\\.\\d\\d s after the command \\(delivered by push; keys zeroed and plaintext evicted \\d+ ms after it arrived\\)\\n$`));
    expect(await agent.done).to.equal(3);
    const types = (await audit(deviceId)).map((e) => e.type);
    expect(types.slice(-3)).to.deep.equal(['device.revoke', 'revoke.delivered', 'revoke.ack']);
  });

  it('unassign ends the running lease at once (lease-end): keys zeroed, acknowledged, the agent stays', async () => {
    const { agent, deviceId } = await pushedAgent('push-unassign');
    const leaseId = agent.lease.leaseId();
    await adminCall('DELETE', `/devices/${deviceId}/assignments/push-unassign`);
    await waitFor(async () => (await audit(deviceId)).some((e) => e.type === 'lease-end.ack'), 20_000, 'the lease-end acknowledged');
    expect(agent.lease.state).to.not.equal('active');
    expect(agent.status().keys).to.deep.equal({ classKeys: 0, sensitiveKeys: 0 });
    const entries = await audit(deviceId);
    const ack = entries.find((e) => e.type === 'lease-end.ack')!;
    expect(ack.data).to.deep.include({ ok: true, detail: 'keys zeroed' });
    expect(entries.find((e) => e.type === 'lease-end.delivered')!.data).to.deep.include({ via: 'push' });
    expect(agent.lease.renewals).to.equal(0);
    expect(leaseId).to.match(/^lease-/);
  });

  it('a new policy reaches the running agent at once: it renews and takes it', async () => {
    const { agent, deviceId } = await pushedAgent('push-policy');
    expect(agent.lease.lease!.policy?.evictIdleMs).to.not.equal(7_000);
    await adminCall('PUT', '/images/push-policy/policy', { policy: 'sensitive:\n  memory: all\neviction:\n  idle: 7s\n' });
    await waitFor(async () => agent.lease.renewals > 0 && agent.lease.lease!.policy?.evictIdleMs === 7_000, 20_000, 'the agent renewed with the new policy');
    await waitFor(async () => (await audit(deviceId)).some((e) => e.type === 'policy.ack'), 20_000, 'the policy command acknowledged');
  });

  it('a TLS rotation tells connected devices at once: the agent checks in and trusts the announced certificate, its heartbeat an hour away', async () => {
    const { agent, home, deviceId } = await pushedAgent('push-rotate');
    expect(readNextPin(home)).to.equal(undefined);
    const r = await lethe(['admin', 'rotate', 'tls', '--json'], s.env);
    expect(r.code, r.stderr).to.equal(0);
    const announced = JSON.parse(r.stdout) as { fingerprint: string; told: number };
    expect(announced.told).to.be.at.least(1);
    await waitFor(async () => readNextPin(home)?.pin === announced.fingerprint, 20_000, 'the device pinning the announced certificate');
    await waitFor(async () => (await audit(deviceId)).some((e) => e.type === 'rotate.ack'), 20_000, 'the rotate command acknowledged');
    expect(agent.lease.renewals).to.equal(0);
  });

  it('a replica whose rows were removed (taken for dead) lists its devices as connected again at its next beat', async () => {
    const { deviceId } = await pushedAgent('push-relist');
    const db = await serverDb(s);
    try {
      const removed = Date.now();
      await db.sql.run('DELETE FROM push_sessions');
      await db.sql.run('DELETE FROM replicas');
      // The next beat may come at any moment, even before a check that the device is gone
      // could run: what shows the re-listing is rows written after the removal.
      await waitFor(async () => connected(deviceId), 30_000, 'the device listed as connected again');
      const session = await db.sql.get<{ connected_at: number | string }>('SELECT connected_at FROM push_sessions WHERE device_id = ?', deviceId);
      const replica = await db.sql.get<{ started_at: number | string }>('SELECT started_at FROM replicas');
      expect(Number(session!.connected_at)).to.be.at.least(removed);
      expect(Number(replica!.started_at)).to.be.at.least(removed);
    } finally {
      await db.close();
    }
  });

  it('a replayed, forged or misaddressed command is refused and logged; the next real one is carried out', async () => {
    // A stand-in for the server's push end, with the server's own certificate (the only thing a device trusts), sending what it is told to.
    const tlsDir = path.join(s.dir, 'tls');
    // Every plain call is answered 503 (the device's lease keeper waits and tries again).
    const fake = https.createServer({ key: fs.readFileSync(path.join(tlsDir, 'key.pem')), cert: fs.readFileSync(path.join(tlsDir, 'cert.pem')) }, (_req, res) => {
      res.writeHead(503, { 'content-type': 'application/json' }).end(JSON.stringify({ code: 'DATABASE_UNAVAILABLE', message: 'stand-in' }));
    });
    const wss = new WebSocketServer({ server: fake });
    const sockets: WebSocket[] = [];
    wss.on('connection', (ws) => {
      sockets.push(ws);
      ws.send(JSON.stringify({ t: 'hello', replica: 'rep-fake', serverTime: new Date().toISOString() }));
    });
    await new Promise<void>((r) => fake.listen(0, '127.0.0.1', () => r()));
    const port = (fake.address() as { port: number }).port;
    try {
      await pushImage(s, 'push-forged', { chunks: 1 });
      const d = await enrolledDevice(s, 'forged');
      await assign(s, d.deviceId, 'push-forged');
      // The device knows the fake's URL as its second server: it is tried once the real one is unreachable.
      const info = JSON.parse(fs.readFileSync(path.join(d.home, 'device.json'), 'utf8')) as { server: string; servers?: string[] };
      fs.writeFileSync(path.join(d.home, 'device.json'), JSON.stringify({ ...info, server: `https://127.0.0.1:${port}`, servers: [] }));
      d.close();
      const logs: string[] = [];
      // Its lease and keys come from nowhere here: the agent runs without one, which is all this test needs.
      const agent = await startAgent({ home: d.home, image: 'push-forged', cacheBytes: 1 << 20, heartbeatMs: HOUR, prefetch: false, nbd: null, log: (l) => logs.push(l), unlock: testUnlock(), push: true });
      running.push(agent);
      await waitFor(async () => sockets.length > 0 && agent.status().push.connected, 20_000, 'the agent connected to the stand-in');
      const ws = sockets[0];
      const serverKey = fs.readFileSync(path.join(s.dir, 'signing.key'));
      const cmd = (seq: number, extra: Partial<TPushCommand> = {}): TPushCommand => ({
        v: 1,
        device: d.deviceId,
        seq,
        id: `cmd-${String(seq).padStart(16, '0')}`,
        type: 'rotate',
        issuedAt: new Date().toISOString(),
        ...extra,
      });
      const send = (signed: { body: string; sig: string }) => ws.send(JSON.stringify({ t: 'cmd', ...signed }));
      const other = signKeyPair();
      send(signCommand(other.secretKey, cmd(1, { type: 'wipe' })));
      send(signCommand(serverKey, cmd(2, { type: 'wipe', device: 'dev-0000000000000000' })));
      send({ body: '{"v":1}', sig: b64u.encode(Buffer.alloc(64)) });
      await waitFor(async () => logs.filter((l) => l.startsWith('refused a command')).length === 3, 10_000, 'three refusals logged');
      expect(logs.filter((l) => l.startsWith('refused a command'))).to.deep.equal([
        "refused a command (push): a pushed command's signature is not the server's",
        `refused a command (push): a pushed command (#2) is for device dev-0000000000000000, not this one`,
        "refused a command (push): a pushed command's signature is not the server's",
      ]);
      expect(fs.existsSync(d.home), 'no forged wipe was carried out').to.equal(true);
      expect(agent.lease.state).to.not.equal('wiping');

      // An old command the device already carried out, sent again: refused. (The acknowledgement of a real one needs the real server; the number is what counts.)
      fs.writeFileSync(path.join(d.home, 'push.json'), JSON.stringify({ lastSeq: 5 }));
      const fresh = await startAgent({ home: d.home, image: 'push-forged', cacheBytes: 1 << 20, heartbeatMs: HOUR, prefetch: false, nbd: null, log: (l) => logs.push(l), unlock: testUnlock(), push: true });
      running.push(fresh);
      await waitFor(async () => sockets.length > 1 && fresh.status().push.connected, 20_000, 'the second agent connected');
      expect(readLastSeq(d.home)).to.equal(5);
      sockets[1].send(JSON.stringify({ t: 'cmd', ...signCommand(serverKey, cmd(5, { type: 'wipe' })) }));
      await waitFor(async () => logs.some((l) => l.includes('refused command #5')), 10_000, 'the replay refused');
      expect(logs.find((l) => l.includes('refused command #5'))).to.equal('refused command #5 (wipe, push): #5 was already carried out (a replay?)');
      expect(fs.existsSync(d.home)).to.equal(true);
      // The next number, signed by the server, is carried out.
      sockets[1].send(JSON.stringify({ t: 'cmd', ...signCommand(serverKey, cmd(6, { type: 'wipe' })) }));
      expect(await fresh.done).to.equal(3);
      expect(logs.some((l) => l.startsWith('wipe ordered by IT (cmd-0000000000000006)'))).to.equal(true);
    } finally {
      for (const ws of sockets) ws.terminate();
      wss.close();
      fake.close();
    }
  });

  it('lethe heartbeat carries out only a wipe the server signed for this device', async () => {
    // A stand-in answering heartbeats with the server's certificate: a wipe signed by another key, then one signed by the server.
    const tlsDir = path.join(s.dir, 'tls');
    const other = signKeyPair();
    const serverKey = fs.readFileSync(path.join(s.dir, 'signing.key'));
    let signer: Uint8Array = other.secretKey;
    let deviceId = '';
    const fake = https.createServer({ key: fs.readFileSync(path.join(tlsDir, 'key.pem')), cert: fs.readFileSync(path.join(tlsDir, 'cert.pem')) }, (req, res) => {
      const cmd: TPushCommand = { v: 1, device: deviceId, seq: 1, id: 'cmd-00000000000000aa', type: 'wipe', issuedAt: new Date().toISOString() };
      const body = req.url === '/v1/device/heartbeat'
        ? { serverTime: new Date().toISOString(), status: 'wipe-pending', commands: [{ id: cmd.id, type: 'wipe', seq: 1, issuedAt: cmd.issuedAt, signed: signCommand(signer, cmd) }] }
        : { id: cmd.id, acked: true };
      res.writeHead(200, { 'content-type': 'application/json' }).end(JSON.stringify(body));
    });
    await new Promise<void>((r) => fake.listen(0, '127.0.0.1', () => r()));
    try {
      const d = await enrolledDevice(s, 'hb-forged');
      deviceId = d.deviceId;
      d.close();
      const info = JSON.parse(fs.readFileSync(path.join(d.home, 'device.json'), 'utf8')) as Record<string, unknown>;
      fs.writeFileSync(path.join(d.home, 'device.json'), JSON.stringify({ ...info, server: `https://127.0.0.1:${(fake.address() as { port: number }).port}` }));
      const forged = await lethe(['heartbeat', '--home', d.home, '--passphrase-fd', '0'], {}, `${TEST_PASSPHRASE}\n`);
      expect(forged.stderr).to.equal("lethe: warning: refused a wipe command: a pushed command's signature is not the server's\n");
      expect(forged.code, forged.stderr).to.equal(0);
      expect(fs.existsSync(path.join(d.home, 'sign.key')), 'no forged wipe was carried out').to.equal(true);
      signer = serverKey;
      const real = await lethe(['heartbeat', '--home', d.home, '--passphrase-fd', '0'], {}, `${TEST_PASSPHRASE}\n`);
      expect(real.code, real.stderr).to.equal(0);
      expect(fs.existsSync(d.home), 'the signed wipe was carried out').to.equal(false);
    } finally {
      fake.close();
    }
  });

  it('the upgrade is a signed device call: unsigned, or from a revoked device, it is refused with the usual codes; bad frames are answered or close the socket', async () => {
    const d = await enrolledDevice(s, 'upgrade');
    try {
      const sock = await d.client.openPush();
      sock.close();
      const { default: WebSocket } = await import('ws');
      const tls = await d.client.http.tlsOptions();
      const unsigned = await new Promise<number>((resolve) => {
        const ws = new WebSocket(`${s.url.replace('https', 'wss')}/v1/device/push`, { ...tls, headers: {} });
        ws.once('unexpected-response', (_q, res) => resolve(res.statusCode ?? 0));
        ws.once('open', () => resolve(101));
        ws.once('error', () => {});
      });
      expect(unsigned).to.equal(401);
      // On the socket: an acknowledgement of a command this device does not have is answered with its error; junk closes the socket (1008).
      const ws = await d.client.openPush();
      const frames: { t: string; code?: string; id?: string }[] = [];
      ws.on('message', (m) => frames.push(JSON.parse(m.toString()) as { t: string }));
      ws.send(JSON.stringify({ t: 'ack', id: 'cmd-0000000000000000', ok: true }));
      await waitFor(async () => frames.some((f) => f.t === 'error'), 10_000, 'the error frame');
      expect(frames.find((f) => f.t === 'error')).to.include({ code: 'UNKNOWN_COMMAND', id: 'cmd-0000000000000000' });
      const closed = new Promise<number>((r) => ws.once('close', (code) => r(code)));
      ws.send('{"t":"ack","id":');
      expect(await closed).to.equal(1008);

      await adminCall('POST', `/devices/${d.deviceId}/revoke`);
      const refused = await d.client.openPush().then(
        () => 'opened',
        (e: { code?: string }) => e.code,
      );
      expect(refused).to.equal('DEVICE_REVOKED');
    } finally {
      d.close();
    }
  });
});
