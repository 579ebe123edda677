// Issue #14: the device's identity keys are sealed at rest. A copy of a sealed
// device home is useless without the passphrase or TPM PIN and costs the real
// device nothing; a device enrolled with --seal none gets no lease under the
// shipped policies; the unsealed keys are zeroed when the agent stops; and a
// device pulling too many sensitive keys is refused and raises an audit alarm.
import { expect } from 'chai';
import { spawn, spawnSync, type ChildProcess } from 'node:child_process';
import fs from 'node:fs';
import net from 'node:net';
import path from 'node:path';
import { closeIdentity, enrollDevice, loadIdentity, type Identity } from '../../agent/keys/identity.js';
import { DeviceClient } from '../../agent/remote/device-client.js';
import { startAgent } from '../../agent/daemon/start.js';
import { fixedSecret } from '../../agent/keys/unlock.js';
import { admin, agentInProcess, assign, enrolledDevice, pushImage, rejects, testUnlock } from '../helpers/fixtures.js';
import { lethe, ROOT, startServer, tmpDir, TEST_PASSPHRASE, type ServerProc } from '../helpers/proc.js';

async function auditTypes(s: ServerProc, deviceId: string): Promise<string[]> {
  const a = admin(s);
  try {
    const r = await a.json<{ entries: { type: string }[] }>('GET', `/audit/devices/${deviceId}`);
    return r.entries.map((e) => e.type);
  } finally {
    a.close();
  }
}

async function mint(s: ServerProc): Promise<string> {
  const a = admin(s);
  try {
    return (await a.json<{ token: string }>('POST', '/enroll-tokens', {})).token;
  } finally {
    a.close();
  }
}

function copyHome(home: string): string {
  const copy = path.join(tmpDir('lethe-stolen-'), 'home');
  fs.cpSync(home, copy, { recursive: true });
  return copy;
}

const contains = (hay: Buffer, needle: Uint8Array) => hay.indexOf(Buffer.from(needle)) !== -1;

