// HTTP routes. Admin routes take a bearer token; device routes take signed
// requests. Every body is read raw (so signatures cover the exact bytes), only
// once the caller's credentials (device headers, admin token) and rate allow it,
// and validated with the schemas in common/wire.ts.
import express, { type NextFunction, type Request, type Response } from 'express';
import type { z } from 'zod';
import { crashPoint } from '../common/crash-point.js';
import { CHUNK_KINDS, MAX_CHUNK_BODY, MAX_JSON_BODY, MAX_UPLOAD_BODY, type ChunkKind } from '../common/constants.js';
import { parseSince } from '../common/duration.js';
import { LetheError, errorChain } from '../common/errors.js';
import * as wire from '../common/wire.js';
import { adminAuth, deviceAuth, deviceHeaderCheck, KnownDevices, permit, type AuthedRequest } from './auth.js';
import type { Checkpoint } from './audit.js';
import { auditEntries, auditFilter, deviceReport, verifyAudit } from './audit-read.js';
import { actingAs, type Ctx } from './context.js';
import { ackCommand, ackRevoke, commandStatus, enroll, rotateDeviceKeys, heartbeat, listDevices, mintEnrollToken, mustGetDevice, revokeDevice, wipeDevice } from './devices.js';
import {
  chunkHashes,
  commitVersion,
  createImage,
  createVersion,
  dedupKeyFor,
  exportChunks,
  getImage,
  getVersion,
  listImages,
  putChunks,
  removeImage,
  setPolicy,
} from './images.js';
import { manifest } from './manifests.js';
import { parseChunkFrames } from '../common/frames.js';
import { promoteVersion, setTrusted } from './branches.js';
import { assign, grantLease, leaseManifest, leaseManifestPacked, releaseKeys, renewLease, serveChunks, unassign } from './leases.js';
import { checkin } from './checkin.js';
import { gaugeLines, metricsAuth } from './metrics.js';
import { rotateMaster } from './keyring.js';
import { announceTls, finishTls } from './tls.js';
import { DEFAULT_LIMITS, LoginGuard, clientAddress, limiterFor, perAddress, rateLimited, type ServerLimits } from './limits.js';
import { accountRoutes, loginRoute } from './accounts-api.js';
import { consoleRoutes } from './console/index.js';
import { MAX_TRACE_BODY, prefetchOrder, uploadTrace } from './traces.js';

/** A NUL in a JSON string (raw or escaped): no text column of either backend can hold it (PostgreSQL refuses it). */
const JSON_NUL = /\u0000|\\u0000/i;

function json<T extends z.ZodTypeAny>(schema: T, req: Request): z.infer<T> {
  const raw: Buffer = Buffer.isBuffer(req.body) ? req.body : Buffer.alloc(0);
  if (JSON_NUL.test(raw.toString('utf8'))) throw new LetheError('BAD_REQUEST', 'a string in the request body holds a NUL character');
  let value: unknown;
  try {
    value = raw.length === 0 ? {} : JSON.parse(raw.toString('utf8'));
  } catch {
    throw new LetheError('BAD_JSON', 'request body is not valid JSON');
  }
  const r = schema.safeParse(value);
  if (!r.success) {
    const i = r.error.issues[0];
    throw new LetheError('BAD_REQUEST', `${i.path.join('.') || 'body'}: ${i.message}`);
  }
  return r.data;
}

function param(req: Request, name: string): string {
  const v = req.params[name];
  return Array.isArray(v) ? v.join('/') : String(v);
}

function kindParam(req: Request): ChunkKind {
  const k = param(req, 'kind');
  if (!(CHUNK_KINDS as readonly string[]).includes(k)) {
    throw new LetheError('BAD_REQUEST', `unknown chunk kind '${k}'`, { hint: `use one of ${CHUNK_KINDS.join(', ')}` });
  }
  return k as ChunkKind;
}

function intParam(req: Request, name: string): number {
  const v = param(req, name);
  if (!/^\d{1,12}$/.test(v)) throw new LetheError('BAD_REQUEST', `${name} must be a non-negative integer, got '${v}'`);
  return Number(v);
}

