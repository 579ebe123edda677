// Fetching from the server: demand requests go out at once on their own
// connection (as QEMU's postcopy-preempt channel does) and are coalesced
// within one event-loop turn into a batch; prefetch uses another connection
// and waits while any demand request is outstanding. Transient failures
// (server unreachable, 5xx, rate limited) are retried with capped exponential backoff: for
// 30 s, and demand requests no later than the lease's eviction point.
import { setTimeout as sleep } from 'node:timers/promises';
import { backoffMs } from './backoff.js';
import type { ChunkKind } from '../../common/constants.js';
import { LetheError } from '../../common/errors.js';
import { MAX_BATCH } from '../../common/constants.js';
import type { DeviceClient } from './device-client.js';

export interface ChunkRef {
  kind: ChunkKind;
  index: number;
}

const RETRY_BASE_MS = 50;
const RETRY_MAX_MS = 2000;

export function isTransient(e: unknown): boolean {
  return e instanceof LetheError && (e.code === 'SERVER_UNREACHABLE' || e.code === 'RATE_LIMITED' || e.status >= 500 || e.status === 0);
}

/** Runs `fn` until it succeeds, a permanent error, or `deadlineMs` passes (then the last error). */
export async function withRetry<T>(fn: () => Promise<T>, deadlineMs: number, onRetry?: (e: unknown) => void): Promise<T> {
  for (let attempt = 0; ; attempt++) {
    try {
      return await fn();
    } catch (e) {
      if (!isTransient(e) || Date.now() >= deadlineMs) throw e;
      onRetry?.(e);
      await sleep(Math.min(backoffMs(RETRY_BASE_MS, RETRY_MAX_MS, attempt), Math.max(0, deadlineMs - Date.now())));
    }
  }
}

interface Waiter {
  ref: ChunkRef;
  resolve: (b: Buffer) => void;
  reject: (e: unknown) => void;
}

export class Fetcher {
  private queue: Waiter[] = [];
  private scheduled = false;
  private urgentInFlight = 0;
  private idle?: Promise<void>;
  private idleResolve?: () => void;
  readonly stats = { demandBatches: 0, demandChunks: 0, prefetchBatches: 0, prefetchChunks: 0, retries: 0, bytes: 0 };

  /**
   * @param giveUpBy when demand requests stop retrying (ms since the epoch): the
   *   lease's eviction point. A guest disk read waiting on a server that is down holds
   *   QEMU's 'stop', and with it the eviction before expiry, until the read is answered.
   */
  constructor(
    private readonly urgent: DeviceClient,
    private readonly background: DeviceClient,
    private readonly leaseId: () => string,
    private readonly giveUpBy: () => number = () => Infinity,
    private readonly retryWindowMs = 30_000,
  ) {}

  /** Until when a demand request retries. */
  private demandDeadline(): number {
    return Math.min(Date.now() + this.retryWindowMs, this.giveUpBy());
  }

  /** One chunk, on the demand connection; concurrent calls in one turn share a request. */
  demand(ref: ChunkRef): Promise<Buffer> {
    return new Promise((resolve, reject) => {
      this.queue.push({ ref, resolve, reject });
      if (!this.scheduled) {
        this.scheduled = true;
        setImmediate(() => this.flush());
      }
    });
  }

  private flush(): void {
    this.scheduled = false;
    while (this.queue.length > 0) {
      const batch = this.queue.splice(0, MAX_BATCH);
      this.urgentInFlight++;
      this.stats.demandBatches++;
      this.stats.demandChunks += batch.length;
      withRetry(() => this.urgent.chunks(this.leaseId(), batch.map((w) => w.ref)), this.demandDeadline(), () => this.stats.retries++)
        .then(
          (blobs) => {
            blobs.forEach((b, i) => {
              this.stats.bytes += b.length;
              batch[i].resolve(b);
            });
          },
          (e) => batch.forEach((w) => w.reject(e)),
        )
        .finally(() => {
          if (--this.urgentInFlight === 0 && this.idleResolve) {
            this.idleResolve();
            this.idle = this.idleResolve = undefined;
          }
        });
    }
  }

  /** Resolves when no demand request is outstanding. */
  private demandIdle(): Promise<void> {
    if (this.urgentInFlight === 0 && this.queue.length === 0) return Promise.resolve();
    this.idle ??= new Promise((r) => (this.idleResolve = r));
    return this.idle;
  }

  /** A batch for prefetch, on the background connection, after any demand request. */
  async prefetch(refs: ChunkRef[]): Promise<Buffer[]> {
    await this.demandIdle();
    const blobs = await withRetry(() => this.background.chunks(this.leaseId(), refs), Date.now() + this.retryWindowMs, () => this.stats.retries++);
    this.stats.prefetchBatches++;
    this.stats.prefetchChunks += refs.length;
    for (const b of blobs) this.stats.bytes += b.length;
    return blobs;
  }

  keys(refs: ChunkRef[], write = false, stateSize?: number) {
    return withRetry(() => this.urgent.keys(this.leaseId(), refs, write, stateSize), this.demandDeadline(), () => this.stats.retries++);
  }
}
