// Nested holds on a guest's vCPUs (the lease, an eviction pass, a suspend): the
// first hold stops them, every hold waits for that same stop, and the guest runs
// again when the last hold goes. QMP 'stop' and 'cont' go out in order.

export interface VcpuControl {
  /**
   * QMP 'stop' / 'cont'. QEMU answers 'stop' only once in-flight block I/O has
   * drained, so a hold knows no disk read will still land in guest RAM.
   */
  execute(cmd: 'stop' | 'cont'): Promise<unknown>;
  /**
   * Whether a vCPU is blocked in a fault being served: it keeps 'stop' from returning,
   * and stays blocked while an eviction batch runs (the fault service holds vCPU faults
   * back until then). Another thread's fault does not count: 'stop' waits for it.
   */
  faultInFlight(): boolean;
  /** Whether QEMU is gone (nothing to continue). */
  exited(): boolean;
  /** Told every STOP_REPORT_MS that 'stop' is still unanswered with no vCPU in a fault. */
  stopSlow?(waitedMs: number, reasons: string[]): void;
}

/** How often a 'stop' that no fault explains is reported while it is waited for. */
export const STOP_REPORT_MS = 5_000;

/**
 * How long a hold waits for 'stop' before going on when a fault is in flight. A vCPU
 * blocked in a fault the server must answer (offline) keeps 'stop' from returning
 * while the others pause at once; the evictor keeps faults from resolving while it
 * works, so the blocked vCPU stays blocked.
 */
export const HOLD_WAIT_MS = 1_000;

export class VcpuHolds {
  private readonly holds = new Map<string, number>();
  /** The stop every current hold waits for. */
  private stopping?: Promise<void>;
  private order: Promise<unknown> = Promise.resolve();

  constructor(private readonly vcpus: VcpuControl) {}

  /** Resolves once the vCPUs are stopped, with the release; throws (holding nothing) if 'stop' fails. */
  async hold(reason: string): Promise<() => Promise<void>> {
    this.holds.set(reason, (this.holds.get(reason) ?? 0) + 1);
    if (this.count() === 1) this.stopping = this.stop();
    try {
      await this.stopping;
    } catch (e) {
      this.unhold(reason);
      throw e;
    }
    let released = false;
    return async () => {
      if (released) return;
      released = true;
      this.unhold(reason);
      if (this.count() === 0 && !this.vcpus.exited()) await this.inOrder('cont');
    };
  }

  /** Why the guest is held, if it is. */
  reasons(): string[] {
    return [...this.holds.keys()];
  }

  private unhold(reason: string): void {
    const left = (this.holds.get(reason) ?? 1) - 1;
    if (left === 0) this.holds.delete(reason);
    else this.holds.set(reason, left);
    if (this.count() === 0) this.stopping = undefined;
  }

  private count(): number {
    let n = 0;
    for (const v of this.holds.values()) n += v;
    return n;
  }

  /** 'stop', waited for; with a fault in flight, at most HOLD_WAIT_MS. */
  private async stop(): Promise<void> {
    const stopped = this.inOrder('stop').then(() => true);
    const t0 = Date.now();
    let reported = t0;
    for (;;) {
      let timer: NodeJS.Timeout | undefined;
      const waited = new Promise<boolean>((r) => (timer = setTimeout(() => r(false), HOLD_WAIT_MS)));
      const done = await Promise.race([stopped, waited]);
      clearTimeout(timer);
      if (done || this.vcpus.faultInFlight()) return;
      if (Date.now() - reported >= STOP_REPORT_MS) {
        reported = Date.now();
        this.vcpus.stopSlow?.(reported - t0, this.reasons());
      }
    }
  }

  private inOrder(cmd: 'stop' | 'cont'): Promise<unknown> {
    const run = this.order.then(() => this.vcpus.execute(cmd));
    this.order = run.catch(() => {});
    return run;
  }
}
