// Waiting on progress, not on speed: a guest under TCG on a busy machine can take
// many times longer than on an idle one, so a wait fails when the work it waits on
// stops moving for a while, with only a generous bound on the whole.
import fs from 'node:fs';
import { control } from '../../agent/daemon/control.js';
import type { AgentStatus } from '../../agent/daemon/start.js';
import type { Vm } from '../../agent/vm/qemu.js';

export interface ProgressOpts {
  /** What is awaited, for the failure message. */
  what: string;
  /** Fails when progress() has returned the same value for this long. */
  stallMs?: number;
  /** Fails after this long even while progress() keeps changing: a bound on a run gone wrong, not on speed. */
  maxMs?: number;
  pollMs?: number;
}

export const STALL_MS = 60_000;
export const MAX_MS = 10 * 60_000;
/** A mocha timeout for suites made of such waits: they fail first, with their own messages. */
export const SUITE_TIMEOUT_MS = 3 * MAX_MS;

type Progress = () => unknown;

/** Tracks a progress value; stalled() names how the wait failed, or undefined while it may go on. */
class Watch {
  private last = '';
  private lastChange = Date.now();
  private readonly t0 = Date.now();
  private readonly stallMs: number;
  private readonly maxMs: number;

  constructor(private readonly o: ProgressOpts) {
    this.stallMs = o.stallMs ?? STALL_MS;
    this.maxMs = o.maxMs ?? MAX_MS;
  }

  async stalled(progress: Progress): Promise<string | undefined> {
    let now: string;
    try {
      now = JSON.stringify(await progress());
    } catch (e) {
      now = `unreadable: ${String(e)}`;
    }
    const t = Date.now();
    if (now !== this.last) [this.last, this.lastChange] = [now, t];
    if (t - this.lastChange > this.stallMs) return `no progress for ${Math.round(this.stallMs / 1000)} s waiting for ${this.o.what} (progress stayed at ${this.last})`;
    if (t - this.t0 > this.maxMs) return `still waiting for ${this.o.what} after ${Math.round(this.maxMs / 1000)} s, though progressing (at ${this.last})`;
    return undefined;
  }
}

/** Polls `fn` until it returns a truthy value; throws when `progress()` stalls (see ProgressOpts). */
export async function waitOnProgress<T>(fn: () => Promise<T>, progress: Progress, o: ProgressOpts): Promise<NonNullable<T>> {
  const watch = new Watch(o);
  let lastError: unknown;
  for (;;) {
    try {
      const v = await fn();
      if (v) return v as NonNullable<T>;
    } catch (e) {
      lastError = e;
    }
    const stalled = await watch.stalled(progress);
    if (stalled) throw new Error(`${stalled}${lastError ? `: ${String(lastError)}` : ''}`);
    await new Promise((r) => setTimeout(r, o.pollMs ?? 200));
  }
}

/**
 * Settles as `work` does, or rejects when `progress()` stalls first (see ProgressOpts).
 * `work` should end by itself once the test ends (e.g. a wait on a VM the test kills).
 */
export function whileProgressing<T>(work: Promise<T>, progress: Progress, o: ProgressOpts): Promise<T> {
  const watch = new Watch(o);
  return new Promise<T>((resolve, reject) => {
    let timer: NodeJS.Timeout | undefined;
    let settled = false;
    const settle = (f: () => void) => {
      settled = true;
      clearTimeout(timer);
      f();
    };
    const tick = async () => {
      const stalled = await watch.stalled(progress);
      if (settled) return;
      if (stalled) settle(() => reject(new Error(stalled)));
      else timer = setTimeout(() => void tick(), o.pollMs ?? 500);
    };
    work.then(
      (v) => settle(() => resolve(v)),
      (e: unknown) => settle(() => reject(e)),
    );
    void tick();
  });
}

/** An agent running a VM: its log grows, the guest faults pages in and the evictor takes them out. */
export function agentProgress(home: string, log: () => string): Progress {
  return async () => {
    const st = await control<AgentStatus>(home, { cmd: 'status' }, 10_000).catch(() => undefined);
    return [log().length, st?.vm?.faults, st?.vm?.eviction.evicted, st?.fetch.bytes];
  };
}

/**
 * A guest without an agent: it prints on its console, and touches RAM it never
 * touched before as it boots, fills its workload and reads its disk.
 */
export function vmProgress(vm: Vm, ramPath: string): Progress {
  let lines = 0;
  vm.onConsoleLine(() => lines++);
  return () => [lines, fs.statSync(ramPath, { throwIfNoEntry: false })?.blocks];
}

/** vm.waitForConsole that fails when the guest stops making progress (vmProgress), not after a fixed time. */
export function consoleLine(vm: Vm, ramPath: string, re: RegExp, what: string): Promise<RegExpExecArray> {
  return whileProgressing(vm.waitForConsole(re, MAX_MS, what), vmProgress(vm, ramPath), { what });
}
