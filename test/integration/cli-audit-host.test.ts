// `lethe audit host` as a person and a program run it: on this machine, and on a
// /proc and /sys tree with files the checks cannot make sense of. And the figure its
// memlock check rests on, agentLockedBytes(), against what a real agent locks while
// NBD clients read and write its disk as hard as they can.
import { expect } from 'chai';
import { execFile } from 'node:child_process';
import { randomBytes } from 'node:crypto';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { promisify } from 'node:util';
import { control } from '../../agent/daemon/control.js';
import type { AgentStatus } from '../../agent/daemon/start.js';
import { agentLockedBytes } from '../../cli/host-audit/index.js';
import { KEY_SLAB_SLOTS } from '../../common/constants.js';
import { assign, enrolledDevice, pushImage, type TestDevice } from '../helpers/fixtures.js';
import { lethe, ROOT, startAgentProc, startServer, tmpDir, waitFor, type AgentProc, type CliResult, type ServerProc } from '../helpers/proc.js';

const IDS = ['swap', 'core-dumps', 'hibernation', 'ptrace-scope', 'memlock', 'kdump', 'agent-unit'];

/** The real ./lethe wrapper, optionally under another command (prlimit, setpriv). */
function run(wrap: string[], args: string[]): Promise<CliResult> {
  const [cmd, ...rest] = [...wrap, path.join(ROOT, 'lethe'), ...args];
  return new Promise((resolve) => {
    execFile(cmd, rest, { cwd: ROOT }, (err, stdout, stderr) => {
      const code = err ? (typeof err.code === 'number' ? err.code : -1) : 0;
      resolve({ code, stdout, stderr });
    });
  });
}

interface Doc {
  checks: { id: string; status: string; found: string; fix: string }[];
  ok: boolean;
}

function expectShape(doc: Doc): void {
  expect(Object.keys(doc)).to.deep.equal(['checks', 'ok']);
  expect(doc.checks.map((c) => c.id)).to.deep.equal(IDS);
  for (const c of doc.checks) {
    expect(Object.keys(c)).to.deep.equal(['id', 'status', 'found', 'fix']);
    expect(c.status).to.be.oneOf(['ok', 'warn', 'fail']);
    expect(c.found).to.be.a('string').and.not.equal('');
    expect(c.fix === '', `${c.id}: a fix exactly when something needs to change`).to.equal(c.status === 'ok');
  }
  expect(doc.ok).to.equal(doc.checks.every((c) => c.status !== 'fail'));
}

/** A /proc and /sys tree with one file holding garbage and one that cannot be read. */
function brokenHost(): string {
  const root = tmpDir('lethe-host-cli-');
  const files: Record<string, string> = {
    'proc/swaps': 'Filename\t\t\t\tType\t\tSize\t\tUsed\t\tPriority\n',
    'proc/sys/kernel/core_pattern': '|/bin/false\n',
    'proc/sys/fs/suid_dumpable': '0\n',
    'proc/sys/kernel/yama/ptrace_scope': 'garbage\n',
    'proc/self/status': 'CapEff:\t0000000000000000\n',
    'sys/power/state': 'freeze mem\n',
    'sys/kernel/kexec_crash_loaded': '0\n',
  };
  for (const [p, text] of Object.entries(files)) {
    fs.mkdirSync(path.dirname(path.join(root, p)), { recursive: true });
    fs.writeFileSync(path.join(root, p), text);
  }
  fs.mkdirSync(path.join(root, 'proc/self/limits')); // a directory where the kernel has a file
  return root;
}

describe('lethe audit host (CLI)', function () {
  it('on this machine: a stable JSON document, exit 1 exactly when a check fails', async () => {
    const r = await run([], ['audit', 'host', '--json']);
    expect(r.stderr).to.equal('');
    const doc = JSON.parse(r.stdout) as Doc;
    expectShape(doc);
    expect(r.code).to.equal(doc.ok ? 0 : 1);
  });

  it('without CAP_IPC_LOCK and with a 64 KiB locked-memory limit, memlock fails and so does the command', async () => {
    const dropCap = process.getuid?.() === 0 ? ['setpriv', '--bounding-set=-ipc_lock', '--inh-caps=-ipc_lock'] : [];
    const wrap = ['prlimit', '--memlock=65536:65536', ...dropCap];
    const json = await run(wrap, ['audit', 'host', '--json']);
    const doc = JSON.parse(json.stdout) as Doc;
    expectShape(doc);
    expect(doc.checks.find((c) => c.id === 'memlock')).to.deep.include({ status: 'fail' });
    expect([json.code, doc.ok]).to.deep.equal([1, false]);
    const text = await run(wrap, ['audit', 'host']);
    expect(text.code).to.equal(1);
    expect(text.stdout).to.match(/^fail  memlock       the locked-memory limit of this shell is 64 KiB; the agent locks about/m);
    expect(text.stdout).to.match(/^ {20}fix: raise it where the agent starts: LimitMEMLOCK=infinity/m);
    expect(text.stdout).to.match(/^\d+ fail, \d+ warn, \d+ ok\n$/m);
  });

  it('garbage in ptrace_scope and an unreadable limits file: findings that say so, no crash', async () => {
    const root = brokenHost();
    try {
      const r = await lethe(['audit', 'host', '--root', root]);
      expect(r.stderr).to.equal('');
      expect(r.code).to.equal(0);
      expect(r.stdout).to.equal(
        [
          'ok    swap          no swap in use',
          'warn  core-dumps    could not tell: cannot read /proc/self/limits (EISDIR)',
          '                    fix: check by hand: sysctl kernel.core_pattern fs.suid_dumpable; ulimit -c',
          "ok    hibernation   hibernation is not possible (/sys/power/state offers no 'disk')",
          "warn  ptrace-scope  could not tell: /proc/sys/kernel/yama/ptrace_scope holds 'garbage', not one of 0, 1, 2, 3",
          '                    fix: check by hand: sysctl kernel.yama.ptrace_scope',
          'warn  memlock       could not tell: cannot read /proc/self/limits (EISDIR)',
          '                    fix: check by hand: ulimit -l',
          'ok    kdump         no crash kernel is loaded',
          `warn  agent-unit    no lethe-agent unit is installed (looked in ${path.join(os.homedir(), '.config/systemd/user')}, /etc/systemd/user, /usr/lib/systemd/user, /etc/systemd/system, /usr/lib/systemd/system): an agent started from a shell has none of its limits`,
          '                    fix: cp agent/lethe-agent.service ~/.config/systemd/user/lethe-agent@.service && systemctl --user daemon-reload (then run the agent as lethe-agent@IMAGE)',
          '0 fail, 4 warn, 3 ok',
          '',
        ].join('\n'),
      );
      const j = await lethe(['audit', 'host', '--root', root, '--json']);
      const doc = JSON.parse(j.stdout) as Doc;
      expectShape(doc);
      expect(doc.checks[3]).to.deep.equal({
        id: 'ptrace-scope',
        status: 'warn',
        found: "could not tell: /proc/sys/kernel/yama/ptrace_scope holds 'garbage', not one of 0, 1, 2, 3",
        fix: 'check by hand: sysctl kernel.yama.ptrace_scope',
      });
    } finally {
      fs.rmSync(root, { recursive: true, force: true });
    }
  });
});

