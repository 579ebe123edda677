// Fetching from the server: demand requests go out at once on their own
// connection (as QEMU's postcopy-preempt channel does) and are coalesced
// within one event-loop turn into a batch; the chunks read ahead of them go in a
// request of their own right behind, so a fault waits for its own page only.
// Prefetch uses other connections and waits while any demand request is
// outstanding. Its requests are paced to the link (pace()): each a few
// milliseconds of it, as many in flight as fill a round trip, so a demand
// request queues behind little prefetch however slow the link. Transient failures
// (server unreachable, 5xx, rate limited) are retried with capped exponential backoff: for
// 30 s, and demand requests no later than the lease's eviction point.
import { setTimeout as sleep } from 'node:timers/promises';
import { backoffMs } from './backoff.js';
import type { ChunkKind } from '../../common/constants.js';
import { LetheError } from '../../common/errors.js';
import { CHUNK_OVERHEAD, MAX_BATCH, MEM_CHUNK_SIZE } from '../../common/constants.js';
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

/** A prefetch request is about this many milliseconds of the link, once its rate is known. */
export const PACE_MS = 5;
/** Prefetch requests in flight: at least 2 (one on the way while one is kept), at most 8. */
const MIN_DEPTH = 2;
const MAX_DEPTH = 8;
/** A prefetch request asks for at least this many bytes of chunks (and at least one chunk), however slow the link. */
const MIN_PACED_BYTES = 8 * 1024;
/**
 * And at most this many (and at most MAX_BATCH chunks): on a fast link, requests of
 * 5 ms would come faster than the server lets one device ask (500 a second).
 */
const MAX_PACED_BYTES = 4 * 1024 * 1024;
/** Before the rate is known: requests of this many bytes of chunks. */
const UNPACED_BYTES = 256 * 1024;
/** The status shows the pace for pages of guest RAM. */
const MEM_CHUNK_BYTES = MEM_CHUNK_SIZE + CHUNK_OVERHEAD;
/**
 * The link's round trip is the shortest request time (less about its bytes' time on
 * the link) of the last RTT_WINDOW_MS: a window long enough to hold a moment with nothing
 * queued, since a round trip measured behind queued bytes would ask for more in
 * flight, and queue more.
 */
const RTT_WINDOW_MS = 10_000;
const RTT_SAMPLES = 256;
/** Prefetch answers the link's rate is measured over. */
const PACE_SAMPLES = 16;

/**
 * How a background stream should go over a link of `rate` bytes a millisecond and
 * `rttMs`: requests of about PACE_MS of the link (longer on a long round trip, so
 * that at most MAX_DEPTH fill it; whole chunks of `chunkBytes`,
 * between MIN_PACED_BYTES and MAX_PACED_BYTES of them, at most `cap`), and enough
 * of them in flight to cover a round trip and two more: the link stays busy (a
 * stream that left it idle would measure a lower rate, and ask for less), and a
 * demand request finds about two of them queued ahead of it. Unknown rate: requests
 * of UNPACED_BYTES, two at a time.
 */
