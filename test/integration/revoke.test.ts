// Issue #14, part 4: revocation that always lands. A refusal of the device
// (revoked, wiped, wipe pending) or of its lease (unassigned) ends the agent or
// the lease at the very call that got it, a key or chunk fetch included, not at
// the next renewal or heartbeat (an agent in this process whose heartbeat is
// 30 s off and whose renewal is minutes off). Revocation implies a wipe on the
// device: its key files and cache go, device.json stays, and a wipe ordered
// afterwards is already done.
import { expect } from 'chai';
import fs from 'node:fs';
import path from 'node:path';
import { DeviceClient } from '../../agent/remote/device-client.js';
import { closeIdentity, enrollDevice, homeFiles, loadIdentity, revokedMarker } from '../../agent/keys/identity.js';
import type { RunningAgent } from '../../agent/daemon/start.js';
import { adminCall as adminCallOn, deviceAudit, agentInProcess, assign, enrolledDevice, pushImage, rejects, testUnlock } from '../helpers/fixtures.js';
import { lethe, startServer, waitFor, type ServerProc } from '../helpers/proc.js';
import { sha256 } from '../../common/crypto.js';
import { cacheFiles } from '../../agent/chunks/cache.js';

const PAGE = 4096;

/** The agent's exit code, or 'still running' if it has not stopped within `ms`. */
const exitWithin = (agent: RunningAgent, ms: number) =>
  Promise.race([agent.done, new Promise<string>((r) => setTimeout(() => r('still running'), ms).unref())]);

/** The keys the agent holds when it takes the refused path (before it stops), or 'not refused' if it does not within 5 s. */
const keysAtRefusal = (agent: RunningAgent) =>
  new Promise<unknown>((resolve) => {
    const t = setTimeout(() => resolve('not refused'), 5_000).unref();
    agent.lease.once('revoked', () => {
      clearTimeout(t);
      resolve(agent.status().keys);
    });
  });

/** What the device home holds that a revoked device must not keep: key files and the cache. */
function leftovers(home: string): string[] {
  const cache = cacheFiles(home);
  return [...homeFiles(home).secrets, ...cache].filter((f) => fs.existsSync(f)).map((f) => path.basename(f));
}

