// Eviction and suspend with a real server, real agents and QEMU (TCG): the
// evictor punches sensitive pages out while the guest's workload verifies them,
// the planted marker leaves every process and file once its pages are idle, and
// a suspended VM, once an admin promotes it, resumes on another enrolled device
// with its checks intact (before that, the other device gets the pushed version).
import { expect } from 'chai';
import fs from 'node:fs';
import { control } from '../../agent/daemon/control.js';
import type { AgentStatus } from '../../agent/daemon/start.js';
import { assign, enrolledDevice, type TestDevice } from '../helpers/fixtures.js';
import { lethe, startAgentProc, startServer, waitFor, type AgentProc, type ServerProc } from '../helpers/proc.js';
import { verifyPasses } from '../helpers/guest.js';
import { SUITE_TIMEOUT_MS, agentProgress, waitOnProgress } from '../helpers/progress.js';
import { dropSnapshot, pushSnapshot, snapshotGuest } from '../helpers/vm-image.js';
import { findFd, plantedHits, scanProcess, scanTree } from '../helpers/scan.js';

// Idleness is time since arrival (docs/eviction.md): every page the guest uses comes
// back once per idle period. At 1 s a guest slowed down by a busy host spent its time
// re-faulting its own kernel and never finished a pass; 2 s halves that, and the
// interval between passes still leaves every workload page idle for longer.
const IDLE_S = 2;
const INTERVAL_S = 10;
const LEASE_TTL_S = 20;

/** Waits for `fn` while the agent's guest makes progress (test/helpers/progress.ts). */
const whileRunning = <T>(a: AgentProc, home: string, fn: () => Promise<T>, what: string) => waitOnProgress(fn, agentProgress(home, a.log), { what });

