// HTTP routes. Admin routes take a bearer token; device routes take signed
// requests. Every body is read raw (so signatures cover the exact bytes) and
// validated with the schemas in common/wire.ts.
import express, { type NextFunction, type Request, type Response } from 'express';
import type { z } from 'zod';
import { CHUNK_KINDS, MAX_CHUNK_BODY, MAX_JSON_BODY, MAX_UPLOAD_BODY, type ChunkKind } from '../common/constants.js';
import { parseSince } from '../common/duration.js';
import { LetheError, errorChain } from '../common/errors.js';
import * as wire from '../common/wire.js';
import { adminAuth, deviceAuth, type AuthedRequest } from './auth.js';
import { deviceReport, verifyChain } from './audit.js';
import type { Ctx } from './context.js';
import { ackCommand, enroll, heartbeat, listDevices, mintEnrollToken, mustGetDevice, revokeDevice, wipeDevice } from './devices.js';
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
  manifest,
  putChunks,
  removeImage,
  setPolicy,
} from './images.js';
import { parseChunkFrames } from '../common/frames.js';
import { promoteVersion, setTrusted } from './branches.js';
import { assign, checkin, grantLease, leaseManifest, releaseKeys, renewLease, serveChunks, unassign } from './leases.js';
import { gaugeLines } from './metrics.js';
import { MAX_TRACE_BODY, prefetchOrder, uploadTrace } from './traces.js';
import { q } from './db.js';

