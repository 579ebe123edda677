// HTTPS client that trusts exactly one certificate: the one whose SHA-256
// fingerprint it was given (from an enrollment token or LETHE_PIN). The first
// connection fetches the certificate and checks the fingerprint; later ones
// trust only that certificate, and checkServerIdentity re-checks the pin on
// every handshake, before any request byte is sent.
import https from 'node:https';
import tls from 'node:tls';
import { X509Certificate } from 'node:crypto';
import { LetheError, type ErrorCode, ERROR_CODES } from './errors.js';
import { normalizeFingerprint } from './tokens.js';

export interface HttpResponse {
  status: number;
  headers: Record<string, string | string[] | undefined>;
  body: Buffer;
}

const fingerprintOf = (raw: Buffer): string => new X509Certificate(raw).fingerprint256.replace(/:/g, '').toLowerCase();

function unreachable(url: string, cause: unknown): LetheError {
  return new LetheError('SERVER_UNREACHABLE', `cannot reach the Lethe server at ${url}`, {
    cause,
    hint: 'check that the server is running and LETHE_SERVER (or --server) is right',
  });
}

function pinMismatch(url: string, got: string, want: string): LetheError {
  return new LetheError('PIN_MISMATCH', `the server at ${url} presented certificate ${got.slice(0, 16)}…, not the pinned ${want.slice(0, 16)}…`, {
    hint: 'someone may be intercepting the connection; check LETHE_PIN against the server fingerprint',
  });
}

/** TLS verification failures: the server presented a certificate outside the ones this client trusts. */
const UNTRUSTED = new Set(['DEPTH_ZERO_SELF_SIGNED_CERT', 'SELF_SIGNED_CERT_IN_CHAIN', 'UNABLE_TO_VERIFY_LEAF_SIGNATURE', 'CERT_SIGNATURE_FAILURE', 'UNABLE_TO_GET_ISSUER_CERT_LOCALLY']);
const untrusted = (e: unknown) => UNTRUSTED.has((e as { code?: string })?.code ?? '');

function pinRefused(url: string, want: string, cause: unknown): LetheError {
  return new LetheError('PIN_MISMATCH', `the server at ${url} presented a certificate that is not the pinned ${want.slice(0, 16)}…`, {
    cause,
    hint: 'someone may be intercepting the connection, or the server rotated its certificate while this device was away (enroll it again)',
  });
}

/** Connects once without trusting anything and returns the server's certificate PEM if it matches the pin. */
export function fetchPinnedCert(baseUrl: string, pin: string): Promise<string> {
  const u = new URL(baseUrl);
  const want = normalizeFingerprint(pin);
  return new Promise((resolve, reject) => {
    const sock = tls.connect({ host: u.hostname, port: Number(u.port || 443), rejectUnauthorized: false, servername: undefined });
    sock.setTimeout(10_000, () => sock.destroy(new Error('TLS handshake timed out')));
    sock.once('secureConnect', () => {
      const raw = sock.getPeerCertificate(false)?.raw;
      sock.end();
      if (!raw) return reject(unreachable(baseUrl, new Error('server sent no certificate')));
      const got = fingerprintOf(raw);
      if (got !== want) return reject(pinMismatch(baseUrl, got, want));
      resolve(new X509Certificate(raw).toString());
    });
    sock.once('error', (e) => reject(unreachable(baseUrl, e)));
  });
}

/** A second certificate a client trusts beside its pin: the server's announced next one (docs/fleet.md, Key rotation). */
export interface NextPin {
  pin: string;
  certPem: string;
}

export class PinnedClient {
  readonly baseUrl: string;
  readonly pin: string;
  private agent?: https.Agent;
  private certPem?: string;
  /** The fingerprint the server presented at the last handshake. */
  presented?: string;

