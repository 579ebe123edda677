// Guest cooperation and the policy manager with a real server, agents and QEMU
// (TCG): the guest driver's reports make the workload's pages sensitive under
// `memory: hinted` and only those leave guest RAM; a second resume prefetches in
// the order the first one (on a device trusted for the image) touched pages and
// waits on the server far less; pages whose plaintext may stay are installed ahead.
import { expect } from 'chai';
import fs from 'node:fs';
import path from 'node:path';
import { control } from '../../agent/daemon/control.js';
import type { AgentStatus } from '../../agent/daemon/start.js';
import { parseAccessTrace } from '../../policies/simulate.js';
import { assign, enrolledDevice, type TestDevice } from '../helpers/fixtures.js';
import { lethe, startAgentProc, startServer, tmpDir, type AgentProc, type ServerProc } from '../helpers/proc.js';
import { verifyPasses } from '../helpers/guest.js';
import { dropSnapshot, pushSnapshot, snapshotGuest } from '../helpers/vm-image.js';
import { SUITE_TIMEOUT_MS, agentProgress, waitOnProgress } from '../helpers/progress.js';
import { findFd, plantedHits } from '../helpers/scan.js';

const INTERVAL_S = 6;
const WORKLOAD_PAGES = 4096;


const status = (d: TestDevice) => control<AgentStatus>(d.home, { cmd: 'status' });
/** Waits for `fn` while the agent's guest makes progress (test/helpers/progress.ts). */
const whileRunning = <T>(a: AgentProc, d: TestDevice, fn: () => Promise<T>, what: string) => waitOnProgress(fn, agentProgress(d.home, a.log), { what });