describe('sealed device keys (issue #14)', function () {
  this.timeout(120_000);
  let s: ServerProc;
  before(async () => {
    s = await startServer();
    await pushImage(s, 'desk');
  });
  after(async () => {
    await s?.stop();
  });

  it('issue #14: a copied device home without the passphrase is refused locally, gets nothing, and the real device still works', async () => {
    const d = await enrolledDevice(s, 'real');
    await assign(s, d.deviceId, 'desk');
    // Neither key is on the disk in the clear.
    for (const [file, key] of [['sign.key', d.id.sign.secretKey], ['box.key', d.id.box.secretKey]] as const) {
      const bytes = fs.readFileSync(path.join(d.home, file));
      expect(bytes.subarray(0, 8).toString(), file).to.equal('LETHEKEY');
      expect(contains(bytes, key), `${file} holds its key in the clear`).to.equal(false);
    }
    d.close();
    closeIdentity(d.id);
    const stolen = copyHome(d.home);

    // No passphrase: nothing to ask it with (no terminal, no fd, no credential).
    const none = await lethe(['heartbeat', '--home', stolen], { CREDENTIALS_DIRECTORY: '' });
    expect(none.code).to.equal(1);
    expect(none.stderr).to.equal(
      "lethe: error: the device keys are sealed and no passphrase was given\nlethe: hint: run on a terminal, pass --passphrase-fd N, or give systemd credential 'lethe-passphrase' (LoadCredential=)\n",
    );
    const e = await rejects(loadIdentity(stolen));
    expect(e.code).to.equal('DEVICE_LOCKED');

    // A wrong passphrase, through the CLI and to the agent.
    const wrong = await lethe(['heartbeat', '--home', stolen, '--passphrase-fd', '0', '--json'], {}, 'hunter2\n');
    expect(wrong.code).to.equal(1);
    expect(wrong.stderr).to.equal('lethe: error: wrong passphrase: the device keys did not open\nlethe: hint: try again with the right passphrase\n');
    expect(JSON.parse(wrong.stdout).error.code).to.equal('UNLOCK_FAILED');
    const refused = await rejects(startAgent({ home: stolen, image: 'desk', cacheBytes: 1 << 20, heartbeatMs: 30_000, prefetch: false, nbd: null, log: () => {}, unlock: testUnlock('hunter2') }));
    expect(refused.code).to.equal('UNLOCK_FAILED');

    // The server saw none of it: no lease, no key, not even a heartbeat.
    expect(await auditTypes(s, d.deviceId)).to.deep.equal(['enroll', 'assign']);

    // The real device is not locked out: with its passphrase it gets a lease and a key.
    const id = await loadIdentity(d.home, testUnlock());
    const client = new DeviceClient(id);
    try {
      const hb = await client.heartbeat();
      expect(hb.status).to.equal('active');
      const lease = await client.lease('desk');
      const keys = await client.keys(lease.leaseId, [{ kind: 'mem', index: 0 }]);
      expect(keys.chunks).to.have.length(1);
    } finally {
      client.close();
      closeIdentity(id);
    }
    expect(await auditTypes(s, d.deviceId)).to.deep.equal(['enroll', 'assign', 'lease.grant', 'keys.release']);
  });

  it('lethe device rotate-keys: the server takes the new keys at once and refuses the old; they are sealed as before; audited; refused while the agent runs', async () => {
    const d = await enrolledDevice(s, 'rotator');
    await assign(s, d.deviceId, 'desk');
    const before = JSON.parse(fs.readFileSync(path.join(d.home, 'device.json'), 'utf8')) as { signPublicKey: string; boxPublicKey: string };
    const r = await lethe(['device', 'rotate-keys', '--home', d.home, '--passphrase-fd', '0', '--json'], {}, `${TEST_PASSPHRASE}\n`);
    expect(r.code, r.stderr).to.equal(0);
    const out = JSON.parse(r.stdout) as { deviceId: string; signPublicKey: string; boxPublicKey: string; sent: boolean; resumed: boolean };
    expect(out).to.include({ deviceId: d.deviceId, sent: true, resumed: false });
    const after = JSON.parse(fs.readFileSync(path.join(d.home, 'device.json'), 'utf8')) as { signPublicKey: string; boxPublicKey: string };
    expect(after).to.include({ signPublicKey: out.signPublicKey, boxPublicKey: out.boxPublicKey });
    expect(after.signPublicKey).to.not.equal(before.signPublicKey);
    expect(after.boxPublicKey).to.not.equal(before.boxPublicKey);
    expect(fs.readdirSync(d.home).filter((n) => n.endsWith('.next') || n === 'rotate.json')).to.deep.equal([]);
    // The old key signs no more; the new one, unsealed with the same passphrase, gets a lease whose keys open with the new box key.
    expect((await rejects(d.client.heartbeat())).code).to.equal('AUTH_FAILED');
    d.close();
    const id = await loadIdentity(d.home, testUnlock());
    const client = new DeviceClient(id);
    try {
      const lease = await client.lease('desk');
      expect(lease.classKeys.length).to.be.greaterThan(0);
      expect(await client.keys(lease.leaseId, [{ kind: 'mem', index: 0 }])).to.have.property('sealed');
    } finally {
      client.close();
      closeIdentity(id);
    }
    const wrong = await lethe(['device', 'rotate-keys', '--home', d.home, '--passphrase-fd', '0'], {}, 'hunter2\n');
    expect(wrong.code).to.equal(1);
    expect(wrong.stderr).to.match(/^lethe: error: .*passphrase/);
    expect((await auditTypes(s, d.deviceId)).filter((t) => t === 'device.rotate-keys')).to.have.length(1);

    const agent = await startAgent({ home: d.home, image: 'desk', cacheBytes: 1 << 20, heartbeatMs: 60_000, prefetch: false, nbd: null, log: () => {}, unlock: testUnlock(), push: false });
    try {
      const busy = await lethe(['device', 'rotate-keys', '--home', d.home, '--passphrase-fd', '0'], {}, `${TEST_PASSPHRASE}\n`);
      expect(busy.code).to.equal(1);
      expect(busy.stderr).to.equal(`lethe: error: the agent is running on '${d.home}'\nlethe: hint: stop it first ('lethe agent stop'), then rotate the keys\n`);
    } finally {
      agent.stop();
      await agent.done;
    }
  });

  it('a rotation cut short resumes where its files say: before the server took it, and after', async () => {
    const { rotateKeys } = await import('../../agent/keys/rotate-keys.js');
    for (const stopAfter of ['prepared', 'sent'] as const) {
      const d = await enrolledDevice(s, `cut-${stopAfter}`);
      d.close();
      const cut = await rotateKeys(d.home, testUnlock(), { stopAfter });
      expect(fs.existsSync(path.join(d.home, 'rotate.json'))).to.equal(true);
      // Until it is finished, nothing starts on the home.
      const e = await loadIdentity(d.home, testUnlock()).then(
        () => undefined,
        (x: { code?: string; message: string }) => x,
      );
      expect(e?.code).to.equal('CONFIG');
      expect(e?.message).to.equal(`a key rotation of the device in '${d.home}' was interrupted`);
      const r = await lethe(['device', 'rotate-keys', '--home', d.home, '--passphrase-fd', '0', '--json'], {}, `${TEST_PASSPHRASE}\n`);
      expect(r.code, r.stderr).to.equal(0);
      const out = JSON.parse(r.stdout) as { signPublicKey: string; sent: boolean; resumed: boolean };
      // The same new keys as the cut run made, sent now (before) or found already taken (after).
      expect(out).to.include({ signPublicKey: cut.signPublicKey, resumed: true, sent: stopAfter === 'prepared' });
      const id = await loadIdentity(d.home, testUnlock());
      const client = new DeviceClient(id);
      try {
        expect((await client.heartbeat()).status).to.equal('active');
      } finally {
        client.close();
        closeIdentity(id);
      }
    }
  });

  it('the passphrase comes from a systemd credential; a damaged sealed key is named', async () => {
    const d = await enrolledDevice(s, 'credential');
    d.close();
    closeIdentity(d.id);
    const creds = tmpDir('lethe-creds-');
    fs.writeFileSync(path.join(creds, 'lethe-passphrase'), `${TEST_PASSPHRASE}\n`, { mode: 0o600 });
    const ok = await lethe(['heartbeat', '--home', d.home, '--json'], { CREDENTIALS_DIRECTORY: creds });
    expect(ok.code, ok.stderr).to.equal(0);
    expect(JSON.parse(ok.stdout)).to.include({ deviceId: d.deviceId, status: 'active' });

    const key = path.join(d.home, 'box.key');
    const bytes = fs.readFileSync(key);
    bytes[bytes.length - 1] ^= 1;
    fs.writeFileSync(key, bytes);
    const e = await rejects(loadIdentity(d.home, testUnlock()));
    expect(e.code).to.equal('UNLOCK_FAILED');
  });

  it('the unsealed keys are in locked memory and zeroed when the agent stops', async () => {
    await pushImage(s, 'zeroed');
    const { agent } = await agentInProcess(s, 'zeroed-2', {});
    const keys = [agent.identity.sign.secretKey, agent.identity.box.secretKey];
    for (const k of keys) {
      expect((k as { secure?: boolean }).secure, 'sodium_malloc memory').to.equal(true);
      expect(k.some((b) => b !== 0)).to.equal(true);
    }
    agent.stop();
    await agent.done;
    for (const k of keys) expect(k.every((b) => b === 0), 'key zeroed at stop').to.equal(true);
  });

  it('a device enrolled with --seal none gets no lease under the shipped policies and the built-in defaults', async () => {
    const home = path.join(tmpDir(), 'home');
    const r = await lethe(['enroll', await mint(s), '--home', home, '--seal', 'none', '--json']);
    expect(r.code, r.stderr).to.equal(0);
    const { deviceId } = JSON.parse(r.stdout) as { deviceId: string };
    // --seal none is today's home: raw keys, no passphrase asked.
    expect(fs.statSync(path.join(home, 'sign.key')).size).to.equal(64);
    const files = fs.readdirSync(path.join(ROOT, 'policies')).filter((f) => f.endsWith('.yaml'));
    expect(files.length).to.be.greaterThan(0);
    const images = [['none-default', undefined], ...files.map((f) => [`none-${f.replace('.yaml', '')}`, fs.readFileSync(path.join(ROOT, 'policies', f), 'utf8')])];
    for (const [name, policy] of images) {
      await pushImage(s, name!, policy ? { policy } : {});
      await assign(s, deviceId, name!);
    }
    const id = await loadIdentity(home);
    const client = new DeviceClient(id);
    try {
      for (const [name] of images) {
        const e = await rejects(client.lease(name!));
        expect(e.status, name).to.equal(403);
        expect(e.code, name).to.equal('DEVICE_UNSEALED');
        expect(e.message).to.equal(`image '${name}' needs device keys sealed by tpm or passphrase; this device's are sealed by none`);
        expect(e.hint).to.equal("enroll the device again with 'lethe enroll TOKEN --seal tpm'");
      }
    } finally {
      client.close();
      closeIdentity(id);
    }
    expect((await auditTypes(s, deviceId)).filter((t) => t === 'lease.grant')).to.deep.equal([]);

    const list = await lethe(['admin', 'devices'], s.env);
    expect(list.stdout).to.match(new RegExp(`^${deviceId}\\s+\\S+\\s+active\\s+-\\s+none\\s`, 'm'));

    // A policy may allow it, and says so.
    await pushImage(s, 'none-allowed', { policy: 'device:\n  seal: [tpm, passphrase, none]\n' });
    await assign(s, deviceId, 'none-allowed');
    const id2 = await loadIdentity(home);
    const c2 = new DeviceClient(id2);
    try {
      expect((await c2.lease('none-allowed')).image).to.equal('none-allowed');
    } finally {
      c2.close();
      closeIdentity(id2);
    }
  });

  it('a lease is not renewed once the image policy stops allowing the device\'s seal kind', async () => {
    await pushImage(s, 'tightened');
    const d = await enrolledDevice(s, 'tightened');
    await assign(s, d.deviceId, 'tightened');
    const a = admin(s);
    try {
      const lease = await d.client.lease('tightened');
      await a.json('PUT', '/images/tightened/policy', { policy: 'device:\n  seal: [tpm]\n' });
      const e = await rejects(d.client.renew(lease.leaseId));
      expect([e.status, e.code, e.message]).to.deep.equal([403, 'DEVICE_UNSEALED', "image 'tightened' needs device keys sealed by tpm; this device's are sealed by passphrase"]);
    } finally {
      a.close();
      d.close();
    }
  });

  it('a device past its key ceiling is refused with KEY_RELEASE_LIMIT, gets nothing, and the audit log raises an alarm', async () => {
    // 4 sensitive memory chunks (0, 2, 4, 6); at most 3 distinct keys an hour.
    await pushImage(s, 'ceiling', { policy: 'device:\n  key-ceiling: 3\n  key-window: 1h\n' });
    const d = await enrolledDevice(s, 'greedy');
    await assign(s, d.deviceId, 'ceiling');
    try {
      const lease = await d.client.lease('ceiling');
      await d.client.keys(lease.leaseId, [{ kind: 'mem', index: 0 }, { kind: 'mem', index: 2 }]);
      // Keys given again within the window count once: evicted pages re-fault freely.
      for (let i = 0; i < 3; i++) await d.client.keys(lease.leaseId, [{ kind: 'mem', index: 0 }, { kind: 'mem', index: 2 }]);
      await d.client.keys(lease.leaseId, [{ kind: 'mem', index: 4 }]);
      const e = await rejects(d.client.keys(lease.leaseId, [{ kind: 'mem', index: 6 }, { kind: 'mem', index: 0 }]));
      expect(e.status).to.equal(429);
      expect(e.code).to.equal('KEY_RELEASE_LIMIT');
      expect(e.message).to.equal('this device reached its ceiling of 3 sensitive keys for the image within 3600 s; nothing was released');
      // Normal-class chunks are not counted; keys it already had within the window still come.
      await d.client.keys(lease.leaseId, [{ kind: 'disk', index: 0 }]);
      await d.client.keys(lease.leaseId, [{ kind: 'mem', index: 4 }]);
      expect((await rejects(d.client.keys(lease.leaseId, [{ kind: 'mem', index: 6 }]))).code).to.equal('KEY_RELEASE_LIMIT');
    } finally {
      d.close();
    }
    const types = await auditTypes(s, d.deviceId);
    expect(types).to.deep.equal([
      'enroll', 'assign', 'lease.grant',
      'keys.release', 'keys.release', 'keys.release', 'keys.release', 'keys.release',
      'alarm.key-ceiling',
      'keys.release', 'keys.release',
      'alarm.key-ceiling',
    ]);
    // The ceiling is the device's own: another device on the same image gets its keys.
    const other = await enrolledDevice(s, 'other');
    await assign(s, other.deviceId, 'ceiling');
    try {
      const lease = await other.client.lease('ceiling');
      expect((await other.client.keys(lease.leaseId, [{ kind: 'mem', index: 6 }])).chunks).to.have.length(1);
    } finally {
      other.close();
    }
  });

  it('requests racing at the key ceiling are counted one at a time: of 4 new sensitive keys asked at once under a ceiling of 3, exactly 3 go', async () => {
    await pushImage(s, 'race', { policy: 'device:\n  key-ceiling: 3\n  key-window: 1h\n' });
    const d = await enrolledDevice(s, 'racer');
    await assign(s, d.deviceId, 'race');
    try {
      const lease = await d.client.lease('race');
      const outcomes = await Promise.allSettled([0, 2, 4, 6].map((index) => d.client.keys(lease.leaseId, [{ kind: 'mem', index }])));
      const refused = outcomes.filter((o) => o.status === 'rejected');
      expect(outcomes.filter((o) => o.status === 'fulfilled')).to.have.length(3);
      expect(refused.map((o) => (o as PromiseRejectedResult).reason.code)).to.deep.equal(['KEY_RELEASE_LIMIT']);
      const types = await auditTypes(s, d.deviceId);
      expect(types.filter((t) => t === 'keys.release')).to.have.length(3);
      expect(types.filter((t) => t === 'alarm.key-ceiling')).to.have.length(1);
    } finally {
      d.close();
    }
  });
});

