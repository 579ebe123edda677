// Times and sizes in the words an admin reads in `lethe policy explain` and in
// diagnostics: "15 min", "90 s", "16 MiB".

const HOUR = 3_600_000;
const MINUTE = 60_000;

/** 900000 → "15 min", 90000 → "90 s", 7200000 → "2 h". */
export function formatDuration(ms: number): string {
  if (ms < 1000) return `${ms} ms`;
  if (ms % HOUR === 0) return `${ms / HOUR} h`;
  if (ms % MINUTE === 0) return `${ms / MINUTE} min`;
  return `${Number((ms / 1000).toFixed(1))} s`;
}

const UNITS: [string, number][] = [
  ['TiB', 1024 ** 4],
  ['GiB', 1024 ** 3],
  ['MiB', 1024 ** 2],
  ['KiB', 1024],
];

/** 16777216 → "16 MiB", 1572864 → "1.5 MiB", 100 → "100 bytes". */
export function formatBytes(n: number): string {
  for (const [name, unit] of UNITS) {
    if (n >= unit) return `${Number((n / unit).toFixed(1))} ${name}`;
  }
  return `${n} bytes`;
}
