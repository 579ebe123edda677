// Signed requests from this device to the server. Every answer that refuses
// the device (revoked, wiped, wipe pending) or ends one of its leases, to any
// call, is also reported as a 'refused' event, so one place acts on it
// (the lease keeper's refused path) whichever part made the call.
import { EventEmitter } from 'node:events';
import { LetheError, type ErrorCode } from '../../common/errors.js';
import WebSocket from 'ws';
import { errorFromResponse, PinnedClient, type HttpResponse, type NextPin } from '../../common/http-client.js';
import { PUSH_PATH } from '../../common/push.js';
import { isPackedManifest } from '../../common/manifest.js';
import { keepNextPin, promoteNextPin, readNextPin } from './pins.js';
import { signRequest } from '../../common/signing.js';
import * as wire from '../../common/wire.js';
import type { ChunkKind } from '../../common/constants.js';
import type { Identity } from '../keys/identity.js';
import { backoffMs, sleep } from './backoff.js';

/** Answers that refuse the device itself, whatever it asked. */
export const DEVICE_REFUSALS: readonly ErrorCode[] = ['DEVICE_REVOKED', 'DEVICE_WIPED', 'DEVICE_WIPE_PENDING'];
/** Answers to a call on a lease that say the lease is over (unassigned, ended, expired, gone). */
export const LEASE_REFUSALS: readonly ErrorCode[] = ['NOT_ASSIGNED', 'LEASE_EXPIRED', 'UNKNOWN_LEASE'];

/** A refusal as reported: the error, and the lease the refused call was on (if any). */
export interface Refusal {
  error: LetheError;
  leaseId?: string;
}

/** Answers after which the same request goes to the next server URL (or again, after a pause, to the only one). */
const FAILOVER_CODES: readonly ErrorCode[] = ['SERVER_UNREACHABLE', 'DATABASE_UNAVAILABLE'];
/** Tries of one request beyond the first, with pauses of 100, 200, 400… ms (capped at 1 s) once every URL was tried. */
const FAILOVER_RETRIES = 4;
const FAILOVER_PAUSE_MS = 100;
const FAILOVER_PAUSE_MAX_MS = 1_000;

export class DeviceClient extends EventEmitter<{ refused: [Refusal] }> {
  /** One client per server URL the device was enrolled with (the replicas share one certificate). */
  private readonly servers: PinnedClient[];
  /** The URL that answered last: requests go there first. */
  private current = 0;
  /** The server's announced next certificate, trusted beside the pin. */
  private next?: NextPin;

  constructor(readonly id: Identity) {
    super();
    const urls = [...new Set([id.info.server, ...(id.info.servers ?? [])])];
    this.next = readNextPin(id.home);
    this.servers = urls.map((u) => new PinnedClient(u, id.info.fingerprint, id.certPem, this.next));
  }

  /** The client of the server URL requests go to now. */
  get http(): PinnedClient {
    return this.servers[this.current];
  }

  /**
   * A signed request; `leaseId` names the lease it is on, for the 'refused' event.
   * A server that cannot be reached, or cannot reach its database, gets the request
   * again at the next URL (signed anew: a replica never sees a nonce twice).
   */
  async signed(method: string, path: string, body?: unknown, leaseId?: string): Promise<HttpResponse> {
    const buf = body === undefined ? Buffer.alloc(0) : Buffer.from(JSON.stringify(body));
    for (let attempt = 0; ; attempt++) {
      const headers: Record<string, string> = {
        ...signRequest(this.id.sign.secretKey, this.id.info.deviceId, method, path, buf),
        ...(body === undefined ? {} : { 'content-type': 'application/json' }),
      };
      try {
        return await this.reporting(this.http.request(method, path, { body: body === undefined ? undefined : buf, headers }), leaseId);
      } catch (e) {
        if (!(e instanceof LetheError) || !FAILOVER_CODES.includes(e.code) || attempt >= Math.max(FAILOVER_RETRIES, this.servers.length)) throw e;
        this.current = (this.current + 1) % this.servers.length;
        // Every URL tried once: pause before the next round (a replica restarting, a balancer noticing).
        const round = Math.floor((attempt + 1) / this.servers.length);
        if ((attempt + 1) % this.servers.length === 0) {
          await sleep(backoffMs(FAILOVER_PAUSE_MS, FAILOVER_PAUSE_MAX_MS, round - 1));
        }
      }
    }
  }

  async signedJson<T>(method: string, path: string, body?: unknown, leaseId?: string): Promise<T> {
    const res = await this.signed(method, path, body, leaseId);
    return JSON.parse(res.body.toString('utf8')) as T;
  }

