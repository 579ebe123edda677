// The Debian 12 guest end to end (docs/debian-guest.md): systemd, the guest driver as
// a package, and a user's ssh-agent and gpg-agent, snapshotted, pushed to a real
// server, resumed post-copy by an agent under QEMU (TCG), hinted, evicted, checked in
// and handed off to a second device.
import { expect } from 'chai';
import { execFileSync, spawnSync } from 'node:child_process';
import fs from 'node:fs';
import path from 'node:path';
import { control } from '../../agent/daemon/control.js';
import type { AgentStatus } from '../../agent/daemon/start.js';
import { AGENTS_CGROUP, GUEST_USER } from '../../guest-driver/debian.js';
import { assign, enrolledDevice, type TestDevice } from '../helpers/fixtures.js';
import { verifyPasses } from '../helpers/guest.js';
import { SUITE_TIMEOUT_MS, agentProgress, waitOnProgress } from '../helpers/progress.js';
import { lethe, startAgentProc, startServer, tmpDir, type AgentProc, type ServerProc } from '../helpers/proc.js';
import { findFd, plantedHits, scanFile } from '../helpers/scan.js';
import { dropSnapshot, pushSnapshot, snapshotDebian, type DebianSnapshot } from '../helpers/vm-image.js';

/** Between the test user's ssh-add -l: several idle times, so the agent's pages leave in between. */
const SSH_EVERY_S = 15;
const IDLE_S = 3;
/** The driver is restarted this often (by systemctl and by SIGKILL, in turn). */
const RESTARTS_S = 20;
const POLICY = [
  'sensitive:',
  '  memory: hinted',
  '  processes: [ssh-agent, gpg-agent]',
  `  cgroups: [${AGENTS_CGROUP}]`,
  '  free-pages: keep',
  'eviction:',
  `  idle: ${IDLE_S}s`,
  'hints:',
  '  interval: 1s',
  '',
].join('\n');

interface SshLine {
  seq: number;
  keys: number;
  marked: number;
}
/** The agents' LETHE-SSH lines (guest-driver/debian/guest/agents-start) in an agent's log. */
const sshLines = (log: string): SshLine[] =>
  [...log.matchAll(/guest: LETHE-SSH seq=(\d+) keys=(\d+) marked=(\d+)/g)].map((m) => ({ seq: Number(m[1]), keys: Number(m[2]), marked: Number(m[3]) }));
/** The driver restarts (guest-driver/debian/guest/restarts-start). */
const restarts = (log: string) => [...log.matchAll(/guest: LETHE-GUESTD-RESTART seq=(\d+) how=(\w+) pid=(\d+)/g)].map((m) => ({ seq: Number(m[1]), how: m[2], pid: Number(m[3]) }));

const status = (d: TestDevice) => control<AgentStatus>(d.home, { cmd: 'status' });
const whileRunning = <T>(a: AgentProc, d: TestDevice, fn: () => Promise<T>, what: string) => waitOnProgress(fn, agentProgress(d.home, a.log), { what });

