// Authentication of admin and device requests. Unknown devices, bad signatures
// and malformed auth headers all get the same 401 (AUTH_FAILED); a stale
// timestamp says so to anyone (it is about the request, not the device); only a
// caller that proved who it is learns more (replayed, revoked).
import type { NextFunction, Request, Response } from 'express';
import { HDR_DEVICE, HDR_NONCE, HDR_SIGNATURE, HDR_TIMESTAMP, SIG_WINDOW_MS } from '../common/constants.js';
import { LetheError } from '../common/errors.js';
import { verifyRequest } from '../common/signing.js';
import type { Ctx } from './context.js';
import { can, tokenPrincipal, type Permission, type Principal } from './accounts.js';
import { deviceStatus, getDevice, type DeviceRow } from './devices.js';
import { rateLimited, type RateLimiter } from './limits.js';

export interface AuthedRequest extends Request {
  device?: DeviceRow;
  /** Who made an admin request, as its audit entries name it (`user:NAME`, or `token:` + 8 hex digits of the bootstrap token's SHA-256). */
  actor?: string;
  principal?: Principal;
}

/** Bearer-token authentication of admin requests: a user's API token, or the bootstrap token while no named admin exists. */
export async function adminAuth(ctx: Ctx) {
  const row = await ctx.db.get<{ value: string }>("SELECT value FROM settings WHERE key = 'admin_token_sha256'");
  const bootstrap = Buffer.from(row?.value ?? '', 'hex');
  return async (req: AuthedRequest, _res: Response, next: NextFunction) => {
    const m = /^Bearer (\S+)$/.exec(req.get('authorization') ?? '');
    const p = await tokenPrincipal(ctx, bootstrap, m?.[1]);
    req.principal = p;
    req.actor = p.actor;
    next();
  };
}

/** Refuses (403 FORBIDDEN) a request whose role may not do `perm`. */
export function permit(perm: Permission) {
  return (req: AuthedRequest, _res: Response, next: NextFunction) => {
    mayDo(req.principal, perm);
    next();
  };
}

/** @throws LetheError FORBIDDEN when `p` may not do `perm` */
export function mayDo(p: Principal | undefined, perm: Permission): Principal {
  if (!p || !can(p.role, perm)) {
    throw new LetheError('FORBIDDEN', `${p?.user ? `user '${p.user}'` : 'this token'} (role ${p?.role ?? 'none'}) may not do this (${perm})`, {
      hint: 'ask an admin: roles are admin, auditor (read only) and helpdesk (enrollment and device status)',
    });
  }
  return p;
}

const authFailed = () => new LetheError('AUTH_FAILED', 'device authentication failed');

export interface SignatureHeaders {
  deviceId: string;
  ts: string;
  nonce: string;
  signature: string;
}

/** The four signature headers, or null when one is missing or malformed. */
export function signatureHeaders(req: { headers: Record<string, string | string[] | undefined> }): SignatureHeaders | null {
  const one = (name: string) => {
    const v = req.headers[name];
    return typeof v === 'string' ? v : undefined;
  };
  const deviceId = one(HDR_DEVICE);
  const ts = one(HDR_TIMESTAMP);
  const nonce = one(HDR_NONCE);
  const signature = one(HDR_SIGNATURE);
  if (!deviceId || !ts || !nonce || !signature) return null;
  if (!/^[a-z0-9-]{1,64}$/.test(deviceId) || !/^\d{1,15}$/.test(ts) || !/^[A-Za-z0-9_-]{1,64}$/.test(nonce) || !/^[A-Za-z0-9_-]{1,128}$/.test(signature)) {
    return null;
  }
  return { deviceId, ts, nonce, signature };
}

/** Refuses a timestamp outside the signature window, or older than this server process. */
function checkFresh(ctx: Ctx, ts: string): void {
  if (Math.abs(ctx.now() - Number(ts)) > SIG_WINDOW_MS || Number(ts) < ctx.nonces.floor) {
    throw new LetheError('SIGNATURE_STALE', 'request signature is too old or from the future', {
      hint: "check this device's clock",
    });
  }
}

/** Device rows kept at most by KnownDevices. */
const KNOWN_DEVICES = 10_000;

/**
 * The device rows this process read last, by id: a signature is checked with
 * the key they hold, and an unknown device refused before its body is read,
 * without a round trip to the database. Nothing else is decided on them:
 * verifiedDevice reads the row again with the nonce, for its status, and checks
 * the signature again when the key changed meanwhile (a key rotation).
 */
export class KnownDevices {
  private readonly rows = new Map<string, DeviceRow>();

  get(id: string): DeviceRow | undefined {
    return this.rows.get(id);
  }

  set(d: DeviceRow): void {
    this.rows.delete(d.id);
    this.rows.set(d.id, d);
    if (this.rows.size > KNOWN_DEVICES) this.rows.delete(this.rows.keys().next().value!);
  }

  forget(id: string): void {
    this.rows.delete(id);
  }
}

/** The device's row as KnownDevices has it, or else as the database does. */
async function knownDevice(ctx: Ctx, id: string, known?: KnownDevices): Promise<DeviceRow | undefined> {
  const hit = known?.get(id);
  if (hit) return hit;
  const d = await getDevice(ctx, id);
  if (d) known?.set(d);
  return d;
}

/**
 * The part of device authentication that needs no body; runs before the body is
 * read, so an unknown device or junk headers cost the server no upload. Headers
 * missing or malformed and an unknown device get the one AUTH_FAILED; a timestamp
 * outside the window is SIGNATURE_STALE whoever sent it (checked before the device
 * is looked up, it tells nothing about which devices exist).
 */