  /** Reports a refusal of the device, or of the lease the call was on, before the caller sees it. */
  private async reporting<T>(p: Promise<T>, leaseId?: string): Promise<T> {
    try {
      return await p;
    } catch (e) {
      if (e instanceof LetheError && (DEVICE_REFUSALS.includes(e.code) || (leaseId !== undefined && LEASE_REFUSALS.includes(e.code)))) {
        this.emit('refused', { error: e, leaseId });
      }
      throw e;
    }
  }

  /**
   * Checks in. A certificate the server announced (signed by its pinned key) is
   * trusted beside the current one from now on; once a server presents it, it is
   * the device's only pin (agent/remote/pins.ts). `pinProblem` says why an announced one was refused.
   */
  async heartbeat(status?: Record<string, unknown>): Promise<wire.THeartbeatResponse & { pinProblem?: string }> {
    const hb = await this.signedJson<wire.THeartbeatResponse>('POST', '/v1/device/heartbeat', status ? { status } : {});
    const kept = keepNextPin(this.id.home, this.id.info.serverSignPublicKey, hb.nextTls);
    if (kept.pin && !this.next) this.trustNext(kept.pin);
    if (promoteNextPin(this.id.home, this.http.presented)) this.next = undefined;
    return kept.problem ? { ...hb, pinProblem: kept.problem } : hb;
  }

  /** Trusts `next` beside the pinned certificate on every server URL, from the next connection on. */
  private trustNext(next: NextPin): void {
    this.next = next;
    const urls = this.servers.map((c) => c.baseUrl);
    for (const c of this.servers) c.close();
    this.servers.splice(0, this.servers.length, ...urls.map((u) => new PinnedClient(u, this.id.info.fingerprint, this.id.certPem, next)));
  }

  /** Acknowledges a command; `zeroedAfterMs`: from its arrival to keys zeroed and sensitive plaintext gone. */
  ack(commandId: string, ok: boolean, detail?: string, zeroedAfterMs?: number) {
    return this.signedJson<{ id: string; acked: boolean }>('POST', `/v1/device/commands/${encodeURIComponent(commandId)}/ack`, {
      ok,
      ...(detail ? { detail } : {}),
      ...(zeroedAfterMs !== undefined ? { zeroedAfterMs: Math.round(zeroedAfterMs) } : {}),
    });
  }

  /** Tells the server this revoked device erased its keys and cache (docs/escrow-protocol.md, "Device status"). */
  ackRevoke(detail?: string, zeroedAfterMs?: number) {
    return this.signedJson<wire.TRevokeAckResponse>('POST', '/v1/device/revoke/ack', {
      ...(detail ? { detail } : {}),
      ...(zeroedAfterMs !== undefined ? { zeroedAfterMs: Math.round(zeroedAfterMs) } : {}),
    });
  }

  /**
   * Opens the push channel (docs/push.md) to the current server URL: a WebSocket
   * whose upgrade request is signed like every call, over the pinned TLS. A
   * refusal of the device is reported like any call's.
   */
  async openPush(): Promise<WebSocket> {
    const client = this.http;
    const tlsOpts = await client.tlsOptions();
    const headers = signRequest(this.id.sign.secretKey, this.id.info.deviceId, 'GET', PUSH_PATH, Buffer.alloc(0));
    const url = client.baseUrl.replace(/^https:/, 'wss:') + PUSH_PATH;
    const opened = new Promise<WebSocket>((resolve, reject) => {
      const ws = new WebSocket(url, { headers, ...tlsOpts, perMessageDeflate: false, handshakeTimeout: 10_000, maxPayload: 64 * 1024 });
      ws.once('open', () => resolve(ws));
      ws.once('unexpected-response', (_req, res) => {
        const parts: Buffer[] = [];
        res.on('data', (c: Buffer) => parts.push(c));
        res.on('end', () => {
          reject(errorFromResponse({ status: res.statusCode ?? 0, headers: res.headers, body: Buffer.concat(parts) }));
          ws.terminate();
        });
        res.on('error', (e) => reject(client.connectError(e)));
      });
      ws.once('error', (e) => reject(client.connectError(e)));
    });
    return this.reporting(opened);
  }

  /** Requests go to the next server URL from now on (the push channel's failover). */
  nextServer(): void {
    this.current = (this.current + 1) % this.servers.length;
  }

  lease(image: string) {
    return this.signedJson<wire.TLeaseResponse>('POST', '/v1/device/leases', { image });
  }

  renew(leaseId: string) {
    return this.signedJson<wire.TLeaseResponse>('POST', `/v1/device/leases/${encodeURIComponent(leaseId)}/renew`, {}, leaseId);
  }