describe('revocation that always lands (issue #14, part 4; real server, agent in this process)', function () {
  this.timeout(60_000);
  let s: ServerProc;
  const running: RunningAgent[] = [];
  const adminCall = <T>(method: string, p: string, body?: unknown) => adminCallOn<T>(s, method, p, body);
  const auditTypes = (deviceId: string) => deviceAudit(s, deviceId);
  const device = async (deviceId: string) =>
    (await adminCall<{ status: string; revokeAckedAt: string | null }>('GET', `/devices/${deviceId}`));
  /** An agent holding a lease on a fresh image, a mem page of it read once (its blob cached) and evicted (no sensitive key held). */
  const agentWithEvictedPage = async (image: string) => {
    const { agent, home } = await agentInProcess(s, image);
    running.push(agent);
    const out = Buffer.alloc(PAGE);
    expect(await agent.core.readInto('mem', 0, out)).to.equal('server');
    agent.core.evict('mem', 0);
    agent.core.dropKeysWithoutPlaintext('mem', 0, () => false); // the neighbours' keys that came in its batch
    expect(agent.status().keys).to.deep.equal({ classKeys: 1, sensitiveKeys: 0 });
    return { agent, home, deviceId: agent.status().device };
  };
  /** A read of mem page 0 again: its blob is cached, so the only call it makes is a key fetch. */
  const keyFetch = (agent: RunningAgent) => agent.core.readInto('mem', 0, Buffer.alloc(PAGE)).then(() => undefined, (e: { code?: string }) => e.code);
  /** A read of mem page 2 (stored, never fetched): a chunk fetch first. */
  const chunkFetch = (agent: RunningAgent) => agent.core.readInto('mem', 2, Buffer.alloc(PAGE)).then(() => undefined, (e: { code?: string }) => e.code);

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

  it('a key fetch answered DEVICE_REVOKED zeroes the keys, deletes the cache and key files and stops the agent at that call; the erasure is acknowledged and audited; the home says it must be enrolled again, and can be', async () => {
    const { agent, home, deviceId } = await agentWithEvictedPage('rv-keys');
    await adminCall('POST', `/devices/${deviceId}/revoke`);

    const atRefusal = keysAtRefusal(agent);
    expect(await keyFetch(agent)).to.equal('DEVICE_REVOKED');
    expect(await atRefusal, 'the refused path was taken at that answer, keys zeroed').to.deep.equal({ classKeys: 0, sensitiveKeys: 0 });
    expect(await exitWithin(agent, 20_000)).to.equal(3);
    expect(agent.lease.renewals, 'no renewal was due').to.equal(0);

    expect(leftovers(home)).to.deep.equal([]);
    expect(fs.existsSync(homeFiles(home).info), 'device.json stays: which device it was').to.equal(true);
    expect(revokedMarker(home)).to.include({ deviceId, status: 'revoked', acknowledged: true });
    const dev = await device(deviceId);
    expect(dev.status).to.equal('revoked');
    expect(dev.revokeAckedAt).to.be.a('string');
    const entries = await auditTypes(deviceId);
    expect(entries.map((e) => e.type).slice(-2)).to.deep.equal(['device.revoke', 'revoke.ack']);
    expect(String(entries.at(-1)!.data.detail)).to.match(/^keys zeroed, VM stopped; removed \d+ item\(s\): .*sign\.key/);

    // Every command says what happened and what to do.
    for (const args of [['heartbeat'], ['agent', 'run', 'rv-keys']]) {
      const r = await lethe([...args, '--home', home]);
      expect(r.code, r.stderr).to.equal(3);
      expect(r.stderr).to.match(new RegExp(`^lethe: error: device ${deviceId} was revoked by IT \\(.+\\); its keys and cache are deleted\\n`));
      expect(r.stderr).to.contain(`lethe: hint: this machine must be enrolled again: ask IT for a new token, then 'lethe enroll TOKEN --home ${home}'`);
    }
    // Enrolling again replaces the revoked device in that home.
    const { token } = await adminCall<{ token: string }>('POST', '/enroll-tokens', {});
    const info = await enrollDevice(home, token, 'again', { seal: 'passphrase', unlock: testUnlock(), argon2: 'interactive' });
    expect(info.deviceId).to.not.equal(deviceId);
    expect(revokedMarker(home)).to.equal(undefined);
    closeIdentity(await loadIdentity(home, testUnlock()));
  });

  it('a chunk fetch answered DEVICE_WIPED (the wipe done by another copy) stops the agent at that call and erases what the home still holds', async () => {
    const { agent, home, deviceId } = await agentWithEvictedPage('rv-wiped');
    await adminCall('POST', `/devices/${deviceId}/wipe`);
    // Another copy of the device (a 'lethe heartbeat' elsewhere, say) takes the wipe and acknowledges it.
    const id = await loadIdentity(home, testUnlock());
    const other = new DeviceClient(id);
    try {
      const hb = await other.heartbeat();
      await other.ack(hb.commands[0].id, true);
    } finally {
      other.close();
      closeIdentity(id);
    }
    expect((await device(deviceId)).status).to.equal('wiped');

    const atRefusal = keysAtRefusal(agent);
    expect(await chunkFetch(agent)).to.equal('DEVICE_WIPED');
    expect(await atRefusal).to.deep.equal({ classKeys: 0, sensitiveKeys: 0 });
    expect(await exitWithin(agent, 10_000)).to.equal(3);
    expect(leftovers(home)).to.deep.equal([]);
    expect(revokedMarker(home)).to.include({ deviceId, status: 'wiped' });
  });

  it('a wipe ordered after the revoked device erased itself is done at once, and audited as such', async () => {
    const { agent, home, deviceId } = await agentWithEvictedPage('rv-then-wipe');
    await adminCall('POST', `/devices/${deviceId}/revoke`);
    expect(await chunkFetch(agent)).to.equal('DEVICE_REVOKED');
    expect(await exitWithin(agent, 20_000)).to.equal(3);
    const acked = (await device(deviceId)).revokeAckedAt;
    expect(acked).to.be.a('string');

    const w = await lethe(['admin', 'wipe', deviceId, '--json'], s.env);
    expect(w.code, w.stderr).to.equal(0);
    expect(JSON.parse(w.stdout)).to.deep.equal({ id: deviceId, status: 'wiped', erasedAt: acked });
    expect(leftovers(home)).to.deep.equal([]);
    const entries = await auditTypes(deviceId);
    expect(entries.map((e) => e.type).slice(-3)).to.deep.equal(['device.revoke', 'revoke.ack', 'device.wipe']);
    expect(entries.at(-1)!.data).to.deep.equal({ erasedAt: acked, actor: `token:${sha256(s.adminToken).toString('hex').slice(0, 8)}` });
  });

  it('a wipe ordered after a revoke the device has not heard of is carried out at its next call, a chunk fetch', async () => {
    const { agent, home, deviceId } = await agentWithEvictedPage('rv-wipe-pending');
    await adminCall('POST', `/devices/${deviceId}/revoke`);
    await adminCall('POST', `/devices/${deviceId}/wipe`);

    expect(await chunkFetch(agent)).to.equal('DEVICE_WIPE_PENDING');
    expect(await exitWithin(agent, 10_000)).to.equal(3);
    expect(fs.existsSync(home), 'the wipe removed the device home').to.equal(false);
    expect((await device(deviceId)).status).to.equal('wiped');
    // The heartbeat the refusal brought forward hands out both commands; the wipe is what the device carries out.
    expect((await auditTypes(deviceId)).map((e) => e.type).slice(-5)).to.deep.equal(['device.revoke', 'device.wipe', 'revoke.delivered', 'wipe.delivered', 'wipe.ack']);
  });

  it('the revoke acknowledgement is the one call a revoked device may make: it gives nothing, is recorded and audited once, completes a wipe ordered meanwhile, and only a revoked device can make it', async () => {
    await pushImage(s, 'rv-ack', { chunks: 1 });
    const d = await enrolledDevice(s, 'acker');
    await assign(s, d.deviceId, 'rv-ack');
    const lease = await d.client.lease('rv-ack');
    const e = await rejects(d.client.ackRevoke('early'));
    expect({ status: e.status, code: e.code }).to.deep.equal({ status: 409, code: 'CONFLICT' });

    await adminCall('POST', `/devices/${d.deviceId}/revoke`);
    const first = await d.client.ackRevoke('keys zeroed');
    expect(first).to.include({ id: d.deviceId, status: 'revoked' });
    const again = await d.client.ackRevoke('again');
    expect(again.acknowledgedAt).to.equal(first.acknowledgedAt);
    expect((await device(d.deviceId)).revokeAckedAt).to.equal(first.acknowledgedAt);
    for (const call of [() => d.client.keys(lease.leaseId, [{ kind: 'mem', index: 0 }]), () => d.client.lease('rv-ack'), () => d.client.heartbeat()]) {
      expect((await rejects(call())).code).to.equal('DEVICE_REVOKED');
    }
    const entries = await auditTypes(d.deviceId);
    expect(entries.map((x) => x.type).slice(-2)).to.deep.equal(['device.revoke', 'revoke.ack']);
    // It answers the revoke command: which one, and how long after it.
    const revokeCmd = (entries.at(-2)!.data as { command: string }).command;
    expect(revokeCmd).to.match(/^cmd-[0-9a-f]{16}$/);
    expect(entries.at(-1)!.data).to.deep.include({ detail: 'keys zeroed', command: revokeCmd });
    expect((entries.at(-1)!.data as { elapsedMs: number }).elapsedMs).to.be.a('number').at.least(0);
    d.close();

    // A wipe ordered between the revocation and its acknowledgement is done by the acknowledgement.
    const late = await enrolledDevice(s, 'late-acker');
    await adminCall('POST', `/devices/${late.deviceId}/revoke`);
    expect((await adminCall<{ status: string }>('POST', `/devices/${late.deviceId}/wipe`)).status).to.equal('wipe-pending');
    expect(await late.client.ackRevoke()).to.include({ status: 'wiped' });
    const lateEntries = await auditTypes(late.deviceId);
    expect(lateEntries.map((x) => x.type).slice(-3)).to.deep.equal(['device.wipe', 'revoke.ack', 'wipe.ack']);
    expect(lateEntries.at(-1)!.data).to.include({ ok: true, via: 'revoke.ack' });
    expect((await rejects(late.client.heartbeat())).code).to.equal('DEVICE_WIPED');
    late.close();
  });

  it('unassigning the image ends the lease at the next key fetch (NOT_ASSIGNED, audited), not at renewal; a new assignment brings a new lease', async () => {
    const { agent, deviceId } = await agentWithEvictedPage('rv-unassign');
    const leaseId = agent.lease.leaseId();
    const u = await lethe(['admin', 'unassign', deviceId, 'rv-unassign'], s.env);
    expect(u.code, u.stderr).to.equal(0);

    expect(await keyFetch(agent)).to.equal('NOT_ASSIGNED');
    await waitFor(async () => agent.lease.state === 'expired' || undefined, 5_000, 'the lease to end');
    expect(agent.status().keys).to.deep.equal({ classKeys: 0, sensitiveKeys: 0 });
    expect(agent.lease.renewals).to.equal(0);
    expect(agent.status().lease.lastError).to.match(/^image 'rv-unassign' is (no longer|not) assigned to this device/);

    const entries = await auditTypes(deviceId);
    const at = entries.findIndex((x) => x.type === 'unassign');
    expect(at, 'unassign audited').to.be.greaterThan(-1);
    const refused = entries.slice(at + 1).filter((x) => x.type === 'lease.refused');
    expect(refused.length).to.be.greaterThan(0);
    expect(refused[0].data).to.deep.equal({ lease: leaseId, image: 'rv-unassign', version: 1, code: 'NOT_ASSIGNED' });
    expect(entries.slice(at + 1).some((x) => x.type === 'keys.release' || x.type === 'chunks.serve'), 'nothing released after the unassign').to.equal(false);

    await assign(s, deviceId, 'rv-unassign');
    await waitFor(async () => (agent.lease.state === 'active' && agent.lease.leaseId() !== leaseId) || undefined, 15_000, 'a new lease');
    expect(await keyFetch(agent)).to.equal(undefined);
  });
});
