// The two native helpers the memory-path benchmarks time faults with
// (build/native, made by native/Makefile):
//   fault-client  touches each page of a RAM file once (with the shim preloaded, as
//                 QEMU would have it) and prints each first touch's latency;
//   c-handler     the least a userfaultfd handler can do: the yardstick.
import { spawn } from 'node:child_process';
import { BUILD_DIR, shimEnv } from '../../native/index.js';
import path from 'node:path';

const CLIENT = path.join(BUILD_DIR, 'fault-client');
const C_HANDLER = path.join(BUILD_DIR, 'c-handler');

/** How to start a helper: e.g. under taskset. */
export type Wrap = (cmd: string, args: string[]) => [string, string[]];
const asIs: Wrap = (cmd, args) => [cmd, args];

/**
 * Runs fault-client over `pages` pages of a fresh RAM file; the first-touch latency of each page, in ns.
 * `stride` > 1 touches them scattered (page k·stride mod pages; keep it coprime with `pages`).
 */
export function timeClient(ram: string, pages: number, env: Record<string, string>, wrap: Wrap = asIs, stride = 1): Promise<number[]> {
  const [cmd, args] = wrap(CLIENT, [ram, String(pages)]);
  const p = spawn(cmd, args, { env: { ...process.env, ...env }, stdio: ['pipe', 'pipe', 'pipe'] });
  let out = '';
  let err = '';
  p.stdout.on('data', (d) => (out += d));
  p.stderr.on('data', (d) => (err += d));
  p.stdin.end(`time 0 ${pages} ${stride}\n`);
  return new Promise((resolve, reject) => {
    p.on('close', (code, signal) => {
      const line = /^latency_ns (.*)$/m.exec(out);
      if (code !== 0 || !line) return reject(new Error(`fault-client failed (${signal ?? `status ${code}`}): ${err.trim()}`));
      resolve(line[1].split(',').map(Number));
    });
  });
}

/** fault-client's first touches served by c-handler listening on `sock`. */
export async function timeCHandler(sock: string, ram: string, pages: number, wrap: { client?: Wrap; handler?: Wrap } = {}): Promise<number[]> {
  const [cmd, args] = (wrap.handler ?? asIs)(C_HANDLER, [sock]);
  const h = spawn(cmd, args, { stdio: ['ignore', 'pipe', 'pipe'] });
  let out = '';
  let err = '';
  h.stderr.on('data', (d) => (err += d));
  const ended = new Promise<void>((resolve, reject) =>
    h.on('close', (code) => (code === 0 ? resolve() : reject(new Error(`c-handler failed (status ${code}): ${err.trim()}`)))),
  );
  await new Promise<void>((resolve, reject) => {
    h.stdout.on('data', (d) => {
      out += d;
      if (out.includes('listening')) resolve();
    });
    void ended.catch(reject);
  });
  const lat = await timeClient(ram, pages, shimEnv(ram, sock), wrap.client);
  await ended;
  return lat;
}
