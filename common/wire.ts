// Request and response bodies of the HTTP API (docs/escrow-protocol.md).
// The server validates every request body with these; tests check responses.
import { z } from 'zod';
import { CHUNK_KINDS, SEAL_KINDS, EXPIRY_ACTIONS, FREE_PAGE_ACTIONS, MAX_BATCH, MEMORY_MODES, PREFETCH_ORDERS, SENSITIVITY_CLASSES, WIPE_ACTIONS } from './constants.js';
import { COMMAND_TYPES, SignedCommand as SignedCommandSchema } from './push.js';

const b64url = (bytes?: number) =>
  z
    .string()
    .regex(/^[A-Za-z0-9_-]*$/, 'must be base64url')
    .refine((s) => bytes === undefined || Buffer.from(s, 'base64url').length === bytes, `must be ${bytes} bytes`);

/** Longest first-touch trace a device uploads and the server accepts: 2 Mi pages (an 8 GiB guest touching every page). */
export const MAX_TRACE_PAGES = 2 * 1024 * 1024;

export const Id = z.string().regex(/^[a-z0-9][a-z0-9-]{0,63}$/, 'must be a lowercase id');
export const ImageName = z
  .string()
  .regex(/^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$/, 'must be 1-64 letters, digits, dot, dash or underscore');
export const Kind = z.enum(CHUNK_KINDS);
export const Cls = z.enum(SENSITIVITY_CLASSES);

export const EnrollRequest = z.strictObject({
  token: z.string().min(1).max(2048),
  name: z.string().min(1).max(128),
  signPublicKey: b64url(32),
  boxPublicKey: b64url(32),
  /** How the device keeps its identity keys at rest (docs/device-keys.md); absent from older agents: none. */
  seal: z.enum(SEAL_KINDS).optional(),
});
/** POST /v1/device/keys/rotate: the device's new public keys, and the new signing key's signature over them (docs/device-keys.md). */
export const RotateKeysRequest = z.strictObject({ signPublicKey: b64url(32), boxPublicKey: b64url(32), proof: b64url(64) });
/** POST /v1/admin/rotate/master: nothing to give. */
export const RotateRequest = z.strictObject({});
/** POST /v1/admin/rotate/tls: announce a new certificate, or (finish) serve the announced one. */
export const RotateTlsRequest = z.strictObject({ finish: z.boolean().optional() });
const userName = z.string().min(1).max(64);
const password = z.string().min(1).max(1024);
/** POST /v1/admin/login: a user's password (and TOTP code) for an API token. */
export const LoginRequest = z.strictObject({
  user: userName,
  password,
  totp: z.string().max(16).optional(),
  label: z.string().max(80).optional(),
  role: z.string().max(16).optional(),
  ttlSeconds: z.number().int().positive().max(366 * 86_400).optional(),
});
/** POST /v1/admin/users */
export const UserAddRequest = z.strictObject({ name: userName, role: z.string().max(16), password });
/** PUT /v1/admin/users/NAME/password */
export const PasswordRequest = z.strictObject({ password, currentPassword: password.optional(), totp: z.string().max(16).optional() });
export const EnrollResponse = z.object({ deviceId: z.string(), serverSignPublicKey: z.string() });

export const HeartbeatRequest = z.strictObject({ status: z.record(z.string(), z.unknown()).optional() });
/** A command the device has not acknowledged; `signed` is the same signed command the push channel carries (docs/push.md). */
export const Command = z.object({
  id: z.string(),
  type: z.enum(COMMAND_TYPES),
  seq: z.number().int().positive(),
  issuedAt: z.string(),
  signed: SignedCommandSchema,
});
/** A signed audit head (docs/audit-log.md): what devices and exports anchor. */
export const SignedCheckpoint = z.object({
  seq: z.number().int().positive(),
  hash: z.string().regex(/^[0-9a-f]{64}$/, 'must be 64 lowercase hex digits'),
  signature: b64url(64),
});
export type TSignedCheckpoint = z.infer<typeof SignedCheckpoint>;
export const HeartbeatResponse = z.object({
  serverTime: z.string(),
  status: z.string(),
  commands: z.array(Command),
  /** The newest signed audit head; absent from a server that predates it. */
  checkpoint: SignedCheckpoint.optional(),
  /** A certificate the server will serve next, signed by its key (docs/fleet.md, Key rotation): pin it beside the current one. */
  nextTls: z.object({ cert: z.string().max(16_384), fingerprint: z.string().regex(/^[0-9a-f]{64}$/), signature: z.string().max(200) }).optional(),
});

