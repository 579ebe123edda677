// Admin connection settings: flags, else LETHE_SERVER / LETHE_ADMIN_TOKEN / LETHE_PIN.
import { LetheError } from '../common/errors.js';
import { PinnedClient } from '../common/http-client.js';

export interface AdminArgs {
  server?: string;
  adminToken?: string;
  pin?: string;
}

export class AdminClient {
  constructor(
    readonly http: PinnedClient,
    private readonly token: string,
  ) {}

  json<T = unknown>(method: string, path: string, body?: unknown): Promise<T> {
    return this.http.json<T>(method, `/v1/admin${path}`, body, { authorization: `Bearer ${this.token}` });
  }

  async put(path: string, body: Buffer): Promise<unknown> {
    const res = await this.http.request('PUT', `/v1/admin${path}`, {
      body,
      headers: { authorization: `Bearer ${this.token}` },
    });
    return JSON.parse(res.body.toString('utf8'));
  }

  async post(path: string, body: Buffer): Promise<unknown> {
    const res = await this.http.request('POST', `/v1/admin${path}`, {
      body,
      headers: { authorization: `Bearer ${this.token}` },
    });
    return JSON.parse(res.body.toString('utf8'));
  }

  async postBinary(path: string, json: unknown): Promise<Buffer> {
    const res = await this.http.request('POST', `/v1/admin${path}`, {
      body: Buffer.from(JSON.stringify(json)),
      headers: { authorization: `Bearer ${this.token}`, 'content-type': 'application/json' },
    });
    return res.body;
  }

  close(): void {
    this.http.close();
  }
}

export function adminClient(a: AdminArgs): AdminClient {
  const server = a.server ?? process.env.LETHE_SERVER;
  const token = a.adminToken ?? process.env.LETHE_ADMIN_TOKEN;
  const pin = a.pin ?? process.env.LETHE_PIN;
  const missing = [!server && 'LETHE_SERVER', !token && 'LETHE_ADMIN_TOKEN', !pin && 'LETHE_PIN'].filter(Boolean);
  if (missing.length > 0) {
    throw new LetheError('CONFIG', `admin commands need ${missing.join(', ')}`, {
      hint: "set them from the output of 'lethe server init' (or pass --server, --admin-token, --pin)",
    });
  }
  return new AdminClient(new PinnedClient(server!, pin!), token!);
}

/** Runs `fn` with an admin client built from flags or the environment, and closes it after. */
export async function withAdmin<T>(a: AdminArgs, fn: (c: AdminClient) => Promise<T>): Promise<T> {
  const c = adminClient(a);
  try {
    return await fn(c);
  } finally {
    c.close();
  }
}
