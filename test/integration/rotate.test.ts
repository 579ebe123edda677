// Master-key rotation (docs/fleet.md, Key rotation): every image and version key
// is rewrapped under a new keyring term without decrypting a chunk; the keys do
// not change, so a running agent goes on and every chunk still verifies; the old
// term is deleted from the database. Runs on both backends.
import { expect } from 'chai';
import { X509Certificate } from 'node:crypto';
import fs from 'node:fs';
import path from 'node:path';
import { control } from '../../agent/daemon/control.js';
import { DeviceClient } from '../../agent/remote/device-client.js';
import { loadIdentity } from '../../agent/keys/identity.js';
import { keepNextPin, readNextPin } from '../../agent/remote/pins.js';
import { b64u, openSealed, sign, signKeyPair } from '../../common/crypto.js';
import { fetchPinnedCert } from '../../common/http-client.js';
import { pinMessage } from '../../common/tls-pin.js';
import { termOf } from '../../server/escrow.js';
import { assign, enrolledDevice, jsonManifest, pushImage, rejects, testUnlock, type TestDevice } from '../helpers/fixtures.js';
import { lethe, startAgentProc, startServer, waitFor, type AgentProc, type ServerProc } from '../helpers/proc.js';
import { serverDb } from '../helpers/server-db.js';

const status = (home: string) => control<{ lease: { state: string; leaseId: string | null } }>(home, { cmd: 'status' });
const selftest = (home: string) => control<{ chunks: number; sources: Record<string, number> }>(home, { cmd: 'selftest' });

describe('lethe admin rotate master (real server, agent process)', function () {
  this.timeout(180_000);
  let s: ServerProc;
  let dev: TestDevice;
  let agent: AgentProc | undefined;

  before(async () => {
    s = await startServer();
    await pushImage(s, 'rot', { chunks: 6 });
    dev = await enrolledDevice(s, 'laptop');
    await assign(s, dev.deviceId, 'rot');
  });
  after(async () => {
    await agent?.stop();
    dev?.close();
    await s?.stop();
  });

  /** Every stored wrapped key: image dedup keys and version keys. */
  async function wrappedKeys(): Promise<Buffer[]> {
    const db = await serverDb(s);
    try {
      const images = await db.sql.all<{ w: Buffer }>('SELECT dedup_key_wrapped AS w FROM images');
      const versions = await db.sql.all<{ w: Buffer }>('SELECT key_wrapped AS w FROM versions');
      return [...images, ...versions].map((r) => r.w);
    } finally {
      await db.close();
    }
  }

  async function terms(): Promise<number[]> {
    const db = await serverDb(s);
    try {
      return (await db.sql.all<{ term: number }>('SELECT term FROM master_keys ORDER BY term')).map((r) => r.term);
    } finally {
      await db.close();
    }
  }

  /** The chunk keys of every stored mem chunk, as released to the device now. */
  async function memKeys(leaseId: string): Promise<string> {
    const m = await jsonManifest(dev.client, leaseId);
    const refs = m.chunks.mem.map(([index]) => ({ kind: 'mem' as const, index }));
    const r = await dev.client.keys(leaseId, refs);
    return openSealed(dev.id.box, b64u.decode(r.sealed)).toString('hex');
  }

  it('rewraps every key under a new term, twice; the keys, the running agent and every chunk are unchanged; old terms are gone', async () => {
    agent = await startAgentProc(dev.home, 'rot', ['--no-prefetch']);
    await waitFor(async () => ((await status(dev.home)).lease.state === 'active' ? true : undefined), 20_000, 'the agent holding a lease');
    const first = await selftest(dev.home);
    expect(first.chunks).to.be.greaterThan(0);

    const lease = await dev.client.lease('rot');
    const keysBefore = await memKeys(lease.leaseId);
    const wrapped0 = await wrappedKeys();
    expect(wrapped0.map(termOf)).to.satisfy((t: number[]) => t.every((x) => x === 0));
    expect(await terms()).to.deep.equal([]);

    for (const term of [1, 2]) {
      const r = await lethe(['admin', 'rotate', 'master', '--json'], s.env);
      expect(r.code, r.stderr).to.equal(0);
      expect(JSON.parse(r.stdout)).to.include({ term, previous: term - 1, images: 1, termsRetired: term - 1 });
      const wrapped = await wrappedKeys();
      expect(wrapped.map(termOf)).to.deep.equal(wrapped.map(() => term));
      for (const old of wrapped0) expect(wrapped.some((w) => w.equals(old)), 'an old wrapped key is still stored').to.equal(false);
      expect(await terms(), 'only the new term is kept').to.deep.equal([term]);
      expect(await memKeys(lease.leaseId), 'the same chunk keys come out').to.equal(keysBefore);
    }

    // The running agent renews, and reads every chunk (from its cache and the server) against the signed manifest.
    const renewed = await dev.client.renew((await status(dev.home)).lease.leaseId!);
    expect(renewed.leaseId).to.be.a('string');
    const again = await selftest(dev.home);
    expect(again.chunks).to.equal(first.chunks);
    expect(agent.proc.exitCode).to.equal(null);

    // A version pushed after the rotation is wrapped under the new term and serves as before.
    const v2 = await pushImage(s, 'rot', { chunks: 2 });
    const l2 = await dev.client.lease('rot');
    expect(l2.version).to.equal(v2.version);
    expect((await wrappedKeys()).map(termOf)).to.satisfy((t: number[]) => t.every((x) => x === 2));
    // Its keys, released under term 2, come out the same once term 2 is retired.
    const v2Keys = await memKeys(l2.leaseId);
    const third = await lethe(['admin', 'rotate', 'master', '--json'], s.env);
    expect(third.code, third.stderr).to.equal(0);
    expect(await terms()).to.deep.equal([3]);
    expect(await memKeys(l2.leaseId)).to.equal(v2Keys);
    const verify = await lethe(['audit', 'verify', '--json'], s.env);
    expect(verify.code, verify.stderr).to.equal(0);
    const audit = await lethe(['audit', 'device', dev.deviceId, '--json'], s.env);
    expect(audit.code).to.equal(0);
  });

  it('an unknown thing to rotate is a usage error', async () => {
    const r = await lethe(['admin', 'rotate', 'everything'], s.env);
    expect(r.code).to.equal(2);
    expect(r.stderr).to.contain('everything');
  });
});