describe('the Debian 12 guest: systemd, the driver package, ssh-agent (real server, agents and QEMU)', function () {
  this.timeout(SUITE_TIMEOUT_MS);
  this.slow(120_000);
  let s: ServerProc;
  let snap: DebianSnapshot;
  let first: TestDevice;
  let second: TestDevice;
  let a: AgentProc | undefined;
  let b: AgentProc | undefined;
  const devices: TestDevice[] = [];

  before(async () => {
    snap = await snapshotDebian('lethe-debian-snap-', { sshEveryS: SSH_EVERY_S, guestdRestartsS: RESTARTS_S });
    s = await startServer();
    await pushSnapshot(s, snap, 'debian', POLICY);
    dropSnapshot(snap);
    for (const name of ['debian-1', 'debian-2']) {
      const d = await enrolledDevice(s, name);
      await assign(s, d.deviceId, 'debian');
      devices.push(d);
    }
    [first, second] = devices;
  });
  afterEach(function () {
    if (this.currentTest?.state !== 'failed') return;
    for (const x of [a, b]) if (x) console.log(`--- agent log, last lines:\n${x.log().split('\n').slice(-40).join('\n')}`);
  });
  after(async () => {
    for (const x of [a, b]) {
      if (x && x.proc.exitCode === null) {
        x.proc.kill('SIGKILL');
        await x.exited;
      }
    }
    for (const d of devices) d.close();
    await s?.stop();
  });

  it('resumes post-copy: the systemd services carry on with no bad page, and the driver started by udev reports', async () => {
    a = await startAgentProc(first.home, 'debian', ['--vm', '--accel', 'tcg', '--log-guest-console', '--no-prefetch']);
    await whileRunning(a, first, async () => verifyPasses(a!.log()).length >= 2 && sshLines(a!.log()).length >= 1, 'two verify passes and an ssh-add -l');
    for (const p of verifyPasses(a.log())) expect(p.bad, `pass ${p.pass}`).to.equal(0);
    expect(verifyPasses(a.log())[0].ok).to.equal(4096);
    // The agent still holds its key: the same ssh-agent as at the snapshot, its pages brought back on demand.
    for (const l of sshLines(a.log())) expect(l, `ssh-add -l #${l.seq}`).to.include({ keys: 1, marked: 1 });
    const st = await whileRunning(a, first, async () => {
      const now = await status(first);
      return now.vm?.hints.lastReport ? now : undefined;
    }, 'a report from the guest driver');
    expect(st.vm!.hints.connected).to.equal(true);
    // ssh-agent, gpg-agent, and the shell in the agents' cgroup.
    expect(st.vm!.hints.lastReport!.procs).to.be.at.least(3);
    expect(st.vm!.faults).to.be.greaterThan(1000);
  });

  it("memory: hinted evicts only the agents' pages: ssh-agent's key leaves guest RAM when idle and comes back with ssh-add -l", async () => {
    const st = await whileRunning(a!, first, async () => {
      const now = await status(first);
      return now.vm!.eviction.idle > 0 ? now : undefined;
    }, 'idle sensitive pages evicted');
    const ram = findFd(st.vm!.pid, /lethe-ram-.*\(deleted\)$/)!;
    // Gone: at some moment between two ssh-add -l, no copy of the key's comment is in guest RAM.
    const { gone } = await whileRunning(a!, first, async () => (scanFile(ram, snap.sshMarker).length === 0 ? { gone: sshLines(a!.log()).length } : undefined), "ssh-agent's key out of guest RAM");
    // ... while the workload's planted pages, not hinted, stay resident.
    expect(plantedHits(ram, snap.marker).length, "the workload's pages").to.be.greaterThan(0);
    const later = await status(first);
    expect(later.vm!.eviction.free + later.vm!.eviction.budget, 'nothing but idle hinted pages was evicted').to.equal(0);
    expect(later.vm!.residentPages.pages - later.vm!.residentPages.sensitive, 'non-sensitive pages resident').to.be.at.least(4096);

    // Back: the next ssh-add -l lists the key, its comment read from the evicted pages. Catch
    // the key in guest RAM before its pages go idle again (a few tries: the agent may be slow to look).
    let back = false;
    for (let seen = gone; !back && seen < gone + 6; ) {
      const n = seen;
      seen = (await whileRunning(a!, first, async () => (sshLines(a!.log()).length > n ? { now: sshLines(a!.log()).length } : undefined), 'the next ssh-add -l')).now;
      back = scanFile(ram, snap.sshMarker).length > 0;
    }
    expect(back, "ssh-agent's key back in guest RAM after ssh-add -l").to.equal(true);
    for (const l of sshLines(a!.log())) expect(l, `ssh-add -l #${l.seq}`).to.include({ keys: 1, marked: 1 });
    for (const p of verifyPasses(a!.log())) expect(p.bad, `pass ${p.pass}`).to.equal(0);
  });

  it('the driver comes back after systemctl restart and after SIGKILL, says hello again and reports', async () => {
    const before = (await status(first)).vm!.hints;
    await whileRunning(a!, first, async () => restarts(a!.log()).some((r) => r.how === 'kill') && restarts(a!.log()).some((r) => r.how === 'restart'), 'a restart of each kind');
    const st = await whileRunning(a!, first, async () => {
      const now = await status(first);
      return now.vm!.hints.hellos >= before.hellos + 2 && now.vm!.hints.reports > before.reports ? now : undefined;
    }, 'hellos from the restarted driver and a report after');
    const pids = restarts(a!.log()).map((r) => r.pid);
    expect(new Set(pids).size, 'a new driver process each time').to.equal(pids.length);
    expect(st.vm!.hints.connected).to.equal(true);
    expect(st.vm!.hints.brokenReports).to.equal(0);
  });

  it("check-in carries the guest's own disk writes into a new version: the user's file written after the resume, journald's journal", async () => {
    const firstSeq = sshLines(a!.log())[0].seq;
    const r = await lethe(['agent', 'checkin', '--home', first.home, '--json']);
    expect(r.code, r.stderr).to.equal(0);
    const version = (JSON.parse(r.stdout) as { version: number }).version;
    expect(version).to.be.greaterThan(1);
    const pulled = path.join(tmpDir('lethe-debian-pull-'), 'img');
    const p = await lethe(['image', 'pull', `debian@${version}`, '--out', pulled], s.env);
    expect(p.code, p.stderr).to.equal(0);
    const disk = path.join(pulled, 'disk.raw');
    // What a mount would see: ext4's journal replayed (debugfs reads the disk as it lies).
    const fsck = spawnSync('e2fsck', ['-E', 'journal_only', '-y', disk], { encoding: 'utf8' });
    expect(fsck.status, fsck.stdout + fsck.stderr).to.be.at.most(1);
    const debugfs = (cmd: string) => execFileSync('debugfs', ['-R', cmd, disk], { stdio: ['ignore', 'pipe', 'ignore'] }).toString();
    // agents-start writes and syncs each listing's number: one written on this device, after the resume.
    const seq = Number(debugfs(`cat /home/${GUEST_USER.name}/ssh-seq`).trim());
    expect(seq, 'the last listing the disk holds').to.be.at.least(firstSeq);
    // journald keeps its journal under /var/log/journal.
    const ls = debugfs('ls -l -p /var/log/journal');
    const machineDir = /\/\d+\/\d+\/\d+\/\d+\/([0-9a-f]{32})\//.exec(ls)?.[1];
    expect(machineDir, ls).to.be.a('string');
    expect(debugfs(`stat /var/log/journal/${machineDir}/system.journal`)).to.match(/Size: [1-9]\d*/);
    fs.rmSync(path.dirname(pulled), { recursive: true, force: true });
  });

  it('suspends on one device and resumes on another: systemd services still running, the driver reconnects to the new host', async () => {
    const passes = verifyPasses(a!.log());
    const ssh = sshLines(a!.log());
    const r = await lethe(['agent', 'suspend', '--home', first.home, '--json']);
    expect(r.code, r.stderr).to.equal(0);
    const out = JSON.parse(r.stdout) as { version: number };
    expect(await a!.exited).to.equal(0);
    const p = await lethe(['image', 'promote', 'debian', String(out.version)], s.env);
    expect(p.code, p.stderr).to.equal(0);

    b = await startAgentProc(second.home, 'debian', ['--vm', '--accel', 'tcg', '--log-guest-console', '--no-prefetch']);
    await whileRunning(b, second, async () => verifyPasses(b!.log()).length >= 2 && sshLines(b!.log()).length >= 1, 'verify passes and an ssh-add -l on the other device');
    // The same services, not a new boot: the workload's passes and the agents' listings count on.
    expect(verifyPasses(b.log())[0].pass).to.be.greaterThan(passes[passes.length - 1].pass);
    expect(sshLines(b.log())[0].seq).to.be.greaterThan(ssh[ssh.length - 1].seq);
    for (const l of sshLines(b.log())) expect(l).to.include({ keys: 1, marked: 1 });
    for (const v of verifyPasses(b.log())) expect(v.bad, `pass ${v.pass}`).to.equal(0);
    const st = await whileRunning(b, second, async () => {
      const now = await status(second);
      return now.vm?.hints.lastReport ? now : undefined;
    }, 'a report from the driver on the new host');
    expect(st.version).to.equal(out.version);
    expect(st.vm!.hints.lastReport!.procs).to.be.at.least(3);
  });
});
