// The agent's control socket (agent.sock in the device home, 0600): one JSON
// request per line, one JSON reply per line. It reports state; it never
// carries keys or plaintext.
import fs from 'node:fs';
import net from 'node:net';
import path from 'node:path';
import { LetheError } from '../../common/errors.js';

export type Handler = (req: { cmd: string; [k: string]: unknown }) => Promise<unknown>;

export const socketPath = (home: string) => path.join(home, 'agent.sock');

export function serveControl(home: string, handle: Handler): net.Server {
  const file = socketPath(home);
  fs.rmSync(file, { force: true });
  const server = net.createServer((sock) => {
    let buf = '';
    sock.on('data', (d) => {
      buf += d.toString('utf8');
      if (buf.length > 65536) return sock.destroy();
      let nl: number;
      while ((nl = buf.indexOf('\n')) >= 0) {
        const line = buf.slice(0, nl);
        buf = buf.slice(nl + 1);
        let req: { cmd: string };
        try {
          req = JSON.parse(line) as { cmd: string };
          if (typeof req?.cmd !== 'string') throw new LetheError('BAD_REQUEST', "a control request names no 'cmd'");
        } catch {
          sock.write(JSON.stringify({ error: { code: 'BAD_REQUEST', message: 'control request is not {"cmd": …} JSON' } }) + '\n');
          continue;
        }
        handle(req).then(
          (r) => sock.write(JSON.stringify({ ok: r }) + '\n'),
          (e: unknown) => sock.write(JSON.stringify({ error: e instanceof LetheError ? e.toJSON() : { code: 'INTERNAL', message: String(e) } }) + '\n'),
        );
      }
    });
    sock.on('error', () => {});
  });
  server.listen(file);
  fs.chmodSync(file, 0o600);
  return server;
}

/** Sends one request to a running agent; throws CONFIG when none is listening. */
export function control<T>(home: string, req: { cmd: string; [k: string]: unknown }, timeoutMs = 30_000): Promise<T> {
  return new Promise((resolve, reject) => {
    const sock = net.connect(socketPath(home));
    let buf = '';
    const timer = setTimeout(() => {
      sock.destroy();
      reject(new LetheError('INTERNAL', 'the agent did not answer in time'));
    }, timeoutMs);
    sock.on('connect', () => sock.write(JSON.stringify(req) + '\n'));
    sock.on('data', (d) => {
      buf += d.toString('utf8');
      const nl = buf.indexOf('\n');
      if (nl < 0) return;
      clearTimeout(timer);
      sock.end();
      const msg = JSON.parse(buf.slice(0, nl)) as { ok?: T; error?: { code: string; message: string; hint?: string } };
      if (msg.error) reject(new LetheError(msg.error.code as never, msg.error.message, { hint: msg.error.hint }));
      else resolve(msg.ok as T);
    });
    sock.on('error', () => {
      clearTimeout(timer);
      reject(
        new LetheError('CONFIG', `no agent is running for '${home}'`, {
          hint: "start one with 'lethe agent run IMAGE'",
        }),
      );
    });
  });
}