/** A free loopback TCP port. */
function freePort(): Promise<number> {
  return new Promise((resolve, reject) => {
    const srv = net.createServer();
    srv.once('error', reject);
    srv.listen(0, '127.0.0.1', () => {
      const port = (srv.address() as net.AddressInfo).port;
      srv.close(() => resolve(port));
    });
  });
}

describe('device keys sealed to a TPM (swtpm)', function () {
  this.timeout(120_000);
  let s: ServerProc;
  let swtpm: ChildProcess;
  let tcti: string;
  const tpm = (...args: string[]) => spawnSync(args[0], args.slice(1), { env: { ...process.env, TPM2TOOLS_TCTI: tcti }, encoding: 'utf8' });
  const lockoutCounter = () => Number(/TPM2_PT_LOCKOUT_COUNTER:\s*(0x[0-9a-f]+)/i.exec(tpm('tpm2_getcap', 'properties-variable').stdout)![1]);

  before(async function () {
    if (spawnSync('swtpm', ['--version']).error || spawnSync('tpm2_getcap', ['--version']).error) this.skip();
    s = await startServer();
    await pushImage(s, 'desk');
    // The swtpm TCTI finds the control channel on the next port.
    const port = await freePort();
    const ctrl = port + 1;
    const state = tmpDir('lethe-swtpm-');
    swtpm = spawn('swtpm', ['socket', '--tpm2', '--server', `type=tcp,port=${port}`, '--ctrl', `type=tcp,port=${ctrl}`, '--tpmstate', `dir=${state}`, '--flags', 'not-need-init,startup-clear'], { stdio: 'ignore' });
    tcti = `swtpm:host=127.0.0.1,port=${port}`;
    for (let i = 0, r = tpm('tpm2_getcap', 'properties-fixed'); r.status !== 0; i++, r = tpm('tpm2_getcap', 'properties-fixed')) {
      if (i > 100) throw new Error(`swtpm did not start: ${r.stderr}`);
      await new Promise((r) => setTimeout(r, 50));
    }
    // The TPM's dictionary-attack settings are the platform's, not Lethe's: set them as a
    // laptop would have them (3 tries, one recovered every 10 minutes) rather than rely on swtpm's.
    const da = tpm('tpm2_dictionarylockout', '--setup-parameters', '--max-tries=3', '--recovery-time=600', '--lockout-recovery-time=600');
    expect(da.status, da.stderr).to.equal(0);
  });
  after(async () => {
    swtpm?.kill();
    await s?.stop();
  });

  it('issue #14: TPM-sealed keys open with the PIN only; one wrong PIN on a copy does not lock the real device out', async () => {
    const home = path.join(tmpDir(), 'home');
    const pin = { ask: fixedSecret('4711'), tcti };
    const info = await enrollDevice(home, await mint(s), 'tpm-laptop', { seal: 'tpm', unlock: pin });
    await assign(s, info.deviceId, 'desk');
    const raw = fs.readFileSync(path.join(home, 'sign.key'));
    expect(raw.subarray(0, 10)).to.deep.equal(Buffer.from('LETHEKEY\x01\x02', 'latin1'));

    const stolen = copyHome(home);
    const e = await rejects(loadIdentity(stolen, { ask: fixedSecret('0000'), tcti }));
    expect(e.code).to.equal('UNLOCK_FAILED');
    expect(e.message).to.equal('wrong TPM PIN: the device keys did not open');
    expect(lockoutCounter(), 'one failure counted').to.equal(1);
    expect((await rejects(loadIdentity(stolen, { ask: fixedSecret('4711'), tcti: 'swtpm:host=127.0.0.1,port=1' }))).code).to.equal('TPM_UNAVAILABLE');
    expect(await auditTypes(s, info.deviceId)).to.deep.equal(['enroll', 'assign']);

    // The real device, with its PIN, still opens its keys and gets a lease.
    const id: Identity = await loadIdentity(home, pin);
    const client = new DeviceClient(id);
    try {
      expect((await client.lease('desk')).image).to.equal('desk');
    } finally {
      client.close();
      closeIdentity(id);
    }
    const list = await lethe(['admin', 'devices', '--json'], s.env);
    expect((JSON.parse(list.stdout) as { devices: { id: string; seal: string }[] }).devices.find((x) => x.id === info.deviceId)!.seal).to.equal('tpm');
  });

  it('the CLI seals to the TPM named by --tpm and unseals with $LETHE_TPM_TCTI, the PIN on a file descriptor', async () => {
    const home = path.join(tmpDir(), 'home');
    const r = await lethe(['enroll', await mint(s), '--home', home, '--seal', 'tpm', '--tpm', tcti, '--passphrase-fd', '0', '--json'], {}, '2468\n');
    expect(r.code, r.stderr).to.equal(0);
    expect(JSON.parse(r.stdout)).to.include({ seal: 'tpm' });
    const hb = await lethe(['heartbeat', '--home', home, '--passphrase-fd', '0', '--json'], { LETHE_TPM_TCTI: tcti }, '2468\n');
    expect(hb.code, hb.stderr).to.equal(0);
    expect(JSON.parse(hb.stdout)).to.include({ status: 'active' });
  });
});