export const AckRequest = z.strictObject({
  ok: z.boolean(),
  detail: z.string().max(1024).optional(),
  /** Milliseconds from the command's arrival on the device to its keys zeroed. */
  zeroedAfterMs: z.number().int().nonnegative().max(86_400_000).optional(),
});
/** A revoked device saying it erased its keys and cache (docs/escrow-protocol.md, "Device status"). */
export const RevokeAckRequest = z.strictObject({
  detail: z.string().max(1024).optional(),
  zeroedAfterMs: z.number().int().nonnegative().max(86_400_000).optional(),
});
export const RevokeAckResponse = z.object({ id: z.string(), status: z.string(), acknowledgedAt: z.string() });

export const LeaseRequest = z.strictObject({ image: ImageName });
/**
 * The parts of an image's policy the agent acts on (policies/schema.ts Policy, whose
 * other fields parsing strips).
 */
export const AgentPolicy = z.object({
  memoryMode: z.enum(MEMORY_MODES),
  processes: z.array(z.string()),
  cgroups: z.array(z.string()),
  files: z.array(z.string()),
  freePages: z.enum(FREE_PAGE_ACTIONS),
  evictIdleMs: z.number().positive(),
  evictBudgetBytes: z.number().int().min(0).nullable(),
  dropGuestCache: z.boolean(),
  onLeaseExpiry: z.enum(EXPIRY_ACTIONS),
  onWipe: z.enum(WIPE_ACTIONS),
  prefetchStartupBytes: z.number().int().min(0),
  /** `prefetch.startup: auto`: the agent sizes the startup buffer by the link and the touch curve (prefetchStartupBytes when it has no curve). */
  prefetchStartupAuto: z.boolean().default(false),
  prefetchOrder: z.enum(PREFETCH_ORDERS),
  prefetchBandwidth: z.number().min(0).nullable(),
  hintIntervalMs: z.number().min(0),
});
export type TAgentPolicy = z.infer<typeof AgentPolicy>;

export const LeaseResponse = z.object({
  leaseId: z.string(),
  image: z.string(),
  imageId: z.string(),
  version: z.number().int(),
  expiresAt: z.string(),
  renewAfter: z.string(),
  ttlSeconds: z.number(),
  classKeys: z.array(z.object({ gen: z.number().int(), sealed: z.string() })),
  /** The draft generation this device's earlier writes on this version belong to (see check-in). */
  writeGen: z.number().int().optional(),
  /** The image policy's eviction idle time: sensitive guest pages resident longer are evicted. */
  evictIdleSeconds: z.number().positive().optional(),
  /** What the agent does under the image's policy (docs/policies.md); absent from older servers. */
  policy: AgentPolicy.optional(),
});


export const ChunkRef = z.strictObject({ kind: Kind, index: z.number().int().min(0).max(2 ** 40) });
export const KeysRequest = z.strictObject({
  leaseId: Id,
  chunks: z.array(ChunkRef).min(1).max(MAX_BATCH),
  /** Keys to encrypt new content the device writes (generation = the lease's version). */
  write: z.boolean().optional(),
  /**
   * With write: the new size of the device state (suspend writes a new one); the
   * lease's draft version takes it, and its state is replaced whole at check-in.
   */
  stateSize: z.number().int().min(1).max(2 ** 30).optional(),
});
export const KeysResponse = z.object({
  sealed: z.string(),
  chunks: z.array(z.object({ kind: Kind, index: z.number(), gen: z.number(), cls: Cls })),
});
export const ChunksRequest = z.strictObject({ leaseId: Id, chunks: z.array(ChunkRef).min(1).max(MAX_BATCH) });

export const EnrollTokenRequest = z.strictObject({ ttlSeconds: z.number().int().min(1).max(30 * 86400).optional() });
export const AssignRequest = z.strictObject({ image: ImageName });
export const PolicyRequest = z.strictObject({ policy: z.string().max(65536).nullable() });
export const CreateImageRequest = z.strictObject({ name: ImageName, policy: z.string().max(65536).optional() });
export const CreateVersionRequest = z.strictObject({
  sizes: z.strictObject({
    disk: z.number().int().min(0).max(2 ** 44),
    mem: z.number().int().min(0).max(2 ** 40),
    state: z.number().int().min(0).max(2 ** 30),
  }),
});