  /** The lease's manifest as the server sends it: packed (format 2), or the JSON of a server before it; checked by AgentCore.setManifest. */
  async manifest(leaseId: string): Promise<WireManifest> {
    const res = await this.signed('GET', `/v1/device/leases/${encodeURIComponent(leaseId)}/manifest?format=2`, undefined, leaseId);
    return isPackedManifest(res.body) ? res.body : (JSON.parse(res.body.toString('utf8')) as Manifest);
  }

  /** Chunk keys; with `write`, keys for new device-written content of those chunks (this lease's version). */
  keys(leaseId: string, chunks: { kind: ChunkKind; index: number }[], write = false, stateSize?: number) {
    return this.signedJson<wire.TKeysResponse>('POST', '/v1/device/keys', {
      leaseId,
      chunks,
      ...(write ? { write: true } : {}),
      ...(stateSize !== undefined ? { stateSize } : {}),
    }, leaseId);
  }

  /**
   * Uploads device-encrypted dirty chunks (upload frames); the final request commits them as a new
   * version, this device's own branch unless `shared` (docs/branches.md).
   */
  async checkin(leaseId: string, frames: Buffer, final: boolean, part?: number): Promise<{ image: string; version: number; chunks: number; shared?: boolean }> {
    const path = `/v1/device/leases/${encodeURIComponent(leaseId)}/checkin?final=${final ? 1 : 0}${part === undefined ? '' : `&part=${part}`}`;
    return this.signedBinary(path, frames, undefined, leaseId);
  }

  /** POSTs a binary body, signed, and parses the JSON answer. */
  private async signedBinary<T>(path: string, body: Buffer, contentType: string | undefined, leaseId: string): Promise<T> {
    const headers = { ...signRequest(this.id.sign.secretKey, this.id.info.deviceId, 'POST', path, body), ...(contentType ? { 'content-type': contentType } : {}) };
    const res = await this.reporting(this.http.request('POST', path, { body, headers }), leaseId);
    return JSON.parse(res.body.toString('utf8')) as T;
  }

  /** Fetches a batch of chunk blobs, in request order. */
  async chunks(leaseId: string, chunks: { kind: ChunkKind; index: number }[]): Promise<Buffer[]> {
    const res = await this.signed('POST', '/v1/device/chunks', { leaseId, chunks }, leaseId);
    const out: Buffer[] = [];
    let off = 0;
    while (off + 4 <= res.body.length) {
      const len = res.body.readUInt32BE(off);
      out.push(res.body.subarray(off + 4, off + 4 + len));
      off += 4 + len;
    }
    if (out.length !== chunks.length || off !== res.body.length) throw new LetheError('INTERNAL', "the server's chunk batch reply is malformed");
    return out;
  }

  /** Uploads this lease's first-touch order of memory pages; a later upload for the same lease replaces it. */
  /** Uploads a first-touch trace; with `times` (ms of the guest's own time, one per page) a timed one. */
  async uploadTrace(leaseId: string, pages: Uint32Array, times?: Uint32Array): Promise<wire.TTraceUploadResponse> {
    if (times && times.length !== pages.length) throw new RangeError(`uploadTrace: ${times.length} times for ${pages.length} pages`);
    const body = times ? Buffer.concat([wire.encodePages(pages), wire.encodePages(times)]) : wire.encodePages(pages);
    return this.signedBinary(`/v1/device/leases/${encodeURIComponent(leaseId)}/trace`, body, times ? wire.TIMED_TRACE_CONTENT_TYPE : wire.PAGES_CONTENT_TYPE, leaseId);
  }

  /**
   * The image's trace-learned order of memory pages to prefetch, best first (empty
   * before any trace), and the touch curve of its timed traces (empty without).
   */
  async prefetchOrder(leaseId: string): Promise<{ order: Uint32Array; curve: wire.TouchCurve }> {
    const res = await this.signed('GET', `/v1/device/leases/${encodeURIComponent(leaseId)}/prefetch`, undefined, leaseId);
    try {
      const header = res.headers[wire.HDR_TOUCH_CURVE];
      return { order: wire.decodePages(res.body), curve: typeof header === 'string' ? wire.parseCurve(header) : [] };
    } catch (cause) {
      throw new LetheError('INTERNAL', "the server's prefetch order reply is malformed", { cause });
    }
  }

  close(): void {
    for (const c of this.servers) c.close();
  }
}

/** A manifest on the wire: format 2 (common/manifest.ts) or a format-1 JSON one. */
export type WireManifest = Buffer | Manifest;

export interface Manifest {
  format: number;
  image: string;
  imageId: string;
  version: number;
  sizes: { disk: number; mem: number; state: number };
  chunkSizes: Record<ChunkKind, number>;
  chunks: Record<ChunkKind, [number, number, 'sensitive' | 'normal', string][]>;
  signature: string;
}
