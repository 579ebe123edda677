// Issue #22: `./lethe demo | tee demo.log` stopped with Ctrl-C left its whole data
// dir in /tmp, the server's master and signing keys included: its next write went
// to the closed pipe (EPIPE) and the unhandled error ended it before its cleanup.
// A real `lethe demo` writes into a reader that exits, like tee; it is stopped in
// its set-up while its real server runs (before any guest), and its own cleanup
// must leave neither directory nor process behind.
import { expect } from 'chai';
import { spawn, type ChildProcess } from 'node:child_process';
import fs from 'node:fs';
import path from 'node:path';
import { createInterface } from 'node:readline';
import { ROOT } from '../helpers/proc.js';

const MAIN = path.join(ROOT, 'cli', 'main.ts');
const WORKING_RE = /^lethe demo: working in (\S+) \(the plaintext snapshot in (\S+)\)$/;
const LISTENING_RE = /^lethe demo: server listening at /;

interface DemoRun {
  demo: ChildProcess;
  reader: ChildProcess;
  /** What the reader printed, line by line. */
  lines: string[];
  /** Resolves with the first line matching `re`. */
  line(re: RegExp): Promise<RegExpExecArray>;
  exited: Promise<{ code: number | null; signal: NodeJS.Signals | null }>;
}

/** Live (not zombie) processes of a process group, from /proc. */
function groupMembers(pgid: number): number[] {
  const pids: number[] = [];
  for (const d of fs.readdirSync('/proc')) {
    if (!/^\d+$/.test(d)) continue;
    let stat: string;
    try {
      stat = fs.readFileSync(`/proc/${d}/stat`, 'utf8');
    } catch {
      continue; // gone meanwhile
    }
    const [state, , pgrp] = stat.slice(stat.lastIndexOf(')') + 2).split(' ');
    if (Number(pgrp) === pgid && state !== 'Z') pids.push(Number(d));
  }
  return pids;
}

/**
 * `lethe demo 2>&1 | READER`: the demo leads a process group of its own (its server and
 * other children join it), as a shell's job would; the reader stands outside it.
 */
function demoInto(reader: string[]): DemoRun {
  const r = spawn(reader[0], reader.slice(1), { stdio: ['pipe', 'pipe', 'ignore'] });
  const demo = spawn(process.execPath, ['--import', 'tsx', MAIN, 'demo', '--accel', 'tcg'], {
    cwd: ROOT,
    detached: true,
    stdio: ['ignore', r.stdin!, r.stdin!],
  });
  r.stdin!.destroy(); // only the demo writes into the pipe
  const lines: string[] = [];
  const waiting: { re: RegExp; resolve: (m: RegExpExecArray) => void }[] = [];
  createInterface({ input: r.stdout! }).on('line', (l) => {
    lines.push(l);
    for (const w of waiting) {
      const m = w.re.exec(l);
      if (m) w.resolve(m);
    }
  });
  const exited = new Promise<{ code: number | null; signal: NodeJS.Signals | null }>((resolve) => demo.once('exit', (code, signal) => resolve({ code, signal })));
  return {
    demo,
    reader: r,
    lines,
    line: (re) =>
      new Promise((resolve, reject) => {
        const seen = lines.map((l) => re.exec(l)).find(Boolean);
        if (seen) return resolve(seen);
        waiting.push({ re, resolve });
        void exited.then(() => reject(new Error(`the demo exited before printing ${re}; it printed:\n${lines.join('\n')}`)));
      }),
    exited,
  };
}

describe('lethe demo: its cleanup survives a closed output and any signals (issue #22)', function () {
  this.timeout(300_000);
  const runs: DemoRun[] = [];
  const dirs: string[] = [];

  /** The demo's two directories, from its first line. */
  const demoDirs = async (run: DemoRun) => {
    const m = await run.line(WORKING_RE);
    dirs.push(m[1], m[2]);
    expect(fs.existsSync(m[1]), 'the demo directory exists while it runs').to.equal(true);
    return [m[1], m[2]];
  };

  const expectNothingLeft = async (run: DemoRun, made: string[]) => {
    const pgid = run.demo.pid!;
    // The demo waits for its children; a moment for the kernel to finish their exit.
    for (let i = 0; i < 50 && groupMembers(pgid).length > 0; i++) await new Promise((r) => setTimeout(r, 100));
    expect(groupMembers(pgid), "the demo's processes").to.deep.equal([]);
    expect(made.filter((d) => fs.existsSync(d)), 'directories left behind').to.deep.equal([]);
  };

  after(() => {
    // Whatever a failed run left: its processes and its directories.
    for (const run of runs) {
      for (const p of groupMembers(run.demo.pid!)) process.kill(p, 'SIGKILL');
      run.reader.kill('SIGKILL');
    }
    for (const d of dirs) fs.rmSync(d, { recursive: true, force: true });
  });

  it('its reader exits while the server runs (EPIPE, no signal): the demo stops, its server with it, and removes both directories', async () => {
    const run = demoInto(['head', '-n', '2']);
    runs.push(run);
    const made = await demoDirs(run);
    await run.line(LISTENING_RE);
    // head has exited: the demo's next line meets a closed pipe.
    const end = await run.exited;
    expect(end, 'stopped for its closed output (128 + SIGPIPE), not killed by the error').to.deep.equal({ code: 141, signal: null });
    await expectNothingLeft(run, made);
  });

  it("Ctrl-C's SIGINT with SIGHUP and SIGTERM in its set-up, its reader gone with them: no directory or process is left", async () => {
    const run = demoInto(['cat']);
    runs.push(run);
    const made = await demoDirs(run);
    await run.line(LISTENING_RE);
    // The terminal's job gets the signals: tee dies of the first, the demo's server too,
    // and the demo writes on into a pipe nobody reads.
    run.reader.kill('SIGHUP');
    for (const s of ['SIGHUP', 'SIGINT', 'SIGTERM'] as const) {
      // A quick cleanup may have ended the whole group before the later signals.
      try {
        process.kill(-run.demo.pid!, s);
      } catch (e) {
        if ((e as NodeJS.ErrnoException).code !== 'ESRCH') throw e;
        break;
      }
      await new Promise((r) => setTimeout(r, 50));
    }
    const end = await run.exited;
    // It ends with the first signal's status (128 + SIGHUP); a later signal may still
    // meet Node's own teardown once the cleanup is done, and end it by default.
    if (end.signal === null) expect(end.code, 'the status of the first signal').to.equal(129);
    else expect(end.signal, 'the first signal did not end it before its cleanup').to.be.oneOf(['SIGINT', 'SIGTERM']);
    await expectNothingLeft(run, made);
  });
});
