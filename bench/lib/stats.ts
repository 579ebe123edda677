// Latency percentiles and CPU meters shared by the benches.
import { execFileSync } from 'node:child_process';
import fs from 'node:fs';

/** Nearest-rank percentile of `sorted` (ascending); NaN when empty. */
export function percentile(sorted: Float64Array, p: number): number {
  if (sorted.length === 0) return NaN;
  const rank = Math.ceil((p / 100) * sorted.length);
  return sorted[Math.min(sorted.length, Math.max(1, rank)) - 1];
}

export function sortedCopy(xs: number[]): Float64Array {
  return Float64Array.from(xs).sort();
}

let ticksPerSec: number | undefined;

function clockTicks(): number {
  if (ticksPerSec === undefined) {
    try {
      ticksPerSec = Number(execFileSync('getconf', ['CLK_TCK'], { encoding: 'utf8' }).trim()) || 100;
    } catch {
      ticksPerSec = 100;
    }
  }
  return ticksPerSec;
}

/** CPU seconds (user + system) a process has used so far, from /proc; null off Linux or once it exited. */
export function processCpuSeconds(pid: number): number | null {
  try {
    const stat = fs.readFileSync(`/proc/${pid}/stat`, 'utf8');
    // Fields after "(comm)"; comm may hold spaces, so split after its last ')'.
    const f = stat.slice(stat.lastIndexOf(')') + 2).split(' ');
    return (Number(f[11]) + Number(f[12])) / clockTicks(); // utime, stime (fields 14 and 15)
  } catch {
    return null;
  }
}

/** CPU seconds this process has used so far. */
export function selfCpuSeconds(): number {
  const u = process.cpuUsage();
  return (u.user + u.system) / 1e6;
}

/** Snapshots the CPU use of this process and another; `percent` is of one core over the wall time since. */
export function cpuMeter(otherPid: number) {
  const t0 = performance.now();
  const self0 = selfCpuSeconds();
  const other0 = processCpuSeconds(otherPid);
  return () => {
    const wall = (performance.now() - t0) / 1000;
    const other1 = processCpuSeconds(otherPid);
    return {
      selfPercent: (100 * (selfCpuSeconds() - self0)) / wall,
      otherPercent: other0 === null || other1 === null ? null : (100 * (other1 - other0)) / wall,
    };
  };
}
