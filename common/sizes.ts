// Sizes and rates as people write them (policies, --cache-size): "64MiB", "512K",
// "1GiB", "50MiB/s", or a plain number of bytes. Units are binary, as QEMU's:
// 64MB means 64 MiB here.

const UNITS: Record<string, number> = { '': 1, K: 1024, M: 1024 ** 2, G: 1024 ** 3, T: 1024 ** 4 };

const SIZE = /^\s*(\d+(?:\.\d+)?)\s*(?:([KMGT])i?B?|B)?\s*$/i;
const RATE = /^(.*?)\s*\/\s*s(?:ec)?\s*$/i;

/** "64MiB" → 67108864; null when the text is not a size, or one too big to count in bytes exactly. */
export function parseSize(text: string): number | null {
  const m = SIZE.exec(text);
  const n = m ? Math.round(Number(m[1]) * UNITS[(m[2] ?? '').toUpperCase()]) : NaN;
  return Number.isSafeInteger(n) ? n : null;
}

/** "50MiB/s" (or "50MiB") → bytes per second; null when the text is not a rate. */
export function parseRate(text: string): number | null {
  const m = RATE.exec(text);
  return parseSize(m ? m[1] : text);
}
