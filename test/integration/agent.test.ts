// The device agent as a real process against a real server process: no
// plaintext at rest, keys zeroed at lease expiry while the server is away and
// service back when it returns, wipe within a heartbeat, the cache reused
// across restarts, tampered chunks refused.
import { expect } from 'chai';
import { serverDb } from '../helpers/server-db.js';
import { randomBytes } from 'node:crypto';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { control } from '../../agent/daemon/control.js';
import type { AgentStatus } from '../../agent/daemon/start.js';
import { LetheError } from '../../common/errors.js';
import { admin, assign, enrolledDevice, pushImage, type TestImage } from '../helpers/fixtures.js';
import { lethe, startAgentProc as spawnAgent, startServer, waitFor, type AgentProc, type ServerProc } from '../helpers/proc.js';
import { cachedRows, damageCachedBlob } from '../helpers/cache.js';
import { cacheFiles } from '../../agent/chunks/cache.js';

const status = (home: string) => control<AgentStatus>(home, { cmd: 'status' });
const selftest = (home: string) => control<{ chunks: number; sources: Record<string, number> }>(home, { cmd: 'selftest' });

/** An image whose every non-zero page and disk chunk carries the marker. */
async function markedImage(s: ServerProc, name: string, marker: string, policy?: string): Promise<TestImage> {
  const mem = Buffer.alloc(64 * 4096);
  const disk = Buffer.alloc(4 * 128 * 1024);
  for (let p = 0; p < 64; p += 2) {
    randomBytes(4096).copy(mem, p * 4096);
    mem.write(marker, p * 4096 + 100, 'latin1');
  }
  randomBytes(128 * 1024).copy(disk, 0);
  disk.write(marker, 5000, 'latin1');
  const state = Buffer.concat([Buffer.from('QEVM\0\0\0\x03', 'latin1'), randomBytes(1000)]);
  return pushImage(s, name, { plain: { mem, disk, state }, policy });
}

function filesUnder(dir: string, since: number, out: string[] = []): string[] {
  let entries: fs.Dirent[];
  try {
    entries = fs.readdirSync(dir, { withFileTypes: true });
  } catch {
    return out;
  }
  for (const e of entries) {
    const p = path.join(dir, e.name);
    if (e.isDirectory()) filesUnder(p, since, out);
    else if (e.isFile()) {
      try {
        if (fs.statSync(p).mtimeMs >= since) out.push(p);
      } catch {
        // gone meanwhile
      }
    }
  }
  return out;
}

