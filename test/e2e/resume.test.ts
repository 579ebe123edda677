// Post-copy resume through userfaultfd: a real agent process resumes the test
// guest's snapshot from a real server, every guest page arriving on first
// touch; the workload's checks pass; kill -9 of the agent takes QEMU with it.
import { expect } from 'chai';
import fs from 'node:fs';
import path from 'node:path';
import { execFile } from 'node:child_process';
import { control } from '../../agent/daemon/control.js';
import { startAgent, type AgentStatus } from '../../agent/daemon/start.js';
import { assign, enrolledDevice, testUnlock, type TestDevice } from '../helpers/fixtures.js';
import { verifyPasses } from '../helpers/guest.js';
import { startAgentProc, startServer, waitFor, type AgentProc, type ServerProc } from '../helpers/proc.js';
import { SUITE_TIMEOUT_MS, agentProgress, waitOnProgress } from '../helpers/progress.js';
import { dropSnapshot, pushSnapshot, snapshotGuest } from '../helpers/vm-image.js';

const alive = (pid: number) => fs.existsSync(`/proc/${pid}`) && !fs.readFileSync(`/proc/${pid}/stat`, 'utf8').includes(') Z ');

describe('post-copy resume through userfaultfd (real server, agent and QEMU)', function () {
  this.timeout(SUITE_TIMEOUT_MS);
  this.slow(30_000);
  let s: ServerProc;
  let dev: TestDevice;
  let agent: AgentProc | undefined;
  before(async () => {
    const snap = await snapshotGuest('lethe-resume-');
    s = await startServer();
    await pushSnapshot(s, snap, 'vm');
    dropSnapshot(snap);
    dev = await enrolledDevice(s);
    await assign(s, dev.deviceId, 'vm');
  });
  afterEach(async function () {
    if (agent && this.currentTest?.state === 'failed') console.log(`--- the agent's log, last lines:\n${agent.log().split('\n').slice(-30).join('\n')}`);
    if (agent) {
      agent.proc.kill('SIGKILL');
      await agent.exited;
    }
  });
  after(async () => {
    dev?.close();
    await s?.stop();
  });

  it('resumes the guest with every page served on first touch; the workload finds no bad page', async () => {
    agent = await startAgentProc(dev.home, 'vm', ['--vm', '--accel', 'tcg', '--log-guest-console', '--no-prefetch']);
    await waitOnProgress(async () => verifyPasses(agent!.log()).length >= 2, agentProgress(dev.home, agent.log), { what: 'two verify passes' });
    const passes = verifyPasses(agent.log());
    for (const p of passes) expect(p.bad, `pass ${p.pass}`).to.equal(0);
    expect(passes[0].ok).to.equal(4096);
    expect(agent.log()).to.not.contain('LETHE-VERIFY-BAD');
    const st = await control<AgentStatus>(dev.home, { cmd: 'status' });
    expect(st.vm!.faults).to.be.greaterThan(1000);
    expect(st.reads.fromServer).to.be.greaterThan(1000); // nothing was prefetched: pages came on demand
    expect(st.resident.sensitive).to.be.greaterThan(4096 * 4096);
    // QEMU runs under its seccomp filter, with no new privileges; as root, the agent starts it as another user, with no capability.
    const status = fs.readFileSync(`/proc/${st.vm!.pid}/status`, 'utf8');
    const field = (name: string) => new RegExp(`^${name}:\\s*(.*)$`, 'm').exec(status)?.[1];
    expect(field('Seccomp'), 'seccomp filter mode').to.equal('2');
    expect(field('NoNewPrivs')).to.equal('1');
    const [, euid] = field('Uid')!.split(/\s+/).map(Number);
    if (process.getuid!() === 0) {
      expect(euid, 'QEMU is not root').to.not.equal(0);
      expect(field('CapEff')).to.equal('0000000000000000');
    } else {
      expect(euid).to.equal(process.getuid!());
    }
  });

  it("issue #14: the guest console stays out of the agent's log by default (in process it still arrives); the agent's own QEMU gets the disk over NBD, nbdinfo does not", async () => {
    // A device of its own: its cache starts empty, whatever the other tests' sessions left.
    const d = await enrolledDevice(s, 'console');
    await assign(s, d.deviceId, 'vm');
    const logged: string[] = [];
    const consoleLines: string[] = [];
    const a = await startAgent({
      unlock: testUnlock(),
      home: d.home,
      image: 'vm',
      cacheBytes: 1 << 30,
      heartbeatMs: 1_000,
      prefetch: false,
      vm: { accel: 'tcg' },
      log: (l) => logged.push(l),
      onGuestConsole: (l) => consoleLines.push(l),
    });
    try {
      await waitFor(async () => consoleLines.some((l) => /^LETHE-VERIFY pass=\d+ ok=4096 bad=0$/.test(l)) || undefined, 120_000, 'a verify pass on the console');
      expect(logged.filter((l) => /guest: |LETHE-/.test(l))).to.deep.equal([]);
      const st = a.status();
      expect(st.nbd!.connections.active, "QEMU's own NBD connection").to.equal(1);
      expect(logged.join('\n')).to.contain('only the QEMU this agent starts may connect');
      const other = await new Promise<{ pid: number; code: number }>((resolve) => {
        const p = execFile('nbdinfo', ['--size', `nbd+unix:///vm?socket=${path.join(d.home, 'nbd.sock')}`], (err) => resolve({ pid: p.pid!, code: err ? 1 : 0 }));
      });
      expect(other.code, 'nbdinfo was refused').to.equal(1);
      expect(logged.join('\n')).to.contain(`nbd: refused a connection from pid ${other.pid} (uid ${process.getuid!()})`);
      expect(a.status().nbd!.connections.active).to.equal(1);
    } catch (e) {
      console.log(`--- the in-process agent's log:\n${logged.slice(-30).join('\n')}`);
      throw e;
    } finally {
      a.stop();
      await a.done;
      d.close();
    }
  });

  it('SIGTERM stops the agent cleanly: exit 0, QEMU gone, no RAM file left', async () => {
    agent = await startAgentProc(dev.home, 'vm', ['--vm', '--accel', 'tcg', '--no-prefetch']);
    await waitOnProgress(async () => /VM resumed post-copy/.test(agent!.log()), agentProgress(dev.home, agent.log), { what: 'the resume' });
    const qemu = (await control<AgentStatus>(dev.home, { cmd: 'status' })).vm!.pid;
    expect(await agent.stop()).to.equal(0);
    agent = undefined;
    await waitFor(async () => !alive(qemu) || undefined, 10_000, 'QEMU to exit');
    expect(fs.readdirSync('/dev/shm').filter((f) => f.startsWith('lethe-ram-'))).to.deep.equal([]);
  });

  it('kill -9 of the agent takes QEMU with it: the guest never runs on zero-filled pages', async () => {
    agent = await startAgentProc(dev.home, 'vm', ['--vm', '--accel', 'tcg', '--log-guest-console', '--no-prefetch']);
    // Any pass: the guest's first console line after a resume can carry the tail of one written before the snapshot.
    await waitOnProgress(async () => /LETHE-VERIFY pass=\d+ ok=/.test(agent!.log()), agentProgress(dev.home, agent.log), { what: 'a verify pass' });
    const st = await control<AgentStatus>(dev.home, { cmd: 'status' });
    const qemu = st.vm!.pid;
    expect(alive(qemu)).to.equal(true);
    agent.proc.kill('SIGKILL');
    await agent.exited;
    agent = undefined;
    await waitFor(async () => !alive(qemu) || undefined, 10_000, 'QEMU to exit');
    // The guest's RAM file was unlinked once mapped: nothing of it is left in /dev/shm.
    expect(fs.readdirSync('/dev/shm').filter((f) => f.startsWith('lethe-ram-'))).to.deep.equal([]);
  });
});