  constructor(
    baseUrl: string,
    pin: string,
    certPem?: string,
    private readonly next?: NextPin,
  ) {
    this.baseUrl = baseUrl.replace(/\/+$/, '');
    this.pin = normalizeFingerprint(pin);
    this.certPem = certPem;
  }

  async certificate(): Promise<string> {
    this.certPem ??= await fetchPinnedCert(this.baseUrl, this.pin);
    return this.certPem;
  }

  /** What a TLS connection to this server trusts: the pinned certificate (and the announced next one), checked at every handshake. */
  async tlsOptions(): Promise<Pick<tls.ConnectionOptions, 'ca' | 'checkServerIdentity'>> {
    const ca = await this.certificate();
    const next = this.next ? normalizeFingerprint(this.next.pin) : undefined;
    return {
      ca: this.next ? [ca, this.next.certPem] : ca,
      checkServerIdentity: (_host, cert) => {
        const got = fingerprintOf(cert.raw);
        if (got !== this.pin && got !== next) return pinMismatch(this.baseUrl, got, this.pin);
        this.presented = got;
        return undefined;
      },
    };
  }

  /** A connection failure as the error a caller acts on: PIN_MISMATCH for a certificate outside the trusted ones, else SERVER_UNREACHABLE. */
  connectError(e: unknown): LetheError {
    return e instanceof LetheError ? e : untrusted(e) ? pinRefused(this.baseUrl, this.pin, e) : unreachable(this.baseUrl, e);
  }

  private async getAgent(): Promise<https.Agent> {
    if (this.agent) return this.agent;
    this.agent = new https.Agent({ keepAlive: true, maxSockets: 16, ...(await this.tlsOptions()) });
    return this.agent;
  }

  /** Sends a request; throws the server's LetheError for a 4xx/5xx with a JSON error body. */
  async request(method: string, path: string, opts: { body?: Buffer; headers?: Record<string, string> } = {}): Promise<HttpResponse> {
    const agent = await this.getAgent();
    const u = new URL(this.baseUrl + path);
    const res = await new Promise<HttpResponse>((resolve, reject) => {
      const req = https.request(
        {
          method,
          host: u.hostname,
          port: Number(u.port || 443),
          path: u.pathname + u.search,
          agent,
          headers: {
            ...(opts.body ? { 'content-type': 'application/octet-stream', 'content-length': String(opts.body.length) } : {}),
            ...opts.headers,
          },
        },
        (r) => {
          const parts: Buffer[] = [];
          r.on('data', (c: Buffer) => parts.push(c));
          r.on('end', () => resolve({ status: r.statusCode ?? 0, headers: r.headers, body: Buffer.concat(parts) }));
          r.on('error', reject);
        },
      );
      req.setTimeout(60_000, () => req.destroy(new Error('request timed out')));
      req.on('error', (e) => reject(this.connectError(e)));
      req.end(opts.body);
    });
    if (res.status >= 400) throw errorFromResponse(res);
    return res;
  }

  async json<T = unknown>(method: string, path: string, body?: unknown, headers?: Record<string, string>): Promise<T> {
    const buf = body === undefined ? undefined : Buffer.from(JSON.stringify(body));
    const res = await this.request(method, path, {
      body: buf,
      headers: { ...(buf ? { 'content-type': 'application/json' } : {}), ...headers },
    });
    return JSON.parse(res.body.toString('utf8')) as T;
  }

  close(): void {
    this.agent?.destroy();
  }
}

export function errorFromResponse(res: HttpResponse): LetheError {
  try {
    const j = JSON.parse(res.body.toString('utf8')) as { code?: string; message?: string; hint?: string };
    if (j.code && j.code in ERROR_CODES) {
      return new LetheError(j.code as ErrorCode, j.message ?? j.code, { hint: j.hint, status: res.status });
    }
  } catch {
    // not a Lethe error body; fall through
  }
  return new LetheError('INTERNAL', `server answered HTTP ${res.status}`, { status: res.status });
}