describe('lethe admin rotate tls (real server)', function () {
  this.timeout(120_000);
  let s: ServerProc;

  before(async () => {
    s = await startServer();
  });
  after(async () => {
    await s?.stop();
  });

  it('announces a certificate at heartbeats, then serves it; a device that checked in moves to it, one that did not is refused', async () => {
    const heard = await enrolledDevice(s, 'checked-in');
    const silent = await enrolledDevice(s, 'away');
    const old = s.fingerprint;
    const r = await lethe(['admin', 'rotate', 'tls', '--json'], s.env);
    expect(r.code, r.stderr).to.equal(0);
    const announced = JSON.parse(r.stdout) as { phase: string; fingerprint: string; previous: string };
    expect(announced).to.include({ phase: 'announced', previous: old });
    expect(announced.fingerprint).to.match(/^[0-9a-f]{64}$/).and.not.equal(old);

    // Still the old certificate; the heartbeat brings the new one, signed.
    await heard.client.heartbeat();
    expect(readNextPin(heard.home)?.pin).to.equal(announced.fingerprint);

    const f = await lethe(['admin', 'rotate', 'tls', '--finish', '--json'], s.env);
    expect(f.code, f.stderr).to.equal(0);
    expect(JSON.parse(f.stdout)).to.include({ phase: 'switched', fingerprint: announced.fingerprint });
    await waitFor(() => fetchPinnedCert(s.url, announced.fingerprint).then(() => true, () => undefined), 30_000, 'the server serving the new certificate');

    // The device that heard of it connects, and pins it alone from then on.
    const again = new DeviceClient(await loadIdentity(heard.home, testUnlock()));
    try {
      expect((await again.heartbeat()).status).to.equal('active');
    } finally {
      again.close();
    }
    const info = JSON.parse(fs.readFileSync(path.join(heard.home, 'device.json'), 'utf8')) as { fingerprint: string };
    expect(info.fingerprint).to.equal(announced.fingerprint);
    expect(readNextPin(heard.home)).to.equal(undefined);

    // The device that never checked in meanwhile does not trust the new certificate.
    const away = new DeviceClient(await loadIdentity(silent.home, testUnlock()));
    try {
      expect((await rejects(away.heartbeat())).code).to.equal('PIN_MISMATCH');
    } finally {
      away.close();
    }

    // Admins pin the new fingerprint; the old one is refused. A restart serves the new one.
    const stale = await lethe(['admin', 'devices'], s.env);
    expect(stale.code).to.not.equal(0);
    expect(stale.stderr).to.contain('not the pinned');
    const env = { ...s.env, LETHE_PIN: announced.fingerprint };
    const v = await lethe(['audit', 'verify', '--json'], env);
    expect(v.code, v.stderr).to.equal(0);
    await s.stop();
    s = await s.restart();
    expect(s.fingerprint).to.equal(announced.fingerprint);
    const rows = await serverDb(s);
    try {
      const entries = await rows.sql.all<{ data: string }>("SELECT data FROM audit WHERE type = 'tls.rotate' ORDER BY seq");
      expect(entries.map((e) => (JSON.parse(e.data) as { phase: string }).phase)).to.deep.equal(['announced', 'switched']);
    } finally {
      await rows.close();
    }
    heard.close();
    silent.close();
  });

  it('an announcement not signed by the pinned key, or for another certificate, is not kept', async () => {
    const d = await enrolledDevice(s, 'wary');
    try {
      const cert = fs.readFileSync(path.join(s.dir, 'tls', 'cert.pem'), 'utf8');
      const fp = new X509Certificate(cert).fingerprint256.replace(/:/g, '').toLowerCase();
      const forger = signKeyPair();
      const forged = keepNextPin(d.home, d.id.info.serverSignPublicKey, { cert, fingerprint: fp, signature: b64u.encode(sign(forger.secretKey, pinMessage(fp))) });
      expect(forged.problem).to.contain('not signed by the key pinned at enrollment');
      const mismatched = keepNextPin(d.home, d.id.info.serverSignPublicKey, { cert, fingerprint: 'a'.repeat(64), signature: 'x' });
      expect(mismatched.problem).to.contain('does not have the fingerprint');
      expect(readNextPin(d.home)).to.equal(undefined);
    } finally {
      d.close();
    }
  });
});
