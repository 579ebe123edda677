// A link that drops in the middle of a session (issue #18): the agent reaches the
// server through the link emulator (test/helpers/link.ts), with no startup buffer
// and no background prefetch, so every page the resumed guest touches first comes
// from the server on demand. The link goes away for 30 s as soon as the guest runs:
// the guest waits on the pages it needs, and carries on, in the same QEMU and on
// the same lease, once the link is back; no page is wrong.
import { expect } from 'chai';
import fs from 'node:fs';
import path from 'node:path';
import { control } from '../../agent/daemon/control.js';
import type { AgentStatus } from '../../agent/daemon/start.js';
import { assign, enrolledDevice, type TestDevice } from '../helpers/fixtures.js';
import { verifyPasses } from '../helpers/guest.js';
import { Link } from '../helpers/link.js';
import { startAgentProc, startServer, type AgentProc, type ServerProc } from '../helpers/proc.js';
import { SUITE_TIMEOUT_MS, agentProgress, waitOnProgress } from '../helpers/progress.js';
import { dropSnapshot, pushSnapshot, snapshotGuest } from '../helpers/vm-image.js';

const OUTAGE_MS = 30_000;

describe('a link outage in the middle of a session (real server behind a link emulator, agent and QEMU)', function () {
  this.timeout(SUITE_TIMEOUT_MS);
  this.slow(120_000);
  let s: ServerProc;
  let link: Link;
  let d: TestDevice;
  let a: AgentProc | undefined;

  before(async () => {
    const snap = await snapshotGuest('lethe-outage-', { intervalS: 2 });
    s = await startServer();
    await pushSnapshot(s, snap, 'vm', 'sensitive:\n  memory: none\nprefetch:\n  startup: 0\n  order: none\n');
    dropSnapshot(snap);
    link = await Link.start({ port: Number(new URL(s.url).port) }, { delayMs: 10 });
    d = await enrolledDevice(s, 'behind-a-link');
    await assign(s, d.deviceId, 'vm');
    // From now on the device reaches the server only through the link, as a laptop on Wi-Fi would.
    const info = path.join(d.home, 'device.json');
    fs.writeFileSync(info, JSON.stringify({ ...JSON.parse(fs.readFileSync(info, 'utf8')), server: link.via(s.url) }, null, 2) + '\n');
  });
  afterEach(function () {
    if (a && this.currentTest?.state === 'failed') console.log(`--- the agent's log, last lines:\n${a.log().split('\n').slice(-40).join('\n')}`);
  });
  after(async () => {
    if (a && a.proc.exitCode === null) {
      a.proc.kill('SIGKILL');
      await a.exited;
    }
    d?.close();
    await link?.close();
    await s?.stop();
  });

  it('the guest waits on the pages it needs while the link is down, and goes on in the same QEMU once it is back', async () => {
    a = await startAgentProc(d.home, 'vm', ['--vm', '--accel', 'tcg', '--log-guest-console']);
    const status = () => control<AgentStatus>(d.home, { cmd: 'status' });
    const progress = agentProgress(d.home, a.log);
    // The guest runs with none of its pages: each first touch needs the server.
    await waitOnProgress(async () => /VM resumed post-copy/.test(a!.log()), progress, { what: 'the resume' });
    const before = await status();
    const qemu = before.vm!.pid;
    link.drop(OUTAGE_MS, 'stall');
    const down = Date.now();
    // The agent's own wait: nothing to assert on its progress while the link is down.
    await new Promise((r) => setTimeout(r, OUTAGE_MS));
    const passesAtReturn = verifyPasses(a.log()).length;

    await waitOnProgress(async () => verifyPasses(a!.log()).length >= passesAtReturn + 2, progress, { what: 'two verify passes after the link came back' });
    expect(passesAtReturn, 'verify passes while the link was down: the workload needs pages it did not have').to.equal(0);
    const after = await status();
    expect(after.vm!.pid, 'the same QEMU: no restart').to.equal(qemu);
    expect(a.proc.exitCode, 'the agent still runs').to.equal(null);
    expect(after.lease.state, 'the lease outlived the outage').to.equal('active');
    for (const p of verifyPasses(a.log())) expect(p.bad, `pass ${p.pass}`).to.equal(0);
    // The guest did wait on the link: a fault that went to the server waited through most of the outage.
    expect(after.vm!.faultWait.serverMs - before.vm!.faultWait.serverMs, 'ms the guest waited on the server').to.be.at.least(OUTAGE_MS / 2);
    expect(Date.now() - down).to.be.at.least(OUTAGE_MS);
  });
});