export function deviceHeaderCheck(ctx: Ctx, known?: KnownDevices) {
  return async (req: Request, _res: Response, next: NextFunction) => {
    const h = signatureHeaders(req);
    if (!h) {
      ctx.metrics.inc('lethe_auth_failures_total');
      throw authFailed();
    }
    checkFresh(ctx, h.ts);
    if (!(await knownDevice(ctx, h.deviceId, known))) {
      ctx.metrics.inc('lethe_auth_failures_total');
      throw authFailed();
    }
    next();
  };
}

/**
 * Verifies a signed device request, once its body is read (deviceHeaderCheck ran
 * before). `allowWipePending` lets heartbeat and command acknowledgements through
 * for a device that must still learn of, or confirm, its wipe; `allowRevoked` lets a
 * revoked device confirm that it erased its keys (the revoke acknowledgement, which
 * gives nothing); `rate` counts the
 * device's verified requests (RATE_LIMITED past it).
 */
export function deviceAuth(ctx: Ctx, opts: DeviceAuthOptions = {}) {
  return async (req: AuthedRequest, res: Response, next: NextFunction) => {
    const body: Buffer = Buffer.isBuffer(req.body) ? req.body : Buffer.alloc(0);
    req.device = await verifiedDevice(ctx, signatureHeaders(req), req.method, req.originalUrl, body, opts, (wait) =>
      rateLimited(res, wait, 'requests from this device'),
    );
    next();
  };
}

export interface DeviceAuthOptions {
  allowWipePending?: boolean;
  allowRevoked?: boolean;
  rate?: RateLimiter | null;
  /** Rows of devices seen lately, shared with deviceHeaderCheck. */
  known?: KnownDevices;
}

/**
 * The device that signed a request, or the error to answer it with: the
 * signature, its freshness, the device's rate (`limited` makes the error), its
 * nonce, and its status, in that order. Shared by every device route and the
 * push channel's upgrade request. The signature is checked with the key
 * `opts.known` holds, if any; the device's status is read with the nonce, after
 * the body.
 */
export async function verifiedDevice(
  ctx: Ctx,
  h: SignatureHeaders | null,
  method: string,
  url: string,
  body: Buffer,
  opts: DeviceAuthOptions,
  limited: (waitMs: number) => Error = () => new LetheError('RATE_LIMITED', 'too many requests from this device'),
): Promise<DeviceRow> {
  if (!h) throw authFailed();
  const known = opts.known;
  let s = known?.get(h.deviceId);
  if (!s || !verifyRequest(s.sign_pk, h, method, url, body)) {
    // Not known, or its key changed since: the database decides.
    s = await getDevice(ctx, h.deviceId);
    if (!s || !verifyRequest(s.sign_pk, h, method, url, body)) {
      known?.forget(h.deviceId);
      ctx.metrics.inc('lethe_auth_failures_total');
      throw authFailed();
    }
  }
  checkFresh(ctx, h.ts);
  const wait = opts.rate?.take(s.id) ?? 0;
  if (wait > 0) throw limited(wait);
  const { fresh, device: d } = await ctx.nonces.admit(s.id, h.nonce, Number(h.ts));
  // Gone, or its key changed since `known` read it (and this request is not signed with the new one).
  if (!d || (!d.sign_pk.equals(s.sign_pk) && !verifyRequest(d.sign_pk, h, method, url, body))) {
    known?.forget(h.deviceId);
    ctx.metrics.inc('lethe_auth_failures_total');
    throw authFailed();
  }
  known?.set(d);
  if (!fresh) {
    await refusalAlarm(ctx, d.id, 'replayed', method, url);
    throw new LetheError('SIGNATURE_REPLAYED', 'request was already seen (replayed nonce)');
  }
  const status = deviceStatus(d);
  if (status === 'revoked' && !opts.allowRevoked) {
    await refusalAlarm(ctx, d.id, 'revoked', method, url);
    throw new LetheError('DEVICE_REVOKED', 'this device has been revoked', { hint: 'contact IT' });
  }
  if (status === 'wiped') {
    await refusalAlarm(ctx, d.id, 'wiped', method, url);
    throw new LetheError('DEVICE_WIPED', 'this device has been wiped', { hint: 'enroll it again' });
  }
  if (status === 'wipe-pending' && !opts.allowWipePending) {
    throw new LetheError('DEVICE_WIPE_PENDING', 'this device must wipe itself', { hint: "run 'lethe heartbeat'" });
  }
  return d;
}

/** An alarm of one device and reason is written at most this often (per replica): a device calling in a loop adds one entry, not thousands. */
export const REFUSAL_ALARM_EVERY_MS = 10 * 60_000;
const lastAlarm = new Map<string, number>();

/**
 * A device that proved who it is but is refused for what an auditor must see —
 * a replayed request, a revoked or wiped device still calling — is recorded as
 * `alarm.device-refused` (the console's overview lists them). Best effort: the
 * refusal stands when the log cannot be written.
 */
async function refusalAlarm(ctx: Ctx, device: string, reason: 'replayed' | 'revoked' | 'wiped', method: string, url: string): Promise<void> {
  const key = `${device} ${reason}`;
  const now = ctx.now();
  if (now - (lastAlarm.get(key) ?? 0) < REFUSAL_ALARM_EVERY_MS) return;
  lastAlarm.set(key, now);
  if (lastAlarm.size > 10_000) lastAlarm.delete(lastAlarm.keys().next().value!);
  ctx.metrics.inc('lethe_device_refusals_total', { reason });
  await ctx.audit.append('alarm.device-refused', null, { device, reason, request: `${method} ${url.slice(0, 120)}` }, now).catch(() => {});
}
