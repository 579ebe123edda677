// `lethe audit host` as a person and a program run it: on this machine, and on a
// /proc and /sys tree with files the checks cannot make sense of.
import { expect } from 'chai';
import { execFile } from 'node:child_process';
import fs from 'node:fs';
import path from 'node:path';
import { lethe, ROOT, tmpDir, type CliResult } from '../helpers/proc.js';

const IDS = ['swap', 'core-dumps', 'hibernation', 'ptrace-scope', 'memlock', 'kdump'];

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
          '0 fail, 3 warn, 3 ok',
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

  it('a --pid that is not a running process is a usage error with a hint', async () => {
    const bad = await lethe(['audit', 'host', '--pid', 'agent']);
    expect([bad.code, bad.stdout, bad.stderr]).to.deep.equal([
      2,
      '',
      "lethe: error: bad --pid: 'agent'\nlethe: hint: give the process id of a running agent, e.g. from pgrep -f 'lethe agent'\n",
    ]);
    const gone = await lethe(['audit', 'host', '--pid', '4194305', '--json']);
    expect(gone.code).to.equal(2);
    expect(JSON.parse(gone.stdout)).to.deep.equal({
      error: { code: 'BAD_REQUEST', message: 'no process 4194305', hint: "give the process id of a running agent, e.g. from pgrep -f 'lethe agent'" },
    });
  });
});
