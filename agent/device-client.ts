// Signed requests from this device to the server.
import { PinnedClient, type HttpResponse } from '../common/http-client.js';
import { signRequest } from '../common/signing.js';
import * as wire from '../common/wire.js';
import type { ChunkKind } from '../common/constants.js';
import type { Identity } from './identity.js';

export class DeviceClient {
  readonly http: PinnedClient;

  constructor(readonly id: Identity) {
    this.http = new PinnedClient(id.info.server, id.info.fingerprint, id.certPem);
  }

  async signed(method: string, path: string, body?: unknown): Promise<HttpResponse> {
    const buf = body === undefined ? Buffer.alloc(0) : Buffer.from(JSON.stringify(body));
    const headers: Record<string, string> = {
      ...signRequest(this.id.sign.secretKey, this.id.info.deviceId, method, path, buf),
      ...(body === undefined ? {} : { 'content-type': 'application/json' }),
    };
    return this.http.request(method, path, { body: body === undefined ? undefined : buf, headers });
  }

  async signedJson<T>(method: string, path: string, body?: unknown): Promise<T> {
    const res = await this.signed(method, path, body);
    return JSON.parse(res.body.toString('utf8')) as T;
  }

  heartbeat(status?: Record<string, unknown>) {
    return this.signedJson<wire.THeartbeatResponse>('POST', '/v1/device/heartbeat', status ? { status } : {});
  }

  ack(commandId: string, ok: boolean, detail?: string) {
    return this.signedJson<{ id: string; acked: boolean }>('POST', `/v1/device/commands/${encodeURIComponent(commandId)}/ack`, {
      ok,
      ...(detail ? { detail } : {}),
    });
  }

  lease(image: string) {
    return this.signedJson<wire.TLeaseResponse>('POST', '/v1/device/leases', { image });
  }

  renew(leaseId: string) {
    return this.signedJson<wire.TLeaseResponse>('POST', `/v1/device/leases/${encodeURIComponent(leaseId)}/renew`, {});
  }

  manifest(leaseId: string) {
    return this.signedJson<Manifest>('GET', `/v1/device/leases/${encodeURIComponent(leaseId)}/manifest`);
  }

  /** Chunk keys; with `write`, keys for new device-written content of those chunks (this lease's version). */
  keys(leaseId: string, chunks: { kind: ChunkKind; index: number }[], write = false, stateSize?: number) {
    return this.signedJson<wire.TKeysResponse>('POST', '/v1/device/keys', {
      leaseId,
      chunks,
      ...(write ? { write: true } : {}),
      ...(stateSize !== undefined ? { stateSize } : {}),
    });
  }

  /**
   * Uploads device-encrypted dirty chunks (upload frames); the final request commits them as a new
   * version, this device's own branch unless `shared` (docs/branches.md).
   */
  async checkin(leaseId: string, frames: Buffer, final: boolean): Promise<{ image: string; version: number; chunks: number; shared?: boolean }> {
    const path = `/v1/device/leases/${encodeURIComponent(leaseId)}/checkin?final=${final ? 1 : 0}`;
    return this.signedBinary(path, frames);
  }

  /** POSTs a binary body, signed, and parses the JSON answer. */
  private async signedBinary<T>(path: string, body: Buffer, contentType?: string): Promise<T> {
    const headers = { ...signRequest(this.id.sign.secretKey, this.id.info.deviceId, 'POST', path, body), ...(contentType ? { 'content-type': contentType } : {}) };
    const res = await this.http.request('POST', path, { body, headers });
    return JSON.parse(res.body.toString('utf8')) as T;
  }

  /** Fetches a batch of chunk blobs, in request order. */
  async chunks(leaseId: string, chunks: { kind: ChunkKind; index: number }[]): Promise<Buffer[]> {
    const res = await this.signed('POST', '/v1/device/chunks', { leaseId, chunks });
    const out: Buffer[] = [];
    let off = 0;
    while (off + 4 <= res.body.length) {
      const len = res.body.readUInt32BE(off);
      out.push(res.body.subarray(off + 4, off + 4 + len));
      off += 4 + len;
    }
    if (out.length !== chunks.length || off !== res.body.length) throw new Error('chunk batch reply is malformed');
    return out;
  }

  /** Uploads this lease's first-touch order of memory pages; a later upload for the same lease replaces it. */
  async uploadTrace(leaseId: string, pages: Uint32Array): Promise<wire.TTraceUploadResponse> {
    return this.signedBinary(`/v1/device/leases/${encodeURIComponent(leaseId)}/trace`, wire.encodePages(pages), wire.PAGES_CONTENT_TYPE);
  }

  /** The image's trace-learned order of memory pages to prefetch, best first; empty before any trace. */
  async prefetchOrder(leaseId: string): Promise<Uint32Array> {
    const res = await this.signed('GET', `/v1/device/leases/${encodeURIComponent(leaseId)}/prefetch`);
    try {
      return wire.decodePages(res.body);
    } catch (cause) {
      throw new Error('prefetch order reply is malformed', { cause });
    }
  }

  close(): void {
    this.http.close();
  }
}

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