/** The process's locked memory now, from VmLck in /proc/PID/status (in kB there). */
function vmLck(pid: number): number {
  const m = /^VmLck:\s+(\d+) kB$/m.exec(fs.readFileSync(`/proc/${pid}/status`, 'utf8'));
  if (!m) throw new Error(`no VmLck in /proc/${pid}/status`);
  return Number(m[1]) * 1024;
}

describe("the agent's locked memory (real server, agent and NBD clients)", function () {
  this.timeout(120_000);
  const MiB = 1024 * 1024;
  let s: ServerProc;
  let dev: TestDevice;
  let agent: AgentProc;
  const uri = () => `nbd+unix:///locked?socket=${path.join(dev.home, 'nbd.sock')}`;

  before(async () => {
    s = await startServer();
    await pushImage(s, 'locked', { plain: { disk: randomBytes(16 * MiB), mem: Buffer.alloc(0), state: Buffer.alloc(0) } });
    dev = await enrolledDevice(s);
    await assign(s, dev.deviceId, 'locked');
    agent = await startAgentProc(dev.home, 'locked', ['--no-prefetch', '--nbd-peers', 'user']);
    await waitFor(async () => (await control<AgentStatus>(dev.home, { cmd: 'status' })).nbd?.address ?? undefined, 20_000, 'the export');
  });
  after(async () => {
    await agent?.stop();
    dev?.close();
    await s?.stop();
  });

  it('stays within agentLockedBytes() while clients outrun its reply buffers', async () => {
    const pid = agent.proc.pid!;
    const dir = tmpDir();
    const payload = path.join(dir, 'payload.raw');
    fs.writeFileSync(payload, randomBytes(8 * MiB));
    // Three nbdcopy runs, each over 4 connections with 64 requests of 256 KiB in flight:
    // far more than the pooled reply buffers, so reads and write payloads lock their own.
    const run = promisify(execFile);
    let done = false;
    const copies = Promise.all([run('nbdcopy', [uri(), 'null:']), run('nbdcopy', [uri(), 'null:']), run('nbdcopy', [payload, uri()])]).finally(() => (done = true));
    let peak = vmLck(pid);
    while (!done) {
      peak = Math.max(peak, vmLck(pid));
      await new Promise((r) => setTimeout(r, 5));
    }
    await copies;
    peak = Math.max(peak, vmLck(pid));
    fs.rmSync(dir, { recursive: true, force: true });
    // The bound for the key ring the agent grew to, not the full one, which would leave
    // room enough to hide any excess of the disk buffers.
    const { keys } = await control<AgentStatus>(dev.home, { cmd: 'status' });
    expect(keys.classKeys + keys.sensitiveKeys, 'the keys fit one key-ring slab').to.be.below(KEY_SLAB_SLOTS);
    const { atMost } = agentLockedBytes(KEY_SLAB_SLOTS);
    expect(peak, 'the agent locked nothing: the check would mean nothing').to.be.greaterThan(0);
    expect(peak, `VmLck peaked at ${peak} bytes; agentLockedBytes(${KEY_SLAB_SLOTS}).atMost is ${atMost}`).to.be.at.most(atMost);
  });

  it("--pid reads that agent's limits, not this shell's", async () => {
    const pid = agent.proc.pid!;
    const r = await lethe(['audit', 'host', '--pid', String(pid), '--json']);
    const doc = JSON.parse(r.stdout) as Doc;
    expectShape(doc);
    const memlock = doc.checks.find((c) => c.id === 'memlock')!;
    expect(memlock.found).to.match(new RegExp(`^(process ${pid} has CAP_IPC_LOCK|the locked-memory limit of process ${pid} is )`));
    expect(memlock.found).not.to.include("the agent's may differ");
  });
});