/** `POST /v1/admin/images/:name/versions/:v/promote` (docs/branches.md). */
export const PromoteResponse = z.strictObject({
  image: z.string(),
  version: z.number().int(),
  /** The device whose check-in made the branch. */
  device: z.string(),
  /** The shared version before (equal to `version` when nothing changed). */
  previous: z.number().int().nullable(),
  changed: z.boolean(),
});
/** `PUT` / `DELETE /v1/admin/images/:name/trusted/:device` (docs/branches.md). */
export const TrustResponse = z.strictObject({ image: z.string(), device: z.string(), trusted: z.boolean(), changed: z.boolean() });

export type TEnrollRequest = z.infer<typeof EnrollRequest>;
export type TLeaseResponse = z.infer<typeof LeaseResponse>;
export type TKeysResponse = z.infer<typeof KeysResponse>;
export type THeartbeatResponse = z.infer<typeof HeartbeatResponse>;
export type TRevokeAckResponse = z.infer<typeof RevokeAckResponse>;

// ---- trace-learned prefetch order (docs/prefetch.md) ----

/**
 * A page list on the wire (trace upload body, prefetch order reply): memory
 * chunk indices as little-endian uint32, 4 bytes each, nothing else.
 */
export const PAGES_CONTENT_TYPE = 'application/octet-stream';
/** Reply header of the prefetch order: how many stored traces it was built from. */
export const HDR_TRACES = 'x-lethe-traces';
/**
 * A trace upload with first-touch times: the page list as above, then as many
 * little-endian uint32 times, each that page's first touch in ms of the guest's own
 * time (since it started, less its vCPUs' waits on faults), not decreasing.
 */
export const TIMED_TRACE_CONTENT_TYPE = 'application/vnd.lethe.timed-trace';
/**
 * Reply header of the prefetch order, when traces came with times: how fast guests
 * of the image took their first touches, as "count:ms" pairs (ascending, at most
 * MAX_CURVE_POINTS): by `ms` after starting, a guest had touched `count` pages — the
 * earliest over the traces. The agent sizes its startup buffer by it (`prefetch.startup: auto`).
 */
export const HDR_TOUCH_CURVE = 'x-lethe-touch-curve';
export const MAX_CURVE_POINTS = 128;

/** A touch curve: [count, ms] pairs, both ascending. */
export type TouchCurve = [count: number, ms: number][];

export function encodeCurve(curve: TouchCurve): string {
  return curve.map(([k, t]) => `${k}:${t}`).join(',');
}

/** Throws a plain Error for a malformed curve; callers add context. */
export function parseCurve(header: string): TouchCurve {
  if (header.trim() === '') return [];
  const curve = header.split(',').map((pair): [number, number] => {
    const m = /^\s*(\d{1,10}):(\d{1,10})\s*$/.exec(pair);
    if (!m) throw new Error(`'${pair}' is not a count:ms pair`);
    return [Number(m[1]), Number(m[2])];
  });
  if (curve.length > MAX_CURVE_POINTS) throw new Error(`${curve.length} points, more than ${MAX_CURVE_POINTS}`);
  for (let i = 1; i < curve.length; i++) {
    if (curve[i][0] <= curve[i - 1][0] || curve[i][1] < curve[i - 1][1]) throw new Error(`point ${i} does not follow point ${i - 1}`);
  }
  return curve;
}

export const TraceUploadResponse = z.object({
  image: z.string(),
  version: z.number().int(),
  pages: z.number().int().positive(),
  /** Traces the server now keeps for this image, this one included. */
  kept: z.number().int().positive(),
});
export type TTraceUploadResponse = z.infer<typeof TraceUploadResponse>;

const littleEndianHost = new Uint8Array(new Uint32Array([1]).buffer)[0] === 1;

export function encodePages(pages: Uint32Array): Buffer {
  const out = Buffer.from(new Uint8Array(pages.buffer, pages.byteOffset, pages.byteLength));
  return littleEndianHost ? out : out.swap32();
}

/** Throws a plain Error when the length is not a multiple of 4; callers add context. */
export function decodePages(body: Uint8Array): Uint32Array {
  if (body.length % 4 !== 0) throw new Error(`${body.length} bytes is not a whole number of 4-byte page indices`);
  // A copy: the body's offset need not be 4-byte aligned for a Uint32Array view.
  const pages = new Uint32Array(body.length / 4);
  const bytes = new Uint8Array(pages.buffer);
  bytes.set(body);
  if (!littleEndianHost) Buffer.from(pages.buffer).swap32();
  return pages;
}
