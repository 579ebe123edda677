// Many devices on the push channel at once, as light as the real protocol allows:
// each enrolled through the API with fresh keys (no sealing, no home), holding one
// WebSocket opened with a signed upgrade over the pinned certificate, checking
// the server's signature on each command and acknowledging it on the socket.
import fs from 'node:fs';
import WebSocket from 'ws';
import { b64u, boxKeyPair, signKeyPair } from '../../common/crypto.js';
import { PinnedClient } from '../../common/http-client.js';
import { openCommand, PUSH_PATH, type TPushCommand } from '../../common/push.js';
import { signRequest } from '../../common/signing.js';
import { admin } from './fixtures.js';
import type { ServerProc } from './proc.js';

export interface LightDevice {
  deviceId: string;
  ws?: WebSocket;
  /** Commands received and checked, in order, with when each arrived (ms, performance.now()). */
  got: { cmd: TPushCommand; at: number }[];
  /** Frames refused (bad signature, another device). */
  refused: number;
  sign: { publicKey: Buffer; secretKey: Buffer };
}

/** Enrolls `n` devices through the API (tokens minted in one go, enrollments `concurrency` at a time). */
export async function enrollLight(s: ServerProc, n: number, prefix = 'light', concurrency = 16): Promise<LightDevice[]> {
  const a = admin(s);
  const http = new PinnedClient(s.url, s.fingerprint);
  const out: LightDevice[] = [];
  try {
    let next = 0;
    const worker = async () => {
      while (next < n) {
        const i = next++;
        const { token } = await a.json<{ token: string }>('POST', '/enroll-tokens', {});
        const sign = signKeyPair();
        const box = boxKeyPair();
        const r = await http.json<{ deviceId: string }>('POST', '/v1/enroll', {
          token,
          name: `${prefix}-${i}`,
          signPublicKey: b64u.encode(sign.publicKey),
          boxPublicKey: b64u.encode(box.publicKey),
        });
        out[i] = { deviceId: r.deviceId, got: [], refused: 0, sign: { publicKey: Buffer.from(sign.publicKey), secretKey: Buffer.from(sign.secretKey) } };
      }
    };
    await Promise.all(Array.from({ length: concurrency }, worker));
    return out;
  } finally {
    a.close();
    http.close();
  }
}

/**
 * Opens each device's push channel (`concurrency` upgrades at a time); commands
 * are checked against `serverSignKey` and acknowledged on the socket.
 */
export async function connectLight(s: ServerProc, devices: LightDevice[], serverSignKey: Uint8Array, concurrency = 32): Promise<void> {
  const ca = await new PinnedClient(s.url, s.fingerprint).certificate();
  const url = s.url.replace(/^https:/, 'wss:') + PUSH_PATH;
  let next = 0;
  const worker = async () => {
    while (next < devices.length) {
      const d = devices[next++];
      const headers = signRequest(d.sign.secretKey, d.deviceId, 'GET', PUSH_PATH, Buffer.alloc(0));
      d.ws = await new Promise<WebSocket>((resolve, reject) => {
        // The pinned certificate is the only CA; its name is not checked (the pin is the identity), as PinnedClient does.
        const ws = new WebSocket(url, { headers, ca, checkServerIdentity: () => undefined, perMessageDeflate: false } as unknown as WebSocket.ClientOptions);
        ws.once('open', () => resolve(ws));
        ws.once('unexpected-response', (_q, res) => reject(new Error(`push upgrade refused: HTTP ${res.statusCode}`)));
        ws.once('error', reject);
      });
      d.ws.on('message', (data) => {
        const at = performance.now();
        const f = JSON.parse(data.toString()) as { t: string; body?: string; sig?: string };
        if (f.t !== 'cmd') return;
        try {
          const cmd = openCommand(serverSignKey, d.deviceId, { body: f.body, sig: f.sig });
          d.got.push({ cmd, at });
          d.ws!.send(JSON.stringify({ t: 'ack', id: cmd.id, ok: true }));
        } catch {
          d.refused++;
        }
      });
    }
  };
  await Promise.all(Array.from({ length: concurrency }, worker));
}

export function closeLight(devices: LightDevice[]): void {
  for (const d of devices) d.ws?.terminate();
}

/** The resident set of a process, in bytes (/proc/PID/status). */
export function rssOf(pid: number): number {
  const m = /VmRSS:\s+(\d+) kB/.exec(fs.readFileSync(`/proc/${pid}/status`, 'utf8'));
  return m ? Number(m[1]) * 1024 : 0;
}

/** A signed device call from a light device (the request signature every device call carries). */
export async function lightCall<T>(http: PinnedClient, d: LightDevice, method: string, p: string, body?: unknown): Promise<T> {
  const buf = body === undefined ? Buffer.alloc(0) : Buffer.from(JSON.stringify(body));
  const headers = { ...signRequest(d.sign.secretKey, d.deviceId, method, p, buf), ...(body === undefined ? {} : { 'content-type': 'application/json' }) };
  const res = await http.request(method, p, { body: body === undefined ? undefined : buf, headers });
  return JSON.parse(res.body.toString('utf8')) as T;
}

/**
 * The heartbeat path without the push channel: each device checks in every
 * `everyMs` (first at a random point of the period, as devices that started at
 * different times do), carries out what the answer brings, acknowledges it over
 * HTTP. Returns a function that stops the loops.
 */
export function heartbeatLight(http: PinnedClient, devices: LightDevice[], serverSignKey: Uint8Array, everyMs: number): () => void {
  const timers = new Set<NodeJS.Timeout>();
  let stopped = false;
  for (const d of devices) {
    const beat = async () => {
      if (stopped) return;
      try {
        const hb = await lightCall<{ commands: { signed: unknown }[] }>(http, d, 'POST', '/v1/device/heartbeat', {});
        const at = performance.now();
        for (const c of hb.commands) {
          const cmd = openCommand(serverSignKey, d.deviceId, c.signed);
          if (d.got.some((g) => g.cmd.seq === cmd.seq)) continue;
          d.got.push({ cmd, at });
          await lightCall(http, d, 'POST', `/v1/device/commands/${cmd.id}/ack`, { ok: true });
        }
      } catch {
        // the next beat tries again
      }
      if (!stopped) schedule(everyMs);
    };
    const schedule = (ms: number) => {
      const t = setTimeout(() => {
        timers.delete(t);
        void beat();
      }, ms);
      timers.add(t);
    };
    schedule(Math.random() * everyMs);
  }
  return () => {
    stopped = true;
    for (const t of timers) clearTimeout(t);
  };
}
