// How the agent waits before trying again, in one place: a capped exponential pause,
// base · 2^attempt up to a cap. The fetcher, the device client's failover, the lease
// keeper, the push channel (with full jitter: devices must not all come back in step
// after a server restart) and the fault service all pause by it.
import { setTimeout as sleep } from 'node:timers/promises';

export { sleep };

/** The pause before retry number `attempt` (0 for the first retry): base · 2^attempt, capped at `maxMs`. */
export function backoffMs(baseMs: number, maxMs: number, attempt: number): number {
  return Math.min(maxMs, baseMs * 2 ** Math.min(attempt, 30));
}

/** Successive pauses of one retry loop. */
export class Backoff {
  private attempt = 0;

  constructor(
    readonly baseMs: number,
    /** The cap, read at each pause (a renewal's follows its lease's TTL). */
    private readonly maxMs: number | (() => number),
  ) {}

  /** The next pause, counting it. */
  next(): number {
    return backoffMs(this.baseMs, typeof this.maxMs === 'function' ? this.maxMs() : this.maxMs, this.attempt++);
  }

  /** Waits the next pause. */
  wait(): Promise<void> {
    return sleep(this.next());
  }
}