/** `?part=` of a check-in request: its number among its lease's parts (server/checkin.ts, holdPart), if given. */
function partQuery(req: Request): number | undefined {
  const v = req.query.part;
  if (v === undefined) return undefined;
  if (typeof v !== 'string' || !/^[1-9]\d{0,14}$/.test(v)) throw new LetheError('BAD_REQUEST', `part must be a positive integer, got '${String(v).slice(0, 32)}'`);
  return Number(v);
}

/** `?key=` (a pinned audit key, base64url) and `?seq=&hash=&signature=` (an anchor) of an audit verify. */
function verifyQuery(req: Request): { pinnedKey?: Buffer; anchor?: Checkpoint } {
  const str = (name: string) => (typeof req.query[name] === 'string' ? (req.query[name] as string) : undefined);
  const key = str('key');
  if (key !== undefined && (!/^[A-Za-z0-9_-]+$/.test(key) || Buffer.from(key, 'base64url').length !== 32)) {
    throw new LetheError('BAD_REQUEST', `key: not a 32-byte base64url key: '${key.slice(0, 64)}'`);
  }
  const out: { pinnedKey?: Buffer; anchor?: Checkpoint } = key === undefined ? {} : { pinnedKey: Buffer.from(key, 'base64url') };
  if (str('seq') === undefined) return out;
  const seq = str('seq')!;
  const r = wire.SignedCheckpoint.safeParse({ seq: /^\d{1,15}$/.test(seq) ? Number(seq) : seq, hash: str('hash'), signature: str('signature') });
  if (!r.success) {
    const i = r.error.issues[0];
    throw new LetheError('BAD_REQUEST', `anchor ${i.path.join('.')}: ${i.message}`);
  }
  return { ...out, anchor: r.data };
}

/** Frames a batch of chunks: for each, u32be length ‖ blob. Order is the request's. */
function frames(blobs: Buffer[]): Buffer {
  const parts: Buffer[] = [];
  for (const b of blobs) {
    const len = Buffer.alloc(4);
    len.writeUInt32BE(b.length);
    parts.push(len, b);
  }
  return Buffer.concat(parts);
}

export interface AppOptions {
  limits?: ServerLimits;
  /** The bearer token that GET /metrics asks for; without one /metrics is not served. */
  metricsToken?: string;
}

/**
 * Sends a large body a MiB at a time, each once the socket took the last: one write
 * of it all encrypts it all for TLS in one turn of the event loop (0.85 s for a
 * manifest of 67 MB here), and every other request waits.
 */
async function sendInSlices(res: Response, body: Buffer): Promise<void> {
  const SLICE = 1024 * 1024;
  res.set('Content-Length', String(body.length));
  for (let at = 0; at < body.length && !res.destroyed; at += SLICE) {
    if (res.write(body.subarray(at, at + SLICE))) continue;
    await new Promise<void>((r) => {
      const on = () => (res.off('drain', on), res.off('close', on), r());
      res.on('drain', on).on('close', on);
    });
  }
  res.end();
}

/** Refuses a request body sent compressed: it would be inflated past the body limits' meaning. */
function identityOnly(req: Request, _res: Response, next: NextFunction) {
  const enc = req.get('content-encoding');
  if (enc !== undefined && enc.trim().toLowerCase() !== 'identity') {
    throw new LetheError('UNSUPPORTED_ENCODING', `content encoding '${enc.slice(0, 64)}' is not accepted`, { hint: 'send the body uncompressed' });
  }
  next();
}

