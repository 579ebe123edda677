// A child process read as lines of its stdout, for the tests that drive a C program
// (fault-client) command by command.
import { spawn, type ChildProcess } from 'node:child_process';
import { EventEmitter } from 'node:events';
import { createInterface } from 'node:readline';

export interface Exit {
  code: number | null;
  signal: NodeJS.Signals | null;
}

/** A child process read as lines; next() consumes them in order. */
export class Lines extends EventEmitter {
  readonly proc: ChildProcess;
  readonly exited: Promise<Exit>;
  readonly lines: string[] = [];
  stderr = '';
  private cursor = 0;

  constructor(cmd: string, args: string[], env: Record<string, string> = {}) {
    super();
    this.proc = spawn(cmd, args, { env: { ...process.env, ...env }, stdio: ['pipe', 'pipe', 'pipe'] });
    createInterface({ input: this.proc.stdout! }).on('line', (l) => {
      this.lines.push(l);
      this.emit('change');
    });
    this.proc.stderr!.on('data', (d) => (this.stderr += d));
    this.exited = new Promise((resolve) => this.proc.once('close', (code, signal) => resolve({ code, signal })));
    void this.exited.then(() => this.emit('change'));
  }

  /** The next stdout line matching `re`, skipping the lines before it. */
  async next(re: RegExp, timeoutMs = 10_000): Promise<RegExpExecArray> {
    const deadline = Date.now() + timeoutMs;
    for (;;) {
      for (; this.cursor < this.lines.length; this.cursor++) {
        const m = re.exec(this.lines[this.cursor]);
        if (m) {
          this.cursor++;
          return m;
        }
      }
      if (this.proc.exitCode !== null || this.proc.signalCode !== null || Date.now() > deadline) {
        throw new Error(`no line matching ${re}; stdout:\n${this.lines.join('\n')}\nstderr:\n${this.stderr}`);
      }
      await this.changeOrDeadline(deadline);
    }
  }

  /** Resolves at the next line or exit, or at `deadline`; no timer is left behind (it held the test process up to a minute). */
  private changeOrDeadline(deadline: number): Promise<void> {
    return new Promise((resolve) => {
      const done = () => {
        clearTimeout(timer);
        this.off('change', done);
        resolve();
      };
      const timer = setTimeout(done, Math.max(1, deadline - Date.now()));
      this.once('change', done);
    });
  }

  send(line: string): void {
    this.proc.stdin!.write(`${line}\n`);
  }

  end(): void {
    this.proc.stdin!.end();
  }

  kill(): void {
    if (this.proc.exitCode === null && this.proc.signalCode === null) this.proc.kill('SIGKILL');
  }
}

