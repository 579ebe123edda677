// The last N latencies of one kind of event, for percentiles in the agent's status
// (a sensitive page's re-fault, say). A ring of samples: p50 and p99 of what the
// guest felt lately, not since the agent started.

/** Samples kept: the newest this many. */
export const LATENCY_SAMPLES = 4096;

export class Latencies {
  /** Every sample ever added. */
  count = 0;
  private readonly ring: Float64Array;

  constructor(size = LATENCY_SAMPLES) {
    this.ring = new Float64Array(size);
  }

  add(ms: number): void {
    this.ring[this.count++ % this.ring.length] = ms;
  }

  /** Nearest-rank percentiles of the samples kept, in ms (null when there is none). */
  summary(): { count: number; p50Ms: number | null; p99Ms: number | null } {
    const n = Math.min(this.count, this.ring.length);
    if (n === 0) return { count: 0, p50Ms: null, p99Ms: null };
    const sorted = this.ring.slice(0, n).sort();
    const at = (p: number) => sorted[Math.min(n, Math.max(1, Math.ceil((p / 100) * n))) - 1];
    return { count: this.count, p50Ms: at(50), p99Ms: at(99) };
  }
}
