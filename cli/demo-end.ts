// How `lethe demo` ends, whatever ends it. SIGINT, SIGTERM and SIGHUP (any of them,
// in any order, any number of times) and its output going away (EPIPE on stdout or
// stderr: `lethe demo | tee log` whose tee died of the same Ctrl-C) each stop what
// runs, and the demo's directories go once the processes writing into them have
// ended. Until then nothing may end the process early: Node throws an 'error' on a
// closed stdout that nobody handles, and a signal without a handler kills. Should
// the process end anyway, its 'exit' removes the directories.
import type { ChildProcess } from 'node:child_process';
import fs from 'node:fs';
import os from 'node:os';

const SIGNALS: NodeJS.Signals[] = ['SIGINT', 'SIGTERM', 'SIGHUP'];
/** How long a child has after SIGTERM (the server writes its last audit checkpoint) before SIGKILL. */
const CHILD_EXIT_MS = 10_000;
const OUTPUT_CLOSED = 'output closed';

const running = (p: ChildProcess) => p.exitCode === null && p.signalCode === null;

export class DemoEnd {
  /** Why the demo is stopping: a signal's name or 'output closed'; undefined while it runs. */
  reason?: string;
  private readonly children = new Set<ChildProcess>();
  private readonly stoppers: (() => void)[] = [];
  private hurry = false;
  private cleaned = false;

  /**
   * @param remove directories removed at the end, once every child has exited
   * @param say prints a line for people (it may hit a closed stderr: that is handled)
   */
  constructor(
    private readonly remove: string[],
    private readonly say: (line: string) => void,
  ) {}

  /** Call before the demo makes anything that must not outlive it. */
  start(): void {
    for (const s of SIGNALS) process.on(s, this.onSignal);
    process.stdout.on('error', this.onOutputError);
    process.stderr.on('error', this.onOutputError);
    process.on('exit', this.lastResort);
  }

  /** A child process of the demo: stopped with the demo, awaited before the directories go. */
  track(p: ChildProcess): void {
    this.children.add(p);
    p.once('exit', () => this.children.delete(p));
    if (this.reason) p.kill('SIGTERM');
  }

  /** `fn` runs when the demo stops (at once if it has). */
  onStop(fn: () => void): void {
    if (this.reason) fn();
    else this.stoppers.push(fn);
  }

  get stopped(): boolean {
    return this.reason !== undefined;
  }

  /** Exit status for a demo stopped before its agent ran: 128 + the signal as a shell reports it (SIGPIPE for a closed output). */
  exitCode(): number {
    const signal = this.reason === OUTPUT_CLOSED ? 'SIGPIPE' : (this.reason as NodeJS.Signals);
    return 128 + (os.constants.signals[signal] ?? 0);
  }

  /**
   * Stops every child (SIGKILL after CHILD_EXIT_MS), then removes the directories.
   * A signal during it hurries the children; one after it ends the process at once.
   */
  async cleanup(): Promise<void> {
    await Promise.all([...this.children].map((p) => this.ended(p)));
    for (const d of this.remove) fs.rmSync(d, { recursive: true, force: true });
    this.cleaned = true;
    process.off('exit', this.lastResort);
    // The output error handlers stay: the CLI may still write its last error to a closed pipe.
  }

  private stop(reason: string): void {
    if (this.reason) {
      if (reason !== OUTPUT_CLOSED && !this.hurry) this.hurryUp();
      return;
    }
    this.reason = reason;
    this.say(`stopping (${reason})`);
    for (const p of this.children) p.kill('SIGTERM');
    for (const fn of this.stoppers.splice(0)) fn();
  }

  private hurryUp(): void {
    this.hurry = true;
    for (const p of this.children) p.kill('SIGKILL');
  }

  private async ended(p: ChildProcess): Promise<void> {
    if (!running(p)) return;
    const exited = new Promise((r) => p.once('exit', r));
    p.kill(this.hurry ? 'SIGKILL' : 'SIGTERM');
    const timer = setTimeout(() => p.kill('SIGKILL'), CHILD_EXIT_MS);
    await exited;
    clearTimeout(timer);
  }

  /** After the cleanup nothing is left to do: the process ends with the status it had (a signal without a handler would make it the signal's). */
  private readonly onSignal = (signal: NodeJS.Signals) => {
    if (this.cleaned) process.exit(process.exitCode ?? 128 + (os.constants.signals[signal] ?? 0));
    this.stop(signal);
  };

  /** EPIPE and the like: nobody reads the demo any more, so it stops as SIGPIPE would have it. */
  private readonly onOutputError = () => this.stop(OUTPUT_CLOSED);

  /** The process is ending before cleanup() finished: no await is possible here, so kill and remove. */
  private readonly lastResort = () => {
    if (this.cleaned) return;
    for (const p of this.children) p.kill('SIGKILL');
    for (const d of this.remove) fs.rmSync(d, { recursive: true, force: true });
  };
}