describe('agent (real agent and server processes)', function () {
  this.timeout(90_000);
  let s: ServerProc;
  const agents: AgentProc[] = [];
  const startAgentProc = async (home: string, image: string, args: string[] = []) => {
    const a = await spawnAgent(home, image, args);
    agents.push(a);
    return a;
  };
  /** An image with `marker` planted, a device assigned it, and its agent running. */
  const agentFor = async (image: string, marker: string, policy?: string) => {
    await markedImage(s, image, marker, policy);
    const d = await enrolledDevice(s);
    await assign(s, d.deviceId, image);
    return { d, agent: await startAgentProc(d.home, image) };
  };
  /** Waits for the prefetch of markedImage's 34 stored chunks. */
  const prefetched = (home: string) => waitFor(async () => (await status(home)).prefetch.done === 34, 10_000, 'prefetch');
  before(async () => {
    s = await startServer();
  });
  afterEach(async () => {
    for (const a of agents.splice(0)) {
      a.proc.kill('SIGKILL');
      await a.exited;
    }
  });
  after(async () => {
    await s?.stop();
  });

  it('after a session, the planted marker is nowhere on disk: device home, /tmp, /dev/shm, logs', async () => {
    const t0 = Date.now() - 1000;
    const marker = `LETHE-MARKER-${randomBytes(12).toString('hex')}`;
    const { d, agent } = await agentFor('marked', marker);
    await waitFor(async () => (await status(d.home)).prefetch.done > 0 && (await status(d.home)).prefetch.done === (await status(d.home)).prefetch.total, 20_000, 'prefetch');
    const st = await selftest(d.home);
    expect(st.chunks).to.equal(32 + 1 + 1); // every stored chunk decrypted: 32 pages, 1 disk, 1 state
    const during = await status(d.home);
    expect(during.keys.sensitiveKeys, 'evicted pages took their keys along').to.equal(0);
    expect(during.reads.fromCache).to.equal(34);
    expect(await agent.stop()).to.equal(0);

    const needle = Buffer.from(marker, 'latin1');
    const scanned = [...filesUnder(d.home, 0), ...filesUnder(os.tmpdir(), t0), ...filesUnder('/dev/shm', t0)];
    expect(scanned.some((f) => f.endsWith('cache.db')), 'the cache was scanned').to.equal(true);
    for (const f of scanned) {
      let data: Buffer;
      try {
        data = fs.readFileSync(f);
      } catch {
        continue;
      }
      expect(data.includes(needle), `marker found in ${f}`).to.equal(false);
    }
    expect(agent.log()).to.not.contain(marker);
    d.close();
  });

  it('server gone: keys zeroed at lease expiry, status shows it, service resumes when it returns', async () => {
    const { d, agent } = await agentFor('short', 'x', 'lease:\n  ttl: 4s\n  renew: 1s\n');
    await waitFor(async () => (await status(d.home)).lease.renewals >= 1, 10_000, 'a renewal');
    const before = await status(d.home);
    expect(before.lease.state).to.equal('active');
    expect(before.keys.classKeys).to.equal(1);

    await s.stop();
    const expired = await waitFor(async () => {
      const st = await status(d.home);
      return st.lease.state === 'expired' ? st : undefined;
    }, 10_000, 'lease expiry');
    expect(expired!.keys).to.deep.equal({ classKeys: 0, sensitiveKeys: 0 });
    const text = await lethe(['agent', 'status', '--home', d.home]);
    expect(text.stdout).to.match(/lease\s+expired/);
    expect(text.stdout).to.match(/keys held\s+0 class, 0 sensitive/);
    expect(text.stdout).to.match(/push channel\s+down: reconnecting/);

    s = await s.restart();
    const back = await waitFor(async () => {
      const st = await status(d.home);
      return st.lease.state === 'active' ? st : undefined;
    }, 15_000, 'a new lease');
    expect(back!.keys.classKeys).to.equal(1);
    // The push channel is opened again to the server that came back.
    await waitFor(async () => (await status(d.home)).push.opens >= 2 && (await status(d.home)).push.connected, 30_000, 'the push channel open again');
    expect((await lethe(['agent', 'status', '--home', d.home])).stdout).to.match(/push channel\s+open \(rep-[0-9a-f]{16}\), opened 2 time\(s\)/);
    expect((await selftest(d.home)).chunks).to.equal(34);
    expect(agent.log()).to.contain('lease expired without renewal: keys zeroed, sensitive plaintext evicted');
    expect(await agent.stop()).to.equal(0);
    d.close();
  });

  it('wipe round trip: the agent wipes at a heartbeat, the cache is gone, the acknowledgement is audited', async () => {
    const { d, agent } = await agentFor('wiped-img', 'y');
    await prefetched(d.home);
    expect(fs.existsSync(path.join(d.home, 'cache.db'))).to.equal(true);
    expect((await lethe(['admin', 'wipe', d.deviceId], s.env)).code).to.equal(0);
    // Delivered by the heartbeat (wipe.delivered below), not by a lease renewal; how fast is a benchmark's question.
    expect(await agent.exited).to.equal(3);
    expect(agent.log()).to.contain('wipe ordered by IT');
    expect(fs.existsSync(d.home)).to.equal(false);
    const rep = JSON.parse((await lethe(['audit', 'device', d.deviceId, '--json'], s.env)).stdout) as { entries: { type: string }[] };
    expect(rep.entries.map((e) => e.type).slice(-3)).to.deep.equal(['device.wipe', 'wipe.delivered', 'wipe.ack']);
    d.close();
  });

  it('a revoked agent zeroes its keys, deletes its cache and exits non-zero', async () => {
    const { d, agent } = await agentFor('revoked-img', 'z');
    await prefetched(d.home);
    await lethe(['admin', 'revoke', d.deviceId], s.env);
    expect(await agent.exited).to.equal(3);
    expect(fs.existsSync(path.join(d.home, 'cache.db'))).to.equal(false);
    expect(fs.readdirSync(d.home).sort(), 'revocation implies a wipe on the device').to.deep.equal(['device.json', 'revoked.json', 'server-cert.pem']);
    expect(agent.log()).to.contain('refused by the server: this device has been revoked; keys zeroed, stopping the VM, deleting the cache and device keys');
    expect(agent.log()).to.contain('revocation acknowledged to the server');
    d.close();
  });

  it('a restart reuses the cache without fetching again', async () => {
    const { d, agent: first } = await agentFor('cached', 'c');
    await prefetched(d.home);
    expect(await first.stop()).to.equal(0);
    const audit = async () =>
      (JSON.parse((await lethe(['audit', 'device', d.deviceId, '--json'], s.env)).stdout) as { summary: { chunksServed: number } }).summary
        .chunksServed;
    const before = await audit();
    const second = await startAgentProc(d.home, 'cached');
    await waitFor(async () => (await status(d.home)).lease.state === 'active', 10_000, 'lease');
    const st = await selftest(d.home);
    expect(st.sources).to.deep.equal({ cache: 34, server: 0, zero: 0 });
    const after = await status(d.home);
    expect(after.fetch.prefetchChunks + after.fetch.demandChunks).to.equal(0);
    expect(await audit()).to.equal(before);
    expect(await second.stop()).to.equal(0);
    d.close();
  });

  it('a chunk tampered on the server is refused and reported; a damaged cache entry is fetched again', async () => {
    await markedImage(s, 'tampered', 't');
    const d = await enrolledDevice(s);
    await assign(s, d.deviceId, 'tampered');
    const a = admin(s);
    const id = (await a.json<{ images: { name: string; imageId: string }[] }>('GET', '/images')).images.find((i) => i.name === 'tampered')!.imageId;
    a.close();

    // Damage a cached blob (and its checksum, so only the manifest can tell).
    const agent1 = await startAgentProc(d.home, 'tampered');
    await prefetched(d.home);
    await agent1.stop();
    const db = path.join(d.home, 'cache.db');
    damageCachedBlob(db, 'mem', cachedRows(db, 'mem')[0].idx, 60);
    const agent2 = await startAgentProc(d.home, 'tampered', ['--no-prefetch']);
    await waitFor(async () => (await status(d.home)).lease.state === 'active', 10_000, 'lease');
    expect((await selftest(d.home)).sources).to.deep.equal({ cache: 33, server: 1, zero: 0 });
    await agent2.stop();

    // Tamper with a blob on the server, and empty the device cache: the demand read is refused.
    const store = await serverDb(s);
    const blob = (await store.store.get<{ idx: number; data: Buffer }>("SELECT idx, data FROM blobs WHERE image_id = ? AND kind = 'mem' ORDER BY idx LIMIT 1 OFFSET 3", id))!;
    const t = Buffer.from(blob.data);
    t[80] ^= 1;
    await store.store.run("UPDATE blobs SET data = ? WHERE image_id = ? AND kind = 'mem' AND idx = ?", t, id, blob.idx);
    await store.close();
    for (const f of cacheFiles(d.home)) fs.rmSync(f, { force: true });
    const agent3 = await startAgentProc(d.home, 'tampered', ['--no-prefetch']);
    await waitFor(async () => (await status(d.home)).lease.state === 'active', 10_000, 'lease');
    let err: unknown;
    try {
      await selftest(d.home);
    } catch (e) {
      err = e;
    }
    expect(err).to.be.instanceOf(LetheError);
    expect((err as LetheError).code).to.equal('TAMPERED');
    expect((err as LetheError).message).to.equal(`mem chunk ${blob.idx} from the server does not match the signed manifest; refused`);
    expect((await status(d.home)).reads.tampered).to.equal(1);
    expect(cachedRows(path.join(d.home, 'cache.db'), 'mem').map((r) => r.idx), 'the refused chunk was not cached').to.not.include(blob.idx);
    await agent3.stop();
    d.close();
  });
});
