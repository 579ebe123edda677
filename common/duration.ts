// Durations and times as people type them: "90s", "15m", "1h", "7d", or an ISO time.
import { LetheError } from './errors.js';

const UNITS: Record<string, number> = { ms: 1, s: 1000, m: 60_000, h: 3_600_000, d: 86_400_000 };

/** Parses "15m" into milliseconds; throws BAD_REQUEST naming the bad value. */
export function parseDuration(text: string, what = 'duration'): number {
  const m = /^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h|d)?\s*$/.exec(text);
  if (!m) {
    throw new LetheError('BAD_REQUEST', `bad ${what}: '${text}'`, { hint: 'use a number with a unit, e.g. 90s, 15m, 1h, 7d' });
  }
  return Math.round(Number(m[1]) * UNITS[m[2] ?? 's']);
}

/** An ISO time, or a duration meaning that long ago ("2h" → two hours before now). */
export function parseSince(text: string, now = Date.now()): number {
  if (/^\s*\d+(?:\.\d+)?\s*(ms|s|m|h|d)\s*$/.test(text)) return now - parseDuration(text);
  const t = Date.parse(text);
  if (Number.isNaN(t)) {
    throw new LetheError('BAD_REQUEST', `bad time: '${text}'`, {
      hint: 'use an ISO time such as 2026-11-24T09:00:00Z, or a duration ago such as 24h',
    });
  }
  return t;
}

export const iso = (ms: number): string => new Date(ms).toISOString();