export async function buildApp(ctx: Ctx, opts: AppOptions = {}): Promise<express.Express> {
  const app = express();
  app.disable('x-powered-by');
  app.set('etag', false);
  const limits = opts.limits ?? DEFAULT_LIMITS;
  const raw = (limit: number) => express.raw({ type: () => true, limit, inflate: false });
  const rawJson = raw(MAX_JSON_BODY);
  const rawChunk = raw(MAX_CHUNK_BODY);
  const rawUpload = raw(MAX_UPLOAD_BODY);
  const rawTrace = raw(MAX_TRACE_BODY);
  const authFailures = limiterFor(limits.authFailures);
  const perDevice = limiterFor(limits.device);
  const admin = await adminAuth(ctx);
  const known = new KnownDevices();
  const device = deviceAuth(ctx, { rate: perDevice, known });
  const deviceWipeOk = deviceAuth(ctx, { allowWipePending: true, rate: perDevice, known });
  const deviceRevokedOk = deviceAuth(ctx, { allowWipePending: true, allowRevoked: true, rate: perDevice, known });
  /** Past its failed token checks, an address waits before any admin or metrics request is looked at. */
  const authFailureGuard = (req: Request, res: Response, next: NextFunction) => {
    const wait = authFailures?.wait(clientAddress(req)) ?? 0;
    if (wait > 0) throw rateLimited(res, wait, 'failed token checks from this address');
    next();
  };
  const dev = (req: AuthedRequest) => req.device!;
  /** The context for an admin request that changes something: its audit entries name the actor. */
  const acting = (req: AuthedRequest) => actingAs(ctx, req.actor!);

  app.use((req, res, next) => {
    const t0 = process.hrtime.bigint();
    res.on('finish', () => {
      const route = (req.route?.path as string | undefined) ?? 'unmatched';
      ctx.metrics.inc('lethe_http_requests_total', { method: req.method, route, status: String(res.statusCode) });
      if (res.statusCode >= 400) {
        const ms = Number(process.hrtime.bigint() - t0) / 1e6;
        console.error(`lethe server: ${req.method} ${req.path} ${res.statusCode} ${ms.toFixed(1)}ms ${res.locals.code ?? ''}`);
      }
    });
    next();
  });
  app.use(identityOnly);
  // A NUL in the path or query would reach a text column (PostgreSQL refuses it: a 500); no id or name holds one.
  app.use((req, _res, next) => {
    if (/%00/.test(req.originalUrl)) throw new LetheError('BAD_REQUEST', 'the request path or query holds a NUL byte (%00)');
    next();
  });

  app.get('/healthz', async (_req, res) => {
    await ctx.db.get('SELECT 1 AS x');
    res.json({ ok: true });
  });
  app.get('/metrics', authFailureGuard, metricsAuth(opts.metricsToken), async (_req, res) => {
    res.type('text/plain; version=0.0.4').send(await ctx.metrics.render());
  });

  // ---- enrollment (token-authenticated) ----
  app.post('/v1/enroll', perAddress(limiterFor(limits.enroll), 'enrollment requests from this address'), rawJson, async (req, res) => {
    res.status(201).json(await enroll(ctx, json(wire.EnrollRequest, req)));
  });

  // ---- device routes (signed) ----
  // Counted and checked before any body is read; the signature is checked after.
  app.use('/v1/device', perAddress(limiterFor(limits.deviceAddress), 'device requests from this address'), deviceHeaderCheck(ctx, known));
  app.post('/v1/device/heartbeat', rawJson, deviceWipeOk, async (req: AuthedRequest, res) => {
    res.json(await heartbeat(ctx, dev(req), json(wire.HeartbeatRequest, req).status));
  });
  app.post('/v1/device/commands/:id/ack', rawJson, deviceWipeOk, async (req: AuthedRequest, res) => {
    const b = json(wire.AckRequest, req);
    res.json(await ackCommand(ctx, dev(req), param(req, 'id'), b.ok, b.detail, b.zeroedAfterMs));
  });
  app.post('/v1/device/revoke/ack', rawJson, deviceRevokedOk, async (req: AuthedRequest, res) => {
    const b = json(wire.RevokeAckRequest, req);
    res.json(await ackRevoke(ctx, dev(req), b.detail, b.zeroedAfterMs));
  });
  app.post('/v1/device/keys/rotate', rawJson, device, async (req: AuthedRequest, res) => {
    const b = json(wire.RotateKeysRequest, req);
    res.json(await rotateDeviceKeys(ctx, dev(req), b.signPublicKey, b.boxPublicKey, b.proof));
  });
  app.post('/v1/device/leases', rawJson, device, async (req: AuthedRequest, res) => {
    res.status(201).json(await grantLease(ctx, dev(req), json(wire.LeaseRequest, req).image));
  });
  app.post('/v1/device/leases/:id/renew', rawJson, device, async (req: AuthedRequest, res) => {
    json(wire.HeartbeatRequest, req);
    res.json(await renewLease(ctx, dev(req), param(req, 'id')));
  });
  app.get('/v1/device/leases/:id/manifest', device, async (req: AuthedRequest, res) => {
    // format=2: packed and signed as a whole (common/manifest.ts); else the JSON of agents before it.
    if (req.query.format === '2') {
      const t0 = performance.now();
      const m = await leaseManifestPacked(ctx, dev(req), param(req, 'id'));
      res.set('Server-Timing', `manifest;dur=${(performance.now() - t0).toFixed(0)}`);
      await sendInSlices(res.type('application/vnd.lethe.manifest'), m);
    } else res.json(await leaseManifest(ctx, dev(req), param(req, 'id')));
  });
  app.post('/v1/device/keys', rawJson, device, async (req: AuthedRequest, res) => {
    const b = json(wire.KeysRequest, req);
    const released = await releaseKeys(ctx, dev(req), b.leaseId, b.chunks, b.write ?? false, b.stateSize);
    crashPoint('keys.released');
    res.json(released);
  });
  app.post('/v1/device/chunks', rawJson, device, async (req: AuthedRequest, res) => {
    const b = json(wire.ChunksRequest, req);
    const served = await serveChunks(ctx, dev(req), b.leaseId, b.chunks);
    res.type('application/octet-stream').send(frames(served.map((s) => s.blob)));
  });
  app.post('/v1/device/leases/:id/checkin', rawUpload, device, async (req: AuthedRequest, res) => {
    const body: Buffer = Buffer.isBuffer(req.body) ? req.body : Buffer.alloc(0);
    const done = await checkin(ctx, dev(req), param(req, 'id'), parseChunkFrames(body), req.query.final !== '0', partQuery(req));
    crashPoint('checkin.done');
    res.json(done);
  });
  app.post('/v1/device/leases/:id/trace', rawTrace, device, async (req: AuthedRequest, res) => {
    const body: Buffer = Buffer.isBuffer(req.body) ? req.body : Buffer.alloc(0);
    res.status(201).json(await uploadTrace(ctx, dev(req), param(req, 'id'), req.get('content-type'), body));
  });
  app.get('/v1/device/leases/:id/prefetch', device, async (req: AuthedRequest, res) => {
    const { order, traces, curve } = await prefetchOrder(ctx, dev(req), param(req, 'id'));
    if (curve.length > 0) res.set(wire.HDR_TOUCH_CURVE, wire.encodeCurve(curve));
    res.set(wire.HDR_TRACES, String(traces)).type(wire.PAGES_CONTENT_TYPE).send(wire.encodePages(order));
  });
  app.get('/v1/device/chunks/:lease/:kind/:index', device, async (req: AuthedRequest, res) => {
    const [s] = await serveChunks(ctx, dev(req), param(req, 'lease'), [{ kind: kindParam(req), index: intParam(req, 'index') }]);
    res.set('x-lethe-gen', String(s.row.gen)).set('x-lethe-class', s.row.cls).type('application/octet-stream').send(s.blob);
  });

  // ---- admin routes (bearer token) ----
  const a = express.Router();
  // One budget of failed logins for the API and the console.
  const loginGuard = new LoginGuard(limits.loginFailures);
  loginRoute(ctx, a, loginGuard, json, rawJson);
  a.use(authFailureGuard, admin);
  accountRoutes(ctx, a, loginGuard, json, rawJson);
  a.post('/enroll-tokens', permit('devices.enroll'), rawJson, async (req, res) => {
    res.status(201).json(await mintEnrollToken(acting(req), json(wire.EnrollTokenRequest, req).ttlSeconds));
  });
  a.get('/devices', permit('devices.read'), async (_req, res) => {
    res.json({ devices: await listDevices(ctx) });
  });
  a.get('/devices/:id', permit('devices.read'), async (req, res) => {
    const id = (await mustGetDevice(ctx, param(req, 'id'))).id;
    res.json((await listDevices(ctx)).find((d) => d.id === id));
  });
  a.post('/devices/:id/revoke', permit('devices.act'), rawJson, async (req, res) => {
    res.json(await revokeDevice(acting(req), param(req, 'id')));
  });
  a.post('/devices/:id/wipe', permit('devices.act'), rawJson, async (req, res) => {
    res.json(await wipeDevice(acting(req), param(req, 'id')));
  });
  a.get('/commands/:id', permit('devices.read'), async (req, res) => {
    res.json(await commandStatus(ctx, param(req, 'id')));
  });
  a.post('/devices/:id/assignments', permit('devices.act'), rawJson, async (req, res) => {
    res.status(201).json(await assign(acting(req), param(req, 'id'), json(wire.AssignRequest, req).image));
  });
  a.delete('/devices/:id/assignments/:image', permit('devices.act'), async (req, res) => {
    res.json(await unassign(acting(req), param(req, 'id'), param(req, 'image')));
  });
  a.get('/images', permit('images.read'), async (_req, res) => {
    res.json({ images: await listImages(ctx) });
  });
  a.post('/images', permit('images.write'), rawJson, async (req, res) => {
    const b = json(wire.CreateImageRequest, req);
    res.status(201).json(await createImage(acting(req), b.name, b.policy));
  });
  a.post('/images/:name/versions', permit('images.write'), rawJson, async (req, res) => {
    res.status(201).json(await createVersion(acting(req), param(req, 'name'), json(wire.CreateVersionRequest, req).sizes));
  });
  a.put('/images/:name/versions/:version/chunks/:kind/:index', permit('images.write'), rawChunk, async (req, res) => {
    const body: Buffer = Buffer.isBuffer(req.body) ? req.body : Buffer.alloc(0);
    const r = await putChunks(acting(req), param(req, 'name'), intParam(req, 'version'), [{ kind: kindParam(req), index: intParam(req, 'index'), data: body }]);
    res.json({ stored: r.new ? 'new' : r.unchanged ? 'unchanged' : 'zero' });
  });
  a.post('/images/:name/versions/:version/chunks', permit('images.write'), rawUpload, async (req, res) => {
    const body: Buffer = Buffer.isBuffer(req.body) ? req.body : Buffer.alloc(0);
    res.json(await putChunks(acting(req), param(req, 'name'), intParam(req, 'version'), parseChunkFrames(body)));
  });
  a.get('/images/:name/versions/:version/hashes', permit('images.read'), async (req, res) => {
    res.json(await chunkHashes(ctx, param(req, 'name'), intParam(req, 'version')));
  });
  a.post('/images/:name/versions/:version/export', permit('images.write'), rawJson, async (req, res) => {
    const b = json(wire.ChunksRequest.omit({ leaseId: true }), req);
    res.type('application/octet-stream').send(await exportChunks(acting(req), param(req, 'name'), intParam(req, 'version'), b.chunks));
  });
  a.get('/images/:name/dedup-key', permit('images.write'), async (req, res) => {
    res.json({ key: await dedupKeyFor(ctx, param(req, 'name')) });
  });
  a.put('/images/:name/policy', permit('images.write'), rawJson, async (req, res) => {
    res.json(await setPolicy(acting(req), param(req, 'name'), json(wire.PolicyRequest, req).policy));
  });
  a.delete('/images/:name', permit('images.write'), async (req, res) => {
    res.json(await removeImage(acting(req), param(req, 'name')));
  });
  a.delete('/images/:name/versions/:version', permit('images.write'), async (req, res) => {
    res.json(await removeImage(acting(req), param(req, 'name'), intParam(req, 'version')));
  });
  a.post('/images/:name/versions/:version/commit', permit('images.write'), rawJson, async (req, res) => {
    const committed = await commitVersion(acting(req), param(req, 'name'), intParam(req, 'version'));
    crashPoint('push.committed');
    res.json(committed);
  });
  a.post('/images/:name/versions/:version/promote', permit('images.write'), rawJson, async (req, res) => {
    res.json(await promoteVersion(acting(req), param(req, 'name'), intParam(req, 'version')));
  });
  a.put('/images/:name/trusted/:device', permit('images.write'), rawJson, async (req, res) => {
    res.json(await setTrusted(acting(req), param(req, 'name'), param(req, 'device'), true));
  });
  a.delete('/images/:name/trusted/:device', permit('images.write'), async (req, res) => {
    res.json(await setTrusted(acting(req), param(req, 'name'), param(req, 'device'), false));
  });
  a.get('/images/:name/versions/:version/manifest', permit('images.read'), async (req, res) => {
    const img = await getImage(ctx, param(req, 'name'));
    res.json(await manifest(ctx, img, await getVersion(ctx, img, intParam(req, 'version'))));
  });
  a.post('/rotate/tls', permit('server.admin'), rawJson, async (req, res) => {
    const b = json(wire.RotateTlsRequest, req);
    res.json(b.finish ? await finishTls(acting(req)) : await announceTls(acting(req)));
  });
  a.post('/rotate/master', permit('server.admin'), rawJson, async (req, res) => {
    json(wire.RotateRequest, req);
    res.json(await rotateMaster(acting(req)));
  });
  a.get('/audit/verify', permit('audit.read'), async (req, res) => {
    res.json(await verifyAudit(ctx.db, { serverKey: ctx.data.signPublicKey, ...verifyQuery(req) }));
  });
  a.get('/audit/entries', permit('audit.read'), async (req, res) => {
    res.json({ entries: await auditEntries(ctx.db, auditFilter(req.query)) });
  });
  a.get('/audit/checkpoint', permit('audit.read'), async (_req, res) => {
    const cp = await ctx.audit.latestCheckpoint();
    if (!cp) throw new LetheError('NOT_FOUND', 'the audit log has no signed checkpoint yet');
    res.json(cp);
  });
  a.get('/audit/devices/:id', permit('audit.read'), async (req, res) => {
    const id = param(req, 'id');
    if (!/^[a-z0-9-]{1,64}$/.test(id)) throw new LetheError('BAD_REQUEST', `bad device id '${id}'`);
    const sinceParam = req.query.since;
    if (sinceParam !== undefined && typeof sinceParam !== 'string') throw new LetheError('BAD_REQUEST', 'give since once, as an ISO time or a duration ago');
    const since = sinceParam === undefined ? 0 : parseSince(sinceParam);
    res.json(await deviceReport(ctx.db, id, since));
  });
  app.use('/v1/admin', a);

  // ---- the admin console (browser sessions) ----
  const consoleHandle = consoleRoutes(ctx, loginGuard);
  app.locals.closeConsole = consoleHandle.close;
  app.get('/', (_req, res) => res.redirect(303, '/console'));
  app.use('/console', consoleHandle.router);

  app.use((req: Request) => {
    throw new LetheError('NOT_FOUND', `no route ${req.method} ${req.path}`);
  });
  app.use((err: unknown, req: Request, res: Response, _next: NextFunction) => {
    const e = toLetheError(err);
    if (e.code === 'ADMIN_AUTH_FAILED' || e.code === 'METRICS_AUTH_FAILED') authFailures?.take(clientAddress(req));
    if (e.code === 'INTERNAL') console.error(`lethe server: error: ${errorChain(err)}`);
    res.locals.code = e.code;
    // Refused before its body was read, for want of credentials or of budget: close the
    // connection rather than read and discard the rest (Node would drain it to keep it alive).
    if (!req.complete && (e.status === 401 || e.status === 415 || e.status === 429)) res.set('Connection', 'close');
    res.status(e.status).json(e.toJSON());
  });

  ctx.metrics.describe('lethe_http_requests_total', 'HTTP requests by route and status');
  ctx.metrics.describe('lethe_keys_released_total', 'chunk keys released to devices');
  ctx.metrics.describe('lethe_chunks_served_total', 'encrypted chunks served to devices');
  ctx.metrics.describe('lethe_manifests_total', 'packed manifests answered, made from the database or kept in memory');
  ctx.metrics.gauge(async () => {
    const rows = await listDevices(ctx);
    const count = (s: string) => rows.filter((d) => d.status === s).length;
    const audit = (await ctx.db.get<{ n: number }>('SELECT COUNT(*) AS n FROM audit'))!;
    return [
      ...gaugeLines(
        'lethe_devices',
        'enrolled devices by status',
        ['active', 'revoked', 'wipe-pending', 'wiped'].map((s) => [{ status: s }, count(s)]),
      ),
      ...gaugeLines('lethe_audit_entries', 'entries in the audit log', [[{}, audit.n]]),
    ];
  });
  return app;
}

export function toLetheError(err: unknown): LetheError {
  if (err instanceof LetheError) return err;
  const e = err as { type?: string; status?: number; message?: string };
  if (e?.type === 'entity.too.large') return new LetheError('BODY_TOO_LARGE', 'request body is too large');
  if (e?.type === 'encoding.unsupported') return new LetheError('UNSUPPORTED_ENCODING', 'content encoding is not accepted', { hint: 'send the body uncompressed' });
  if (typeof e?.status === 'number' && e.status >= 400 && e.status < 500) {
    return new LetheError('BAD_REQUEST', e.message ?? 'bad request', { status: e.status });
  }
  return new LetheError('INTERNAL', 'internal server error', { cause: err });
}
