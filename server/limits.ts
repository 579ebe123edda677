// Resource guards of the HTTP server: connection caps and timeouts against slow
// clients, and rate limits per address and per device (docs/escrow-protocol.md,
// "Limits"). The rate limits live in this process's memory on purpose: they keep
// one caller from using up the server, they decide nothing about security (the
// database does that: nonces, tokens, revocation), so N replicas each allowing
// the rate is acceptable and a restart forgetting the counts is harmless.
import type { NextFunction, Request, Response } from 'express';
import { LetheError } from '../common/errors.js';

/** `count` requests per `perMs`, with a burst of `count`. */
export interface Rate {
  count: number;
  perMs: number;
}

export interface ServerLimits {
  /** Enrollment requests per client address. */
  enroll: Rate | null;
  /** Failed admin or metrics token checks per client address; past it, every admin request from there waits. */
  authFailures: Rate | null;
  /** Failed logins (console and `lethe admin login`), per client address and per user name. */
  loginFailures: Rate | null;
  /** Device requests per client address, counted before the signature is checked. */
  deviceAddress: Rate | null;
  /** Device requests per device, counted once the signature verified (a forger cannot spend a device's budget). */
  device: Rate | null;
  /** Open connections at once; more are closed as they arrive. */
  maxConnections: number;
  /** A client must have sent a request's headers within this (slow-loris). */
  headersTimeoutMs: number;
  /** …and the whole request, body included. */
  requestTimeoutMs: number;
  /** An idle keep-alive connection is closed after this. */
  keepAliveTimeoutMs: number;
  /** A TLS handshake must finish within this. */
  handshakeTimeoutMs: number;
}

const SECOND = 1000;
const MINUTE = 60 * SECOND;

/**
 * Generous on purpose: an agent resuming a guest makes a few hundred key and chunk
 * requests a second at most (reads ahead, keys in batches), a fleet enrolling behind
 * one NAT address a few a second.
 */
export const DEFAULT_LIMITS: ServerLimits = {
  enroll: { count: 120, perMs: MINUTE },
  authFailures: { count: 60, perMs: MINUTE },
  loginFailures: { count: 10, perMs: 15 * MINUTE },
  deviceAddress: { count: 2000, perMs: SECOND },
  device: { count: 500, perMs: SECOND },
  maxConnections: 16_384,
  headersTimeoutMs: 10 * SECOND,
  requestTimeoutMs: 60 * SECOND,
  keepAliveTimeoutMs: 30 * SECOND,
  handshakeTimeoutMs: 10 * SECOND,
};

const PERIODS: Record<string, number> = { s: SECOND, sec: SECOND, min: MINUTE, m: MINUTE, h: 60 * MINUTE };

/** "600/min", "200/s", "off" → a Rate (null: no limit). @throws LetheError BAD_REQUEST quoting the bad value */
export function parseRate(text: string, what: string): Rate | null {
  if (/^\s*(off|none|0)\s*$/i.test(text)) return null;
  const m = /^\s*(\d{1,9})\s*\/\s*(s|sec|min|m|h)\s*$/i.exec(text);
  if (!m || Number(m[1]) === 0) {
    throw new LetheError('BAD_REQUEST', `bad ${what}: '${text}'`, { hint: 'use a count per second, minute or hour, e.g. 200/s or 60/min, or off' });
  }
  return { count: Number(m[1]), perMs: PERIODS[m[2].toLowerCase()] };
}

/** Most keys a limiter remembers; past it the longest-unused key is forgotten (it had its burst back, or nearly). */
const MAX_KEYS = 100_000;

/** Token buckets by key (an address or a device id). */
export class RateLimiter {
  private readonly buckets = new Map<string, { tokens: number; at: number }>();

  constructor(
    readonly rate: Rate,
    private readonly now: () => number = Date.now,
  ) {}