export function pace(rate: number | undefined, rttMs: number, chunkBytes: number, cap = Infinity): { batch: number; depth: number } {
  const chunks = (bytes: number) => Math.max(1, Math.round(bytes / chunkBytes));
  const max = Math.max(1, Math.min(cap, MAX_BATCH, Math.floor(MAX_PACED_BYTES / chunkBytes)));
  if (rate === undefined || !Number.isFinite(rttMs) || rate <= 0) return { batch: Math.min(max, chunks(UNPACED_BYTES)), depth: MIN_DEPTH };
  // A round trip longer than MAX_DEPTH − 2 requests of PACE_MS takes longer requests: fewer in flight would leave the link idle.
  const ms = Math.max(PACE_MS, rttMs / (MAX_DEPTH - 2));
  const batch = Math.min(max, Math.max(chunks(MIN_PACED_BYTES), chunks(rate * ms)));
  const batchMs = (batch * chunkBytes) / rate;
  const depth = Math.max(MIN_DEPTH, Math.min(MAX_DEPTH, Math.ceil(rttMs / batchMs) + 2));
  return { batch, depth };
}

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
  private idle?: Promise<void>;
  private idleResolve?: () => void;
  /** Recent requests' round trips (ms, less their bytes' time on the link) and when they came. */
  private readonly rtts: { at: number; ms: number }[] = [];
  /** The background stream's recent answers: bytes, and the link time they took (ms). */
  private readonly paceSamples: { bytes: number; ms: number }[] = [];
  /** When the last prefetch answer came (performance.now()). */
  private lastPrefetchEnd = -Infinity;
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
          let bytes = 0;
          for (const b of blobs) bytes += b.length;
          this.sampleRtt(performance.now() - t0, bytes);
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

  /** Resolves when no demand request is outstanding. */
  private demandIdle(): Promise<void> {
    if (this.urgentInFlight === 0 && this.queue.length === 0 && this.aheadQueue.length === 0) return Promise.resolve();
    this.idle ??= new Promise((r) => (this.idleResolve = r));
    return this.idle;
  }

  private sampleRtt(ms: number, bytes: number): void {
    const rate = this.rate();
    const now = performance.now();
    // Half the bytes' time at the measured rate: a rate measured low (early on) must not
    // take a round trip below the link's own.
    this.rtts.push({ at: now, ms: Math.max(0.1, ms - (rate ? bytes / (2 * rate) : 0)) });
    while (this.rtts.length > RTT_SAMPLES || (this.rtts.length > 1 && this.rtts[0].at < now - RTT_WINDOW_MS)) this.rtts.shift();
  }

  /** The link's round trip as measured: the shortest recent request (ms; Infinity before any). */
  rttMs(): number {
    let min = Infinity;
    for (const r of this.rtts) min = Math.min(min, r.ms);
    return min;
  }

  /**
   * The background stream's rate (bytes a millisecond): the bytes of its recent
   * answers over the link time they took, summed (answers that come together over
   * parallel connections share one span; a mean of each answer's own rate would
   * count them as instant). Undefined until enough was measured.
   */
  rate(): number | undefined {
    let bytes = 0;
    let ms = 0;
    for (const p of this.paceSamples) {
      bytes += p.bytes;
      ms += p.ms;
    }
    return ms >= PACE_MS ? bytes / ms : undefined;
  }

  /** The link as measured, for the status: round trip (ms), the background stream's rate (bytes/s), and its pace. */
  link(): { rttMs: number | null; bytesPerSec: number | null; pace: { batch: number; depth: number } } {
    const rtt = this.rttMs();
    const rate = this.rate();
    return { rttMs: Number.isFinite(rtt) ? Math.round(rtt * 10) / 10 : null, bytesPerSec: rate === undefined ? null : Math.round(rate * 1000), pace: this.pace(MEM_CHUNK_BYTES) };
  }

  /** How the background stream goes now (see pace()), for chunks of `chunkBytes`, at most `cap` a request. */
  pace(chunkBytes: number, cap?: number): { batch: number; depth: number } {
    return pace(this.rate(), this.rttMs(), chunkBytes, cap);
  }

  /**
   * A batch for prefetch, on the background connection, after any demand request.
   * Its answer measures the link's rate (rate()): its bytes took the time since the
   * answer before, when this request was already out then (the link was busy with
   * it), else its own time less a round trip.
   */
  async prefetch(refs: ChunkRef[]): Promise<Buffer[]> {
    await this.demandIdle();
    const t0 = performance.now();
    const blobs = await withRetry(() => this.background.chunks(this.leaseId(), refs), Date.now() + this.retryWindowMs, () => this.stats.retries++);
    const end = performance.now();
    let bytes = 0;
    for (const b of blobs) bytes += b.length;
    const rtt = this.rttMs();
    this.sampleRtt(end - t0, bytes);
    const span = t0 < this.lastPrefetchEnd ? end - this.lastPrefetchEnd : Math.max(0, end - t0 - (Number.isFinite(rtt) ? rtt : 0));
    this.lastPrefetchEnd = end;
    this.paceSamples.push({ bytes, ms: span });
    if (this.paceSamples.length > PACE_SAMPLES) this.paceSamples.shift();
    this.stats.prefetchBatches++;
    this.stats.prefetchChunks += refs.length;
    this.stats.bytes += bytes;
    return blobs;
  }

  keys(refs: ChunkRef[], write = false, stateSize?: number) {
    return withRetry(() => this.urgent.keys(this.leaseId(), refs, write, stateSize), this.demandDeadline(), () => this.stats.retries++);
  }
}