function json<T extends z.ZodTypeAny>(schema: T, req: Request): z.infer<T> {
  const raw: Buffer = Buffer.isBuffer(req.body) ? req.body : Buffer.alloc(0);
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

export function buildApp(ctx: Ctx): express.Express {
  const app = express();
  app.disable('x-powered-by');
  app.set('etag', false);
  const rawJson = express.raw({ type: () => true, limit: MAX_JSON_BODY });
  const rawChunk = express.raw({ type: () => true, limit: MAX_CHUNK_BODY });
  const rawUpload = express.raw({ type: () => true, limit: MAX_UPLOAD_BODY });
  const rawTrace = express.raw({ type: () => true, limit: MAX_TRACE_BODY });
  const admin = adminAuth(ctx);
  const device = deviceAuth(ctx);
  const deviceWipeOk = deviceAuth(ctx, { allowWipePending: true });
  const dev = (req: AuthedRequest) => req.device!;

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

  app.get('/healthz', (_req, res) => {
    q(ctx.db, 'SELECT 1').get();
    res.json({ ok: true });
  });
  app.get('/metrics', (_req, res) => {
    res.type('text/plain; version=0.0.4').send(ctx.metrics.render());
  });

  // ---- enrollment (token-authenticated) ----
  app.post('/v1/enroll', rawJson, (req, res) => {
    res.status(201).json(enroll(ctx, json(wire.EnrollRequest, req)));
  });

  // ---- device routes (signed) ----
  app.post('/v1/device/heartbeat', rawJson, deviceWipeOk, (req: AuthedRequest, res) => {
    json(wire.HeartbeatRequest, req);
    res.json(heartbeat(ctx, dev(req)));
  });
  app.post('/v1/device/commands/:id/ack', rawJson, deviceWipeOk, (req: AuthedRequest, res) => {
    const b = json(wire.AckRequest, req);
    res.json(ackCommand(ctx, dev(req), param(req, 'id'), b.ok, b.detail));
  });
  app.post('/v1/device/leases', rawJson, device, (req: AuthedRequest, res) => {
    res.status(201).json(grantLease(ctx, dev(req), json(wire.LeaseRequest, req).image));
  });
  app.post('/v1/device/leases/:id/renew', rawJson, device, (req: AuthedRequest, res) => {
    json(wire.HeartbeatRequest, req);
    res.json(renewLease(ctx, dev(req), param(req, 'id')));
  });
  app.get('/v1/device/leases/:id/manifest', device, (req: AuthedRequest, res) => {
    res.json(leaseManifest(ctx, dev(req), param(req, 'id')));
  });
  app.post('/v1/device/keys', rawJson, device, (req: AuthedRequest, res) => {
    const b = json(wire.KeysRequest, req);
    res.json(releaseKeys(ctx, dev(req), b.leaseId, b.chunks, b.write ?? false, b.stateSize));
  });
  app.post('/v1/device/chunks', rawJson, device, (req: AuthedRequest, res) => {
    const b = json(wire.ChunksRequest, req);
    const served = serveChunks(ctx, dev(req), b.leaseId, b.chunks);
    res.type('application/octet-stream').send(frames(served.map((s) => s.blob)));
  });
  app.post('/v1/device/leases/:id/checkin', rawUpload, device, (req: AuthedRequest, res) => {
    const body: Buffer = Buffer.isBuffer(req.body) ? req.body : Buffer.alloc(0);
    res.json(checkin(ctx, dev(req), param(req, 'id'), parseChunkFrames(body), req.query.final !== '0'));
  });
  app.post('/v1/device/leases/:id/trace', rawTrace, device, (req: AuthedRequest, res) => {
    const body: Buffer = Buffer.isBuffer(req.body) ? req.body : Buffer.alloc(0);
    res.status(201).json(uploadTrace(ctx, dev(req), param(req, 'id'), req.get('content-type'), body));
  });
  app.get('/v1/device/leases/:id/prefetch', device, (req: AuthedRequest, res) => {
    const { order, traces } = prefetchOrder(ctx, dev(req), param(req, 'id'));
    res.set(wire.HDR_TRACES, String(traces)).type(wire.PAGES_CONTENT_TYPE).send(wire.encodePages(order));
  });
  app.get('/v1/device/chunks/:lease/:kind/:index', device, (req: AuthedRequest, res) => {
    const [s] = serveChunks(ctx, dev(req), param(req, 'lease'), [{ kind: kindParam(req), index: intParam(req, 'index') }]);
    res.set('x-lethe-gen', String(s.row.gen)).set('x-lethe-class', s.row.cls).type('application/octet-stream').send(s.blob);
  });

  // ---- admin routes (bearer token) ----
  const a = express.Router();
  a.use(admin);
  a.post('/enroll-tokens', rawJson, (req, res) => {
    res.status(201).json(mintEnrollToken(ctx, json(wire.EnrollTokenRequest, req).ttlSeconds));
  });
  a.get('/devices', (_req, res) => {
    res.json({ devices: listDevices(ctx) });
  });
  a.get('/devices/:id', (req, res) => {
    const id = mustGetDevice(ctx, param(req, 'id')).id;
    res.json(listDevices(ctx).find((d) => d.id === id));
  });
  a.post('/devices/:id/revoke', rawJson, (req, res) => {
    res.json(revokeDevice(ctx, param(req, 'id')));
  });
  a.post('/devices/:id/wipe', rawJson, (req, res) => {
    res.json(wipeDevice(ctx, param(req, 'id')));
  });
  a.post('/devices/:id/assignments', rawJson, (req, res) => {
    res.status(201).json(assign(ctx, param(req, 'id'), json(wire.AssignRequest, req).image));
  });
  a.delete('/devices/:id/assignments/:image', (req, res) => {
    res.json(unassign(ctx, param(req, 'id'), param(req, 'image')));
  });
  a.get('/images', (_req, res) => {
    res.json({ images: listImages(ctx) });
  });
  a.post('/images', rawJson, (req, res) => {
    const b = json(wire.CreateImageRequest, req);
    res.status(201).json(createImage(ctx, b.name, b.policy));
  });
  a.post('/images/:name/versions', rawJson, (req, res) => {
    res.status(201).json(createVersion(ctx, param(req, 'name'), json(wire.CreateVersionRequest, req).sizes));
  });
  a.put('/images/:name/versions/:version/chunks/:kind/:index', rawChunk, (req, res) => {
    const body: Buffer = Buffer.isBuffer(req.body) ? req.body : Buffer.alloc(0);
    const r = putChunks(ctx, param(req, 'name'), intParam(req, 'version'), [{ kind: kindParam(req), index: intParam(req, 'index'), data: body }]);
    res.json({ stored: r.new ? 'new' : r.unchanged ? 'unchanged' : 'zero' });
  });
  a.post('/images/:name/versions/:version/chunks', rawUpload, (req, res) => {
    const body: Buffer = Buffer.isBuffer(req.body) ? req.body : Buffer.alloc(0);
    res.json(putChunks(ctx, param(req, 'name'), intParam(req, 'version'), parseChunkFrames(body)));
  });
  a.get('/images/:name/versions/:version/hashes', (req, res) => {
    res.json(chunkHashes(ctx, param(req, 'name'), intParam(req, 'version')));
  });
  a.post('/images/:name/versions/:version/export', rawJson, (req, res) => {
    const b = json(wire.ChunksRequest.omit({ leaseId: true }), req);
    res.type('application/octet-stream').send(exportChunks(ctx, param(req, 'name'), intParam(req, 'version'), b.chunks));
  });
  a.get('/images/:name/dedup-key', (req, res) => {
    res.json({ key: dedupKeyFor(ctx, param(req, 'name')) });
  });
  a.put('/images/:name/policy', rawJson, (req, res) => {
    res.json(setPolicy(ctx, param(req, 'name'), json(wire.PolicyRequest, req).policy));
  });
  a.delete('/images/:name', (req, res) => {
    res.json(removeImage(ctx, param(req, 'name')));
  });
  a.delete('/images/:name/versions/:version', (req, res) => {
    res.json(removeImage(ctx, param(req, 'name'), intParam(req, 'version')));
  });
  a.post('/images/:name/versions/:version/commit', rawJson, (req, res) => {
    res.json(commitVersion(ctx, param(req, 'name'), intParam(req, 'version')));
  });
  a.post('/images/:name/versions/:version/promote', rawJson, (req, res) => {
    res.json(promoteVersion(ctx, param(req, 'name'), intParam(req, 'version')));
  });
  a.put('/images/:name/trusted/:device', rawJson, (req, res) => {
    res.json(setTrusted(ctx, param(req, 'name'), param(req, 'device'), true));
  });
  a.delete('/images/:name/trusted/:device', (req, res) => {
    res.json(setTrusted(ctx, param(req, 'name'), param(req, 'device'), false));
  });
  a.get('/images/:name/versions/:version/manifest', (req, res) => {
    const img = getImage(ctx, param(req, 'name'));
    res.json(manifest(ctx, img, getVersion(ctx, img, intParam(req, 'version'))));
  });
  a.get('/audit/verify', (_req, res) => {
    res.json(verifyChain(ctx.db, ctx.data.signPublicKey));
  });
  a.get('/audit/devices/:id', (req, res) => {
    const id = param(req, 'id');
    if (!/^[a-z0-9-]{1,64}$/.test(id)) throw new LetheError('BAD_REQUEST', `bad device id '${id}'`);
    const since = typeof req.query.since === 'string' ? parseSince(req.query.since) : 0;
    res.json(deviceReport(ctx.db, id, since));
  });
  app.use('/v1/admin', a);

  app.use((req: Request) => {
    throw new LetheError('NOT_FOUND', `no route ${req.method} ${req.path}`);
  });
  app.use((err: unknown, _req: Request, res: Response, _next: NextFunction) => {
    const e = toLetheError(err);
    if (e.code === 'INTERNAL') console.error(`lethe server: error: ${errorChain(err)}`);
    res.locals.code = e.code;
    res.status(e.status).json(e.toJSON());
  });

  ctx.metrics.describe('lethe_http_requests_total', 'HTTP requests by route and status');
  ctx.metrics.describe('lethe_keys_released_total', 'chunk keys released to devices');
  ctx.metrics.describe('lethe_chunks_served_total', 'encrypted chunks served to devices');
  ctx.metrics.gauge(() => {
    const rows = listDevices(ctx);
    const count = (s: string) => rows.filter((d) => d.status === s).length;
    const audit = q(ctx.db, 'SELECT COUNT(*) AS n FROM audit').get() as { n: number };
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

function toLetheError(err: unknown): LetheError {
  if (err instanceof LetheError) return err;
  const e = err as { type?: string; status?: number; message?: string };
  if (e?.type === 'entity.too.large') return new LetheError('BODY_TOO_LARGE', 'request body is too large');
  if (typeof e?.status === 'number' && e.status >= 400 && e.status < 500) {
    return new LetheError('BAD_REQUEST', e.message ?? 'bad request', { status: e.status });
  }
  return new LetheError('INTERNAL', 'internal server error', { cause: err });
}