describe('guest hints and trace-learned prefetch (real server, agents and QEMU)', function () {
  this.timeout(SUITE_TIMEOUT_MS);
  this.slow(60_000);
  let s: ServerProc;
  let dir: string;
  let marker: Buffer;
  const agents: AgentProc[] = [];
  const devices: TestDevice[] = [];

  const device = async (name: string, image: string) => {
    const d = await enrolledDevice(s, name);
    devices.push(d);
    await assign(s, d.deviceId, image);
    return d;
  };
  const agentOn = async (d: TestDevice, image: string, args: string[]) => {
    const a = await startAgentProc(d.home, image, ['--vm', '--accel', 'tcg', '--log-guest-console', ...args]);
    agents.push(a);
    return a;
  };

  before(async () => {
    dir = tmpDir('lethe-policy-');
    const snap = await snapshotGuest('lethe-policy-snap-', { intervalS: INTERVAL_S });
    marker = snap.marker;
    s = await startServer();
    const push = (name: string, policy: string) => pushSnapshot(s, snap, name, policy);
    await push('hinted', 'sensitive:\n  memory: hinted\n  processes: [lethe-workload]\n  free-pages: keep\neviction:\n  idle: 2s\nhints:\n  interval: 1s\n');
    // No eviction, and background prefetch too slow to matter: what the startup buffer holds decides;
    // sized automatically, it is nothing on a cold device and, after a timed trace, what that cap calls for.
    await push('learned', 'sensitive:\n  memory: none\nprefetch:\n  startup: auto\n  order: trace\n  bandwidth: 16KiB/s\n');
    // Background prefetch at full speed: what it brings is installed ahead, or (every page sensitive) only cached.
    await push('ahead', 'sensitive:\n  memory: none\nprefetch:\n  startup: 16MiB\n  order: address\n');
    await push('ahead-all', 'sensitive:\n  memory: all\neviction:\n  idle: 1h\nprefetch:\n  startup: 16MiB\n  order: address\n');
    dropSnapshot(snap);
  });
  afterEach(function () {
    if (this.currentTest?.state !== 'failed') return;
    for (const a of agents) console.log(`--- agent log, last lines:\n${a.log().split('\n').slice(-40).join('\n')}`);
  });
  after(async () => {
    for (const a of agents) {
      if (a.proc.exitCode === null) {
        a.proc.kill('SIGKILL');
        await a.exited;
      }
    }
    for (const d of devices) d.close();
    await s?.stop();
  });

  it("memory: hinted — the driver's reports make the workload's pages sensitive; they leave guest RAM, the rest stays", async () => {
    const d = await device('laptop-hinted', 'hinted');
    const trace = path.join(dir, 'hinted.trace.jsonl');
    const a = await agentOn(d, 'hinted', ['--no-prefetch', '--trace', trace]);
    await whileRunning(a, d, async () => verifyPasses(a.log()).length >= 2, 'two verify passes');
    // The workload's pages go once idle, and come back with each pass: a pass's worth of evictions.
    const st = await whileRunning(a, d, async () => {
      const now = await status(d);
      return now.vm!.eviction.idle >= WORKLOAD_PAGES ? now : undefined;
    }, `${WORKLOAD_PAGES} idle pages evicted`);
    const vm = st.vm!;
    expect(vm.memoryMode).to.equal('hinted');
    expect(vm.hints.connected, 'the guest driver is connected').to.equal(true);
    expect(vm.hints.lastReport!.procs, 'the workload matched').to.be.at.least(1);
    // Most of the workload's pages at any one report (a resumed guest's report was seen a few hundred short).
    expect(vm.hints.lastReport!.sensitiveFrames).to.be.at.least((3 * WORKLOAD_PAGES) / 4);
    for (const p of verifyPasses(a.log())) expect(p.bad, `pass ${p.pass}`).to.equal(0);
    // ... while the kernel's and other processes' pages stay (a resumed guest has touched ~1,800 of them by now).
    const others = vm.residentPages.pages - vm.residentPages.sensitive;
    expect(others).to.be.at.least(1000);
    expect(vm.eviction.free + vm.eviction.budget, 'nothing but idle hinted pages was evicted').to.equal(0);

    // Between passes, once the idle time is over, no planted page is in guest RAM.
    const ram = findFd(vm.pid, /lethe-ram-.*\(deleted\)$/)!;
    const n = verifyPasses(a.log()).length;
    await whileRunning(a, d, async () => verifyPasses(a.log()).length > n, 'the end of a verify pass');
    await new Promise((r) => setTimeout(r, 3_500));
    let planted = plantedHits(ram, marker).length;
    for (let i = 0; i < 3 && planted > 0; i++) {
      await new Promise((r) => setTimeout(r, 1_000));
      planted = plantedHits(ram, marker).length;
    }
    expect(planted, 'planted pages left in guest RAM').to.equal(0);
    const later = await status(d);
    expect(later.vm!.residentPages.pages - later.vm!.residentPages.sensitive, 'non-sensitive pages still resident').to.be.at.least(others);

    // The recorded trace replays: faults and reports, in order.
    a.proc.kill('SIGTERM');
    expect(await a.exited).to.equal(0);
    const t = parseAccessTrace(fs.readFileSync(trace, 'utf8'), trace);
    expect(t.pages).to.equal(32768);
    expect(t.events.filter((e) => 'hint' in e).length).to.be.at.least(2);
    expect(t.events.filter((e) => 'fault' in e).length).to.be.at.least(2 * WORKLOAD_PAGES);
  });

  it('install-ahead (issue #18): pages whose plaintext may stay are put in guest RAM before the guest touches them; sensitive pages never are', async () => {
    const d = await device('laptop-ahead', 'ahead');
    const a = await agentOn(d, 'ahead', []);
    const done = /prefetch done: \d+ of \d+ chunks in the cache, (\d+) page\(s\) of guest RAM installed ahead/;
    await whileRunning(a, d, async () => done.test(a.log()) && verifyPasses(a.log()).length >= 2, 'the end of prefetch and two verify passes');
    const st = (await status(d)).vm!;
    // The startup buffer (4,096 pages) went in before the guest ran, the rest as it arrived.
    expect(st.installedAhead).to.be.at.least(4096);
    expect(Number(done.exec(a.log())![1])).to.equal(st.installedAhead);
    // Installed pages hold their real content: the workload checks every one of its pages.
    for (const p of verifyPasses(a.log())) expect(p.bad, `pass ${p.pass}`).to.equal(0);
    expect(st.residentPages.pages, 'installed pages count as resident plaintext').to.be.at.least(st.installedAhead);
    // Far fewer faults than pages the guest uses: the workload alone has 4,096.
    expect(st.faults).to.be.below(st.installedAhead);

    const d2 = await device('laptop-ahead-all', 'ahead-all');
    const b = await agentOn(d2, 'ahead-all', []);
    await whileRunning(b, d2, async () => /prefetch done/.test(b.log()) && verifyPasses(b.log()).length >= 1, 'the end of prefetch and a verify pass');
    const st2 = (await status(d2)).vm!;
    expect(st2.installedAhead, 'sensitive pages installed ahead').to.equal(0);
    // Every resident sensitive page came from the guest's own fault (its key release audited on demand).
    expect(st2.residentPages.sensitive).to.be.at.most(st2.faults);
    for (const p of verifyPasses(b.log())) expect(p.bad, `pass ${p.pass}`).to.equal(0);
  });

  it('trace-learned prefetch: the second resume, on another device that trusts the first, waits on the server far less than the first', async () => {
    const first = await device('laptop-1', 'learned');
    const a = await agentOn(first, 'learned', []);
    await whileRunning(a, first, async () => verifyPasses(a.log()).length >= 1, 'a verify pass');
    const st1 = await status(first);
    const demand1 = st1.fetch.demandBatches;
    // With no learned order yet, the first device traces the image: nothing goes into guest RAM ahead of a fault.
    expect(a.log()).to.match(/no learned order for this image yet: this session traces it/);
    expect(st1.vm!.installedAhead, 'pages installed ahead on the tracing device').to.equal(0);
    a.proc.kill('SIGTERM');
    expect(await a.exited).to.equal(0);
    expect(a.log()).to.match(/first-touch order of \d+ page\(s\) uploaded/);
    // Another device's order takes only traces of devices an admin trusts (docs/branches.md).
    const t = await lethe(['image', 'trust', 'learned', first.deviceId], s.env);
    expect(t.code, t.stderr).to.equal(0);

    const second = await device('laptop-2', 'learned');
    const b = await agentOn(second, 'learned', []);
    await whileRunning(b, second, async () => verifyPasses(b.log()).length >= 1, 'a verify pass');
    const demand2 = (await status(second)).fetch.demandBatches;
    expect(a.log(), 'a cold device has no touch curve: no buffer').to.not.match(/startup buffer:/);
    expect(b.log(), 'the second device has a learned order').to.not.match(/this session traces it/);
    expect(b.log()).to.match(/startup buffer: \d+ page\(s\) fetched \(\d+ planned, learned order of \d+, sized for [\d.]+ Mbit\/s and the learned touch curve\)/);
    for (const p of [...verifyPasses(a.log()), ...verifyPasses(b.log())]) expect(p.bad).to.equal(0);
    console.log(`      demand requests to the first verify pass: first resume ${demand1}, second ${demand2}`);
    expect(demand2).to.be.below(demand1 / 2);
  });
});