describe('eviction and suspend (real server, agents and QEMU)', function () {
  this.timeout(SUITE_TIMEOUT_MS);
  this.slow(60_000);
  let s: ServerProc;
  let dev: TestDevice;
  let other: TestDevice;
  let third: TestDevice;
  let marker: Buffer;
  let agent: AgentProc | undefined;
  let agent2: AgentProc | undefined;
  let agent3: AgentProc | undefined;
  let agent4: AgentProc | undefined;

  before(async () => {
    const snap = await snapshotGuest('lethe-evict-', { intervalS: INTERVAL_S });
    marker = snap.marker;
    s = await startServer();
    await pushSnapshot(s, snap, 'vm', `eviction:\n  idle: ${IDLE_S}s\n`);
    // The same guest under a short lease, with an idle time it never reaches.
    await pushSnapshot(s, snap, 'vm-lease', `lease:\n  ttl: ${LEASE_TTL_S}s\n  renew: 4s\neviction:\n  idle: 10m\n`);
    dropSnapshot(snap);
    dev = await enrolledDevice(s, 'laptop-a');
    other = await enrolledDevice(s, 'laptop-b');
    await assign(s, dev.deviceId, 'vm');
    await assign(s, other.deviceId, 'vm');
    await assign(s, dev.deviceId, 'vm-lease');
    third = await enrolledDevice(s, 'laptop-c');
    await assign(s, third.deviceId, 'vm');
  });
  afterEach(function () {
    if (this.currentTest?.state !== 'failed') return;
    for (const [name, a] of [['first', agent], ['second', agent2], ['third', agent3], ['fourth', agent4]] as const) {
      if (a) console.log(`--- the ${name} agent's log, last lines:\n${a.log().split('\n').slice(-40).join('\n')}`);
    }
  });
  after(async () => {
    for (const a of [agent, agent2, agent3, agent4]) {
      if (a && a.proc.exitCode === null) {
        a.proc.kill('SIGKILL');
        await a.exited;
      }
    }
    dev?.close();
    other?.close();
    third?.close();
    await s?.stop();
  });

  it('evicts pages while the workload verifies them: every check passes, changed pages are kept', async () => {
    agent = await startAgentProc(dev.home, 'vm', ['--vm', '--accel', 'tcg', '--log-guest-console', '--no-prefetch']);
    await whileRunning(agent, dev.home, async () => verifyPasses(agent!.log()).length >= 2, 'two verify passes');
    const ps = verifyPasses(agent.log());
    for (const p of ps) expect(p.bad, `pass ${p.pass}`).to.equal(0);
    expect(ps[0].ok).to.equal(4096);
    expect(agent.log()).to.not.contain('LETHE-VERIFY-BAD');
    const st = await control<AgentStatus>(dev.home, { cmd: 'status' });
    // Every workload page was evicted and fetched again at least once per pass.
    expect(st.vm!.eviction.evicted).to.be.greaterThan(2 * 4096);
    expect(st.vm!.faults).to.be.greaterThan(2 * 4096);
    // The workload rewrites pages each pass: those went to the cache before their holes.
    expect(st.vm!.eviction.dirty).to.be.greaterThan(0);
    expect(st.vm!.evictIdleSeconds).to.equal(IDLE_S);
  });

  it('once its pages are idle the planted marker is in neither guest RAM, QEMU, the agent, their files nor /dev/shm', async () => {
    const st = await control<AgentStatus>(dev.home, { cmd: 'status' });
    const qemu = st.vm!.pid;
    const ram = findFd(qemu, /lethe-ram-.*\(deleted\)$/);
    expect(ram, 'QEMU holds its RAM file').to.be.a('string');
    // While a pass runs, the pages it touches are resident: the scan can see them.
    await whileRunning(agent!, dev.home, async () => plantedHits(ram!, marker).length > 0, 'planted pages in guest RAM during a pass');
    const n = verifyPasses(agent!.log()).length;
    await whileRunning(agent!, dev.home, async () => verifyPasses(agent!.log()).length > n, 'the end of a verify pass');
    // Idle time, plus an eviction tick, plus margin; the next pass is INTERVAL_S after.
    await new Promise((r) => setTimeout(r, (IDLE_S + 1.5) * 1000));
    // The guest's kernel may touch a planted page on its own (page scanning), which
    // brings it back for one idle period; a clean look at guest RAM must come within
    // a few tries, each one idle period later than the page could have arrived.
    let inRam = plantedHits(ram!, marker);
    for (let i = 0; i < 3 && inRam.length > 0; i++) {
      await new Promise((r) => setTimeout(r, IDLE_S * 700));
      inRam = plantedHits(ram!, marker);
    }
    const hits = [
      ...inRam,
      ...scanProcess(qemu, marker, /lethe-ram-/),
      ...scanProcess(agent!.proc.pid!, marker, /lethe-ram-/),
      ...scanTree(dev.home, marker),
      ...scanTree('/dev/shm', marker),
    ];
    const after = await control<AgentStatus>(dev.home, { cmd: 'status' });
    expect(verifyPasses(agent!.log()).length, 'no pass ran during the scan').to.be.lessThan(n + 2);
    expect(hits, JSON.stringify(after.vm)).to.deep.equal([]);
    expect(after.vm!.eviction.evicted).to.be.greaterThan(st.vm!.eviction.evicted);
    expect(after.vm!.eviction.kept, 'pages kept resident').to.equal(0);
  });

  it('suspends on one device and, once promoted, resumes on another: the workload carries on with no bad page', async () => {
    const before = verifyPasses(agent!.log());
    const r = await lethe(['agent', 'suspend', '--home', dev.home, '--json']);
    expect(r.code, r.stderr).to.equal(0);
    const out = JSON.parse(r.stdout) as { version: number; pages: number; stateBytes: number };
    expect(out.version).to.be.greaterThan(1);
    expect(out.stateBytes).to.be.greaterThan(100_000);
    expect(await agent!.exited).to.equal(0);
    expect(fs.readdirSync('/dev/shm').filter((f) => f.startsWith('lethe-ram-'))).to.deep.equal([]);
    // The suspend is the first device's own until an admin promotes it (docs/branches.md).
    expect((await other.client.lease('vm')).version, 'before promotion').to.equal(1);
    const p = await lethe(['image', 'promote', 'vm', String(out.version)], s.env);
    expect(p.code, p.stderr).to.equal(0);

    agent2 = await startAgentProc(other.home, 'vm', ['--vm', '--accel', 'tcg', '--log-guest-console', '--no-prefetch']);
    await whileRunning(agent2, other.home, async () => verifyPasses(agent2!.log()).length >= 2, 'two verify passes on the other device');
    const ps = verifyPasses(agent2.log());
    for (const p of ps) expect(p.bad, `pass ${p.pass}`).to.equal(0);
    // The same run of the workload, not a new boot: its pass count goes on.
    expect(ps[0].pass).to.be.greaterThan(before[before.length - 1].pass);
    expect(ps[0].ok).to.equal(4096);
    const st = await control<AgentStatus>(other.home, { cmd: 'status' });
    expect(st.version).to.equal(out.version);
  });

  it('offline until the lease runs out: every sensitive page and key leaves before the keys do; the guest carries on once the server is back', async () => {
    agent2!.proc.kill('SIGKILL');
    await agent2!.exited;
    agent3 = await startAgentProc(dev.home, 'vm-lease', ['--vm', '--accel', 'tcg', '--log-guest-console', '--no-prefetch']);
    await whileRunning(agent3, dev.home, async () => verifyPasses(agent3!.log()).length >= 1, 'a verify pass');
    // The workload's pages come in as it touches them (no prefetch): wait for most of them.
    const before = await whileRunning(
      agent3,
      dev.home,
      async () => {
        const st = await control<AgentStatus>(dev.home, { cmd: 'status' });
        return st.vm!.residentPages.sensitive > 2000 ? st : undefined;
      },
      'the workload to touch its sensitive pages',
    );
    // The idle time is not reached: pages stay, but those the guest reports free (free-pages: evict).
    expect(before.vm!.eviction.idle, 'no page evicted for idleness').to.equal(0);
    const ram = findFd(before.vm!.pid, /lethe-ram-.*\(deleted\)$/)!;

    await s.stop();
    const expired = await waitFor(
      async () => {
        const st = await control<AgentStatus>(dev.home, { cmd: 'status' });
        return st.lease.state === 'expired' ? st : undefined;
      },
      (LEASE_TTL_S + 10) * 1000,
      'the lease to expire',
    );
    expect(agent3.log()).to.match(/evicted \d+ sensitive page\(s\) \(the lease is running out unrenewed\)/);
    expect(expired.vm!.residentPages.sensitive).to.equal(0);
    expect(expired.vm!.eviction.kept).to.equal(0);
    expect(expired.vm!.heldFor).to.include('lease');
    expect(expired.keys).to.deep.equal({ classKeys: 0, sensitiveKeys: 0 });
    expect(plantedHits(ram, marker)).to.deep.equal([]);

    s = await s.restart();
    const n = verifyPasses(agent3.log()).length;
    await whileRunning(agent3, dev.home, async () => verifyPasses(agent3!.log()).length > n, 'a verify pass after the server came back');
    for (const p of verifyPasses(agent3.log())) expect(p.bad, `pass ${p.pass}`).to.equal(0);
  });

  it('lethe admin wipe reaches a running guest by push: the planted marker, resident a moment before, is in no process, file or /dev/shm; QEMU is gone', async () => {
    // The heartbeat is ten minutes away: only the push channel can bring the wipe.
    agent4 = await startAgentProc(third.home, 'vm', ['--vm', '--accel', 'tcg', '--log-guest-console', '--no-prefetch', '--heartbeat', '10m']);
    await whileRunning(agent4, third.home, async () => verifyPasses(agent4!.log()).length >= 1, 'a verify pass');
    const st = await control<AgentStatus>(third.home, { cmd: 'status' });
    expect(st.push.connected, 'the push channel is open').to.equal(true);
    const qemu = st.vm!.pid;
    const ram = findFd(qemu, /lethe-ram-.*\(deleted\)$/)!;
    await whileRunning(agent4, third.home, async () => plantedHits(ram, marker).length > 0, 'planted pages resident in guest RAM');

    const t0 = Date.now();
    const w = await lethe(['admin', 'wipe', third.deviceId, '--wait', '5m', '--json'], s.env);
    const ms = Date.now() - t0;
    expect(w.code, w.stderr).to.equal(0);
    const ack = (JSON.parse(w.stdout) as { ack: { deliveredVia: string; elapsedMs: number; result: { zeroedAfterMs: number } } }).ack;
    expect(ack.deliveredVia).to.equal('push');
    expect(await agent4.exited).to.equal(3);
    expect(fs.existsSync(`/proc/${qemu}`), 'QEMU is gone').to.equal(false);
    expect(fs.existsSync(third.home), 'the device home is gone').to.equal(false);
    expect(scanTree('/dev/shm', marker)).to.deep.equal([]);
    expect(agent4.log()).to.match(/command #1 from the server \(push\): wipe/);
    console.log(`      wipe to acknowledgement: ${ack.elapsedMs} ms (keys zeroed and plaintext evicted ${ack.result.zeroedAfterMs} ms after arrival; CLI ${ms} ms)`);
  });
});
