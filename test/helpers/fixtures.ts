// Test fixtures over the real HTTP API: enrolled devices and small images.
import { randomBytes } from 'node:crypto';
import { CHUNK_KINDS, CHUNK_SIZE, type ChunkKind } from '../../common/constants.js';
import { PinnedClient } from '../../common/http-client.js';
import { LetheError } from '../../common/errors.js';
import { AdminClient } from '../../cli/admin-client.js';
import { DeviceClient, type Manifest } from '../../agent/remote/device-client.js';
import { closeIdentity, enrollDevice, loadIdentity, type Identity } from '../../agent/keys/identity.js';
import { startAgent, type AgentOptions, type RunningAgent } from '../../agent/daemon/start.js';
import { fixedSecret, type Unlock } from '../../agent/keys/unlock.js';
import { startServer, tmpDir, TEST_PASSPHRASE, type ServerProc } from './proc.js';

/** Unseals a test device's keys: the passphrase every test device is sealed with. */
export function testUnlock(passphrase = TEST_PASSPHRASE): Unlock {
  return { ask: fixedSecret(passphrase) };
}

export function admin(s: ServerProc): AdminClient {
  return new AdminClient(new PinnedClient(s.url, s.fingerprint), s.adminToken);
}

/** One admin call on a client of its own (opened and closed around it). */
export async function adminCall<T>(s: ServerProc, method: string, p: string, body?: unknown): Promise<T> {
  const a = admin(s);
  try {
    return await a.json<T>(method, p, body);
  } finally {
    a.close();
  }
}

/** A device's audit entries, oldest first (GET /v1/admin/audit/devices/ID). */
export async function deviceAudit(s: ServerProc, deviceId: string): Promise<{ type: string; data: Record<string, unknown> }[]> {
  return (await adminCall<{ entries: { type: string; data: Record<string, unknown> }[] }>(s, 'GET', `/audit/devices/${deviceId}`)).entries;
}

export interface TestDevice {
  home: string;
  id: Identity;
  client: DeviceClient;
  deviceId: string;
  close(): void;
}

export async function enrolledDevice(s: ServerProc, name = 'laptop'): Promise<TestDevice> {
  const a = admin(s);
  try {
    const { token } = await a.json<{ token: string }>('POST', '/enroll-tokens', {});
    const home = tmpDir('lethe-home-');
    // Sealed as a real laptop's keys are (a passphrase, Argon2id), at the cheaper cost.
    await enrollDevice(home, token, name, { seal: 'passphrase', unlock: testUnlock(), argon2: 'interactive' });
    const id = await loadIdentity(home, testUnlock());
    const client = new DeviceClient(id);
    return { home, id, client, deviceId: id.info.deviceId, close: () => client.close() };
  } finally {
    a.close();
  }
}

export interface TestImage {
  name: string;
  version: number;
  plain: Record<ChunkKind, Buffer>;
}

/** Pushes an image through the admin API: `chunks` non-zero random chunks of each kind, plus zero chunks between. */
export async function pushImage(s: ServerProc, name: string, opts: { chunks?: number; policy?: string; plain?: Partial<Record<ChunkKind, Buffer>> } = {}): Promise<TestImage> {
  const n = opts.chunks ?? 4;
  const plain = {} as Record<ChunkKind, Buffer>;
  for (const kind of CHUNK_KINDS) {
    const given = opts.plain?.[kind];
    if (given) {
      plain[kind] = given;
      continue;
    }
    const size = CHUNK_SIZE[kind] * n * 2;
    const b = Buffer.alloc(size);
    for (let i = 0; i < n; i++) randomBytes(CHUNK_SIZE[kind]).copy(b, i * 2 * CHUNK_SIZE[kind]); // odd chunks stay zero
    plain[kind] = b;
  }
  const a = admin(s);
  try {
    const images = await a.json<{ images: { name: string }[] }>('GET', '/images');
    if (!images.images.some((i) => i.name === name)) await a.json('POST', '/images', { name, ...(opts.policy ? { policy: opts.policy } : {}) });
    const v = await a.json<{ version: number }>('POST', `/images/${name}/versions`, {
      sizes: { disk: plain.disk.length, mem: plain.mem.length, state: plain.state.length },
    });
    for (const kind of CHUNK_KINDS) {
      const cs = CHUNK_SIZE[kind];
      for (let i = 0; i * cs < plain[kind].length; i++) {
        await a.put(`/images/${name}/versions/${v.version}/chunks/${kind}/${i}`, plain[kind].subarray(i * cs, (i + 1) * cs));
      }
    }
    await a.json('POST', `/images/${name}/versions/${v.version}/commit`);
    return { name, version: v.version, plain };
  } finally {
    a.close();
  }
}

export async function assign(s: ServerProc, deviceId: string, image: string): Promise<void> {
  const a = admin(s);
  try {
    await a.json('POST', `/devices/${deviceId}/assignments`, { image });
  } finally {
    a.close();
  }
}

/** The LetheError a request was refused with; fails if it was not refused. */
export async function rejects(p: Promise<unknown>): Promise<LetheError> {
  try {
    await p;
  } catch (e) {
    if (e instanceof LetheError) return e;
    throw e;
  }
  throw new Error('expected the request to be refused');
}

/** An image pushed, a device enrolled and assigned to it, and an agent for it in this process holding a lease. */
export async function agentInProcess(
  s: ServerProc,
  image: string,
  push: Parameters<typeof pushImage>[2] = {},
  opts: Partial<AgentOptions> = {},
): Promise<{ agent: RunningAgent; home: string; img: TestImage }> {
  const img = await pushImage(s, image, push);
  const d = await enrolledDevice(s);
  await assign(s, d.deviceId, image);
  d.close();
  // No push channel unless asked: these agents learn of the server's orders at the call the server refuses.
  const agent = await startAgent({
    home: d.home,
    image,
    cacheBytes: 1 << 24,
    heartbeatMs: 30_000,
    prefetch: false,
    nbd: null,
    log: () => {},
    unlock: testUnlock(),
    push: false,
    ...opts,
  });
  try {
    await agent.lease.whenActive();
  } catch (e) {
    agent.stop();
    throw e;
  }
  return { agent, home: d.home, img };
}

/** `fn` with a client of its own on the identity of the device at `home` (beside its running agent's), closed after. */
export async function withDeviceClient<T>(home: string, fn: (c: DeviceClient) => Promise<T>): Promise<T> {
  const id = await loadIdentity(home, testUnlock());
  const client = new DeviceClient(id);
  try {
    return await fn(client);
  } finally {
    client.close();
    closeIdentity(id);
  }
}

export interface AgentSuite {
  s: ServerProc;
  agent: RunningAgent;
  home: string;
  img: TestImage;
}

/**
 * For one mocha suite: a real server and an agent in this process on a pushed
 * image (agentInProcess), set up in the suite's before() and stopped in its after().
 */
export function agentInProcessSuite(image: string, push: Parameters<typeof pushImage>[2] = {}): AgentSuite {
  const t = {} as AgentSuite;
  before(async () => {
    t.s = await startServer();
    Object.assign(t, await agentInProcess(t.s, image, push));
  });
  after(async () => {
    t.agent?.stop();
    await t.agent?.done;
    await t.s?.stop();
  });
  return t;
}

/** A lease's manifest in format 1 (JSON rows), as servers send it to agents that do not ask for format 2. */
export function jsonManifest(client: DeviceClient, leaseId: string): Promise<Manifest> {
  return client.signedJson<Manifest>('GET', `/v1/device/leases/${encodeURIComponent(leaseId)}/manifest`, undefined, leaseId);
}