  /** Takes one token; returns 0, or the ms until one is available (then nothing was taken). */
  take(key: string): number {
    const b = this.refill(key);
    if (b.tokens >= 1) {
      b.tokens -= 1;
      return 0;
    }
    return Math.ceil(((1 - b.tokens) * this.rate.perMs) / this.rate.count);
  }

  /** Gives back a token taken for a request that turned out not to count (capped at the bucket's size). */
  give(key: string): void {
    const b = this.refill(key);
    b.tokens = Math.min(this.rate.count, b.tokens + 1);
  }

  /** The ms until `key` has a token again, without taking one (0: it has one). */
  wait(key: string): number {
    const b = this.refill(key);
    return b.tokens >= 1 ? 0 : Math.ceil(((1 - b.tokens) * this.rate.perMs) / this.rate.count);
  }

  private refill(key: string): { tokens: number; at: number } {
    const now = this.now();
    let b = this.buckets.get(key);
    if (b) {
      this.buckets.delete(key); // re-inserted below: the map's order is least recently used first
      b.tokens = Math.min(this.rate.count, b.tokens + ((now - b.at) * this.rate.count) / this.rate.perMs);
      b.at = now;
    } else {
      b = { tokens: this.rate.count, at: now };
      if (this.buckets.size >= MAX_KEYS) this.buckets.delete(this.buckets.keys().next().value!);
    }
    this.buckets.set(key, b);
    return b;
  }
}

/** The caller's address, as the socket sees it (no proxy headers are trusted). */
export const clientAddress = (req: Request): string => req.socket.remoteAddress ?? 'unknown';

/** Refuses with 429 RATE_LIMITED and Retry-After (whole seconds, at least 1). */
export function rateLimited(res: Response, waitMs: number, what: string): LetheError {
  const seconds = Math.max(1, Math.ceil(waitMs / 1000));
  res.set('Retry-After', String(seconds));
  return new LetheError('RATE_LIMITED', `too many ${what}`, { hint: `retry after ${seconds} s` });
}

/** Middleware: one token per request from the caller's address; none configured, no limit. */
export function perAddress(limiter: RateLimiter | null, what: string) {
  return (req: Request, res: Response, next: NextFunction) => {
    const wait = limiter?.take(clientAddress(req)) ?? 0;
    if (wait > 0) throw rateLimited(res, wait, what);
    next();
  };
}

export const limiterFor = (rate: Rate | null, now?: () => number): RateLimiter | null => (rate ? new RateLimiter(rate, now) : null);

/** Password checks (Argon2id, on libuv's small thread pool) running at once per replica; past it, a login waits its turn with 429. */
export const LOGINS_AT_ONCE = 4;

/**
 * Failed logins, counted per client address and per user name: past the budget of
 * either, a login is refused (429 RATE_LIMITED) before its password is checked.
 * Every attempt takes its token before the check and a success gives it back, so
 * logins sent in parallel cannot all pass while the first ones are still hashing.
 */
export class LoginGuard {
  private readonly limiter: RateLimiter | null;
  private running = 0;

  constructor(rate: Rate | null, now?: () => number) {
    this.limiter = limiterFor(rate, now);
  }

  /**
   * Admits one login attempt; call `done(ok)` when it is decided.
   * @throws LetheError RATE_LIMITED (with Retry-After on `res`)
   */
  admit(res: Response, address: string, user: string): (ok: boolean) => void {
    const keys = [`a:${address}`, `u:${user}`];
    const wait = Math.max(...keys.map((k) => this.limiter?.wait(k) ?? 0));
    if (wait > 0) throw rateLimited(res, wait, 'failed logins from this address or for this user');
    if (this.running >= LOGINS_AT_ONCE) throw rateLimited(res, 1000, 'logins at once');
    for (const k of keys) this.limiter?.take(k);
    this.running++;
    let decided = false;
    return (ok) => {
      if (decided) return;
      decided = true;
      this.running--;
      if (ok) for (const k of keys) this.limiter?.give(k);
    };
  }
}
