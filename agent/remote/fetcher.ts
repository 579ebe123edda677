// Fetching from the server: demand requests go out at once on their own
// connection (as QEMU's postcopy-preempt channel does) and are coalesced
// within one event-loop turn into a batch; the chunks read ahead of them go in a
// request of their own right behind, so a fault waits for its own page only.
// Prefetch uses other connections. Its requests are paced to the link
// (link-meter.ts): each a few milliseconds of it, as many in flight as fill a
// round trip and one more; while a demand request is out, no more than fill the
// round trip, so a demand answer finds next to nothing queued ahead of it however
// slow the link, and the link is not left idle while the guest waits. Transient failures
// (server unreachable, 5xx, rate limited) are retried with capped exponential backoff: for
// 30 s, and demand requests no later than the lease's eviction point.
import { setTimeout as sleep } from 'node:timers/promises';
import { backoffMs } from './backoff.js';
import type { ChunkKind } from '../../common/constants.js';
import { LetheError } from '../../common/errors.js';
import { MAX_BATCH } from '../../common/constants.js';
import type { DeviceClient } from './device-client.js';
import { LinkMeter } from './link-meter.js';

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

const byteCount = (blobs: Buffer[]) => blobs.reduce((n, b) => n + b.length, 0);

interface Waiter {
  ref: ChunkRef;
  resolve: (b: Buffer) => void;
  reject: (e: unknown) => void;
}

export class Fetcher {
  private queue: Waiter[] = [];
  /** Chunks read ahead of a demand request: their own request, sent right after it. */
  private aheadQueue: Waiter[] = [];
  private scheduled = false;
  private urgentInFlight = 0;
  /** Prefetch requests out, and those waiting for their turn (with how many may be out beside a demand request). */
  private backgroundInFlight = 0;
  private readonly backgroundWaiting: { beside: number; go: () => void }[] = [];
  /** What the requests' answers tell of the link: its round trip and rate, and so the prefetch's pace. */
  readonly link = new LinkMeter();
  readonly stats = { demandBatches: 0, demandChunks: 0, readaheadBatches: 0, readaheadChunks: 0, prefetchBatches: 0, prefetchChunks: 0, retries: 0, bytes: 0 };

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

  /**
   * One chunk, on the demand connection; concurrent calls in one turn share a
   * request. With `ahead` (chunks read ahead of one asked for) they share another,
   * sent right after: the chunk a reader waits for comes first, not behind them.
   */
  demand(ref: ChunkRef, ahead = false): Promise<Buffer> {
    return new Promise((resolve, reject) => {
      (ahead ? this.aheadQueue : this.queue).push({ ref, resolve, reject });
      if (!this.scheduled) {
        this.scheduled = true;
        setImmediate(() => this.flush());
      }
    });
  }

  private flush(): void {
    this.scheduled = false;
    while (this.queue.length > 0) this.send(this.queue.splice(0, MAX_BATCH), false);
    while (this.aheadQueue.length > 0) this.send(this.aheadQueue.splice(0, MAX_BATCH), true);
  }

  private send(batch: Waiter[], ahead: boolean): void {
    this.urgentInFlight++;
    if (ahead) {
      this.stats.readaheadBatches++;
      this.stats.readaheadChunks += batch.length;
    } else {
      this.stats.demandBatches++;
      this.stats.demandChunks += batch.length;
    }
    const t0 = performance.now();
    withRetry(() => this.urgent.chunks(this.leaseId(), batch.map((w) => w.ref)), this.demandDeadline(), () => this.stats.retries++)
      .then(
        (blobs) => {
          const bytes = byteCount(blobs);
          this.link.answered(t0, performance.now(), bytes);
          this.stats.bytes += bytes;
          blobs.forEach((b, i) => batch[i].resolve(b));
        },
        (e) => batch.forEach((w) => w.reject(e)),
      )
      .finally(() => {
        this.urgentInFlight--;
        this.wakeBackground();
      });
  }

  /** Whether a prefetch request allowed `beside` requests out beside a demand request may go now. */
  private backgroundMayGo(beside: number): boolean {
    const demanding = this.urgentInFlight > 0 || this.queue.length > 0 || this.aheadQueue.length > 0;
    return !demanding || this.backgroundInFlight < beside;
  }

  /** Lets waiting prefetch requests go, in order, as far as backgroundMayGo() allows; each takes its place at once. */
  private wakeBackground(): void {
    while (this.backgroundWaiting.length > 0 && this.backgroundMayGo(this.backgroundWaiting[0].beside)) {
      this.backgroundInFlight++;
      this.backgroundWaiting.shift()!.go();
    }
  }

  /** Resolves when a prefetch request may go (see prefetch()), with its place taken. */
  private backgroundTurn(beside: number): Promise<void> {
    if (this.backgroundWaiting.length === 0 && this.backgroundMayGo(beside)) {
      this.backgroundInFlight++;
      return Promise.resolve();
    }
    return new Promise((go) => this.backgroundWaiting.push({ beside, go }));
  }

  /**
   * A batch for prefetch, on the background connection; its answer measures the
   * link's rate too. While a demand request is out, it waits until fewer than
   * `beside` prefetch requests are (the pace's count that fills a round trip
   * without queueing), so the demand answer is not queued behind prefetch.
   */
  async prefetch(refs: ChunkRef[], beside = 1): Promise<Buffer[]> {
    await this.backgroundTurn(beside);
    try {
      const t0 = performance.now();
      const blobs = await withRetry(() => this.background.chunks(this.leaseId(), refs), Date.now() + this.retryWindowMs, () => this.stats.retries++);
      const bytes = byteCount(blobs);
      this.link.answered(t0, performance.now(), bytes);
      this.stats.prefetchBatches++;
      this.stats.prefetchChunks += refs.length;
      this.stats.bytes += bytes;
      return blobs;
    } finally {
      this.backgroundInFlight--;
      this.wakeBackground();
    }
  }

  keys(refs: ChunkRef[], write = false, stateSize?: number) {
    return withRetry(() => this.urgent.keys(this.leaseId(), refs, write, stateSize), this.demandDeadline(), () => this.stats.retries++);
  }
}
