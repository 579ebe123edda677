// Durations and times as people type them: "90s", "15m", "1h", "7d", or an ISO time.
// Every value is checked to be finite and within bounds: a duration too large for a
// Date or a timer is refused, never passed on (it used to surface as a 500 or a 1 ms timer).
import { LetheError } from './errors.js';

const UNITS: Record<string, number> = { ms: 1, s: 1000, m: 60_000, h: 3_600_000, d: 86_400_000 };
/** The longest duration anything here takes: 100 years. */
export const MAX_DURATION_MS = 36_500 * UNITS.d;
/** The longest a Node timer waits (2^31 − 1 ms, about 24.8 days); longer ones fire at once. */
export const MAX_TIMER_MS = 2 ** 31 - 1;
const DURATION_HINT = 'use a number with a unit, e.g. 90s, 15m, 1h, 7d';

const show = (ms: number): string => {
  for (const u of ['d', 'h', 'm', 's'] as const) if (ms >= UNITS[u] && ms % UNITS[u] === 0) return `${ms / UNITS[u]}${u}`;
  return `${ms}ms`;
};

/**
 * Parses "15m" into milliseconds, between `min` (default 0) and `max` (default
 * MAX_DURATION_MS). @throws LetheError BAD_REQUEST naming `what` and quoting the bad value.
 */
export function parseDuration(text: string, what = 'duration', bounds: { min?: number; max?: number } = {}): number {
  const m = /^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h|d)?\s*$/.exec(text);
  if (!m) throw new LetheError('BAD_REQUEST', `bad ${what}: '${text}'`, { hint: DURATION_HINT });
  const ms = Math.round(Number(m[1]) * UNITS[m[2] ?? 's']);
  const { min = 0, max = MAX_DURATION_MS } = bounds;
  if (!Number.isFinite(ms) || ms > max) {
    throw new LetheError('BAD_REQUEST', `bad ${what}: '${text}' is longer than ${show(max)}`, { hint: `use at most ${show(max)}` });
  }
  if (ms < min) throw new LetheError('BAD_REQUEST', `bad ${what}: '${text}' is shorter than ${show(min)}`, { hint: `use at least ${show(min)}` });
  return ms;
}

/**
 * An ISO time, or a duration meaning that long ago ("2h" → two hours before now).
 * @throws LetheError BAD_REQUEST for junk, a time before 1970 or one a Date cannot hold
 */
export function parseSince(text: string, now = Date.now()): number {
  let t: number;
  if (/^\s*\d+(?:\.\d+)?\s*(ms|s|m|h|d)\s*$/.test(text)) t = now - parseDuration(text, 'time');
  else {
    t = Date.parse(text);
    if (Number.isNaN(t)) {
      throw new LetheError('BAD_REQUEST', `bad time: '${text}'`, {
        hint: 'use an ISO time such as 2026-11-24T09:00:00Z, or a duration ago such as 24h',
      });
    }
  }
  if (t < 0) throw new LetheError('BAD_REQUEST', `bad time: '${text}' is before 1970`, { hint: 'use a time after 1970-01-01T00:00:00Z' });
  return t;
}

export const iso = (ms: number): string => new Date(ms).toISOString();
