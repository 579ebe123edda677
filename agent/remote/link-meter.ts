// What a device's requests tell of its link to the server, and how the background
// prefetch goes over it (docs/prefetch.md, "Background"): the round trip, the
// link's rate, and pace(): requests of a few milliseconds of the link,
// as many in flight as cover a round trip and one more (beside a demand request,
// as many as cover the round trip).
import { CHUNK_OVERHEAD, MAX_BATCH, MEM_CHUNK_SIZE } from '../../common/constants.js';

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
/**
 * The link's round trip is the shortest request time (less about its bytes' time on
 * the link) of the last RTT_WINDOW_MS: a window long enough to hold a moment with nothing
 * queued, since a round trip measured behind queued bytes would ask for more in
 * flight, and queue more.
 */
const RTT_WINDOW_MS = 10_000;
const RTT_SAMPLES = 256;
/** Answers the link's rate is measured over. */
const PACE_SAMPLES = 32;

/**
 * How a background stream should go over a link of `rate` bytes a millisecond and
 * `rttMs`: requests of about PACE_MS of the link (longer on a long round trip, so
 * that at most MAX_DEPTH fill it; whole chunks of `chunkBytes`,
 * between MIN_PACED_BYTES and MAX_PACED_BYTES of them, at most `cap`), and enough
 * of them in flight to cover a round trip and one more: the link stays busy (a
 * stream that left it idle would measure a lower rate, and ask for less). Beside a
 * demand request (`beside`), as many as cover the round trip only: the link stays
 * nearly busy while the guest waits, and the demand answer finds next to nothing
 * queued ahead of it. Unknown rate: requests of UNPACED_BYTES, two at a time, one
 * beside a demand request.
 */
export function pace(rate: number | undefined, rttMs: number, chunkBytes: number, cap = Infinity): Pace {
  const chunks = (bytes: number) => Math.max(1, Math.round(bytes / chunkBytes));
  const max = Math.max(1, Math.min(cap, MAX_BATCH, Math.floor(MAX_PACED_BYTES / chunkBytes)));
  if (rate === undefined || !Number.isFinite(rttMs) || rate <= 0) return { batch: Math.min(max, chunks(UNPACED_BYTES)), depth: MIN_DEPTH, beside: 1 };
  // A round trip longer than MAX_DEPTH − 2 requests of PACE_MS takes longer requests: fewer in flight would leave the link idle.
  const ms = Math.max(PACE_MS, rttMs / (MAX_DEPTH - 2));
  const batch = Math.min(max, Math.max(chunks(MIN_PACED_BYTES), chunks(rate * ms)));
  const batchMs = (batch * chunkBytes) / rate;
  const fill = Math.ceil(rttMs / batchMs);
  const depth = Math.max(MIN_DEPTH, Math.min(MAX_DEPTH, fill + 1));
  return { batch, depth, beside: Math.max(1, Math.min(depth - 1, fill)) };
}

/** Chunks a prefetch request, requests in flight, and requests in flight beside a demand request. */
export interface Pace {
  batch: number;
  depth: number;
  beside: number;
}

/** The link as measured: what the status and the log show. */
export interface LinkFigures {
  rttMs: number | null;
  bytesPerSec: number | null;
  /** The pace for pages of guest RAM. */
  pace: Pace;
}

export class LinkMeter {
  /** Recent requests' round trips (ms, less about their bytes' time on the link) and when they came. */
  private readonly rtts: { at: number; ms: number }[] = [];
  /** Recent answers: bytes, and the link time they took (ms). */
  private readonly samples: { bytes: number; ms: number }[] = [];
  /** When the last answer came (performance.now()). */
  private lastEnd = -Infinity;

  /**
   * A request sent at `t0` was answered with `bytes` at `end` (performance.now()).
   * Every answer, demand or background, measures the round trip, and the link's rate:
   * its bytes took the link from when they could first arrive (a round trip after
   * the request) or the answer before came, whichever is later, to its end. Demand
   * answers count too: they share the link, and a rate of the background alone,
   * measured while faults take part of the link, would read low and ask for smaller
   * requests, which fill the round trip less, and read lower still.
   */
  answered(t0: number, end: number, bytes: number): void {
    const rtt = this.rttMs();
    const rate = this.rate();
    // Half the bytes' time at the measured rate: a rate measured low (early on) must
    // not take a round trip below the link's own.
    this.rtts.push({ at: end, ms: Math.max(0.1, end - t0 - (rate ? bytes / (2 * rate) : 0)) });
    while (this.rtts.length > RTT_SAMPLES || (this.rtts.length > 1 && this.rtts[0].at < end - RTT_WINDOW_MS)) this.rtts.shift();
    // The first answer only tells the round trip: its own time is mostly that.
    if (!Number.isFinite(rtt)) return;
    const span = Math.max(0, end - Math.max(this.lastEnd, t0 + rtt));
    this.lastEnd = Math.max(this.lastEnd, end);
    this.samples.push({ bytes, ms: span });
    if (this.samples.length > PACE_SAMPLES) this.samples.shift();
  }

  /** The link's round trip: the shortest recent request (ms; Infinity before any). */
  rttMs(): number {
    let min = Infinity;
    for (const r of this.rtts) min = Math.min(min, r.ms);
    return min;
  }

  /**
   * The link's rate (bytes a millisecond): the bytes of recent answers over the link
   * time they took, summed (answers that come together over parallel connections
   * share one span; a mean of each answer's own rate would count them as instant).
   * Undefined until enough was measured.
   */
  rate(): number | undefined {
    let bytes = 0;
    let ms = 0;
    for (const p of this.samples) {
      bytes += p.bytes;
      ms += p.ms;
    }
    return ms >= PACE_MS ? bytes / ms : undefined;
  }

  /** How the background stream goes now (see pace()), for chunks of `chunkBytes`, at most `cap` a request. */
  pace(chunkBytes: number, cap?: number): Pace {
    return pace(this.rate(), this.rttMs(), chunkBytes, cap);
  }

  /** The figures, rounded, for the status and the log. */
  figures(): LinkFigures {
    const rtt = this.rttMs();
    const rate = this.rate();
    return {
      rttMs: Number.isFinite(rtt) ? Math.round(rtt * 10) / 10 : null,
      bytesPerSec: rate === undefined ? null : Math.round(rate * 1000),
      pace: this.pace(MEM_CHUNK_SIZE + CHUNK_OVERHEAD),
    };
  }
}
