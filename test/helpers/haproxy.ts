// HAProxy (Debian's haproxy) in front of server replicas, as docs/fleet.md deploys
// it: TCP passthrough (each replica terminates TLS with the one certificate
// devices pin), health-checked on /healthz over TLS, a connection that finds a
// replica down sent to another.
import { spawn, type ChildProcess } from 'node:child_process';
import fs from 'node:fs';
import net from 'node:net';
import path from 'node:path';
import { tmpDir } from './proc.js';

export interface Balancer {
  url: string;
  proc: ChildProcess;
  /** Connections each replica (r1, r2, …) was given so far, from HAProxy's stats socket. */
  sessions(): Promise<Record<string, number>>;
  log(): string;
  stop(): Promise<void>;
}

async function freePort(): Promise<number> {
  const srv = net.createServer();
  await new Promise<void>((r) => srv.listen(0, '127.0.0.1', () => r()));
  const port = (srv.address() as net.AddressInfo).port;
  await new Promise((r) => srv.close(r));
  return port;
}

/** The configuration docs/fleet.md shows, for replicas at `backends` (host:port). */
export function haproxyConfig(port: number, backends: string[], statsSocket?: string): string {
  return [
    'global',
    '  maxconn 4096',
    ...(statsSocket ? [`  stats socket ${statsSocket} mode 600 level user`] : []),
    'defaults',
    '  mode tcp',
    '  timeout connect 2s',
    '  timeout client 5m',
    '  timeout server 5m',
    '  retries 3',
    '  option redispatch',
    'frontend lethe',
    `  bind 127.0.0.1:${port}`,
    '  default_backend replicas',
    'backend replicas',
    '  balance roundrobin',
    '  option httpchk GET /healthz',
    '  http-check expect status 200',
    ...backends.map((b, i) => `  server r${i + 1} ${b} check check-ssl verify none inter 500 fall 2 rise 2`),
    '',
  ].join('\n');
}

export async function startHaproxy(backends: string[]): Promise<Balancer> {
  const port = await freePort();
  const dir = tmpDir('lethe-haproxy-');
  const cfg = path.join(dir, 'haproxy.cfg');
  const sock = path.join(dir, 'stats.sock');
  fs.writeFileSync(cfg, haproxyConfig(port, backends, sock));
  const proc = spawn('haproxy', ['-f', cfg, '-db'], { stdio: ['ignore', 'pipe', 'pipe'] });
  let log = '';
  proc.stdout!.on('data', (d) => (log += d));
  proc.stderr!.on('data', (d) => (log += d));
  const exited = new Promise<void>((r) => proc.once('exit', () => r()));
  // Listening once a connection is accepted.
  for (let i = 0; ; i++) {
    if (proc.exitCode !== null) throw new Error(`haproxy exited (${proc.exitCode}): ${log}`);
    const ok = await new Promise<boolean>((r) => {
      const s = net.connect(port, '127.0.0.1', () => (s.destroy(), r(true)));
      s.once('error', () => r(false));
    });
    if (ok) break;
    if (i > 200) throw new Error(`haproxy did not listen on ${port}: ${log}`);
    await new Promise((r) => setTimeout(r, 50));
  }
  return {
    url: `https://127.0.0.1:${port}`,
    proc,
    log: () => log,
    async sessions() {
      const csv = await new Promise<string>((resolve, reject) => {
        let out = '';
        const c = net.connect(sock, () => c.write('show stat\n'));
        c.on('data', (d) => (out += d));
        c.once('end', () => resolve(out));
        c.once('error', reject);
      });
      const lines = csv.replace(/^# /, '').trim().split('\n');
      const head = lines[0].split(',');
      const out: Record<string, number> = {};
      for (const l of lines.slice(1)) {
        const f = l.split(',');
        if (f[0] === 'replicas' && /^r\d+$/.test(f[1])) out[f[1]] = Number(f[head.indexOf('stot')]);
      }
      return out;
    },
    async stop() {
      if (proc.exitCode === null && proc.signalCode === null) proc.kill('SIGTERM');
      await exited;
    },
  };
}
