// Runs the real `lethe` CLI and a real server process for tests and benchmarks.
import { spawn, type ChildProcess } from 'node:child_process';
import fs from 'node:fs';
import net from 'node:net';
import os from 'node:os';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import { createInterface } from 'node:readline';

/**
 * The passphrase test devices are sealed with (test/helpers/fixtures.ts); an agent
 * process reads it from stdin (--passphrase-fd 0).
 */
import { freshDatabase, testBackend } from './pg.js';

export const TEST_PASSPHRASE = 'correct horse battery staple';

export const ROOT = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '..', '..');
const MAIN = path.join(ROOT, 'cli', 'main.ts');

export interface CliResult {
  code: number;
  stdout: string;
  stderr: string;
}

/** Runs `lethe ARGS…` as a child process; never throws on a non-zero exit. */
export function lethe(args: string[], env: Record<string, string | undefined> = {}, input?: string): Promise<CliResult> {
  return new Promise((resolve, reject) => {
    const p = spawn(process.execPath, ['--import', 'tsx', MAIN, ...args], {
      cwd: ROOT,
      env: { ...process.env, ...env },
      stdio: ['pipe', 'pipe', 'pipe'],
    });
    let stdout = '';
    let stderr = '';
    p.stdout.on('data', (d) => (stdout += d));
    p.stderr.on('data', (d) => (stderr += d));
    p.on('error', reject);
    p.on('close', (code) => resolve({ code: code ?? -1, stdout, stderr }));
    p.stdin.end(input ?? '');
  });
}

export function tmpDir(prefix = 'lethe-test-'): string {
  return fs.mkdtempSync(path.join(os.tmpdir(), prefix));
}

export interface ServerProc {
  dir: string;
  url: string;
  fingerprint: string;
  adminToken: string;
  /** The audit key `lethe server init` printed (also in env as LETHE_AUDIT_KEY). */
  auditKey: string;
  proc: ChildProcess;
  env: Record<string, string>;
  stderr(): string;
  /** SIGTERM and wait. */
  stop(): Promise<void>;
  /** SIGKILL and wait. */
  kill9(): Promise<void>;
  /** Starts the same data dir again (after stop or kill9), on the same port; `runArgs` and `env` replace the first start's. */
  restart(runArgs?: string[], env?: Record<string, string>): Promise<ServerProc>;
}

/** `lethe server init` into a new dir, then `lethe server run` as a real process on a free loopback port. */
export interface StartOptions {
  dir?: string;
  adminToken?: string;
  auditKey?: string;
  fingerprint?: string;
  port?: number;
  /** Extra arguments to `lethe server init` and `lethe server run` (e.g. --signing-key FILE). */
  initArgs?: string[];
  runArgs?: string[];
  /** Extra environment for `lethe server run`. */
  env?: Record<string, string>;
  /** `lethe server init`'s database arguments (default: SQLite, or a fresh PostgreSQL database under LETHE_TEST_DB=postgres). */
  db?: string[];
}

export async function startServer(opts: StartOptions = {}): Promise<ServerProc> {
  let dir = opts.dir;
  let adminToken = opts.adminToken ?? '';
  let auditKey = opts.auditKey ?? '';
  if (!dir) {
    dir = path.join(tmpDir('lethe-server-'), 'data');
    // The matrix: with LETHE_TEST_DB=postgres every test server keeps its data in a fresh PostgreSQL database.
    const db = opts.db ?? (testBackend() === 'postgres' ? ['--db', freshDatabase()] : []);
    const r = await lethe(['server', 'init', '--data', dir, '--listen', '127.0.0.1:0', '--json', ...db, ...(opts.initArgs ?? [])]);
    if (r.code !== 0) throw new Error(`server init failed: ${r.stderr}`);
    ({ adminToken, auditKey } = JSON.parse(r.stdout) as { adminToken: string; auditKey: string });
  }
  const runArgs = opts.runArgs ?? [];
  // A port below the kernel's ephemeral range: while a killed server is down, no outgoing
  // connection (a PostgreSQL pool's, HAProxy's) can take its port, so a restart gets it back.
  const t0 = Date.now();
  let launched: Launched;
  for (;;) {
    const port = opts.port ?? (await freePort());
    launched = await launchServer(dir, port, runArgs, opts.env);
    if (!launched.inUse) break;
    // A restart waits for its own port (the old process may still hold it for a moment); a first start takes another.
    if (opts.port !== undefined && Date.now() - t0 > 30_000) break;
    if (opts.port !== undefined) await new Promise((r) => setTimeout(r, 200));
  }
  if (launched.error) throw new Error(`server did not start: ${launched.error}\n${launched.stderr()}`);
  const { proc, url, fingerprint } = launched;
  const err = launched.stderr;
  const port = Number(new URL(url).port);
  const exited = new Promise<void>((r) => proc.once('exit', () => r()));
  const self: ServerProc = {
    dir,
    url,
    fingerprint,
    adminToken,
    auditKey,
    proc,
    env: { LETHE_SERVER: url, LETHE_PIN: fingerprint, LETHE_ADMIN_TOKEN: adminToken, LETHE_AUDIT_KEY: auditKey },
    stderr: err,
    async stop() {
      if (proc.exitCode === null && proc.signalCode === null) proc.kill('SIGTERM');
      await exited;
    },
    async kill9() {
      if (proc.exitCode === null && proc.signalCode === null) proc.kill('SIGKILL');
      await exited;
    },
    restart: (runArgs?: string[], env?: Record<string, string>) =>
      startServer({ ...opts, dir, adminToken, auditKey, port, runArgs: runArgs ?? opts.runArgs, env: env ?? opts.env }),
  };
  return self;
}

interface Launched {
  proc: ChildProcess;
  url: string;
  fingerprint: string;
  stderr: () => string;
  /** Set when the server said it could not start; `inUse` when its port was taken. */
  error?: string;
  inUse?: boolean;
}

/** `lethe server run` on `port`; resolves once it prints its first line: where it listens, or why it cannot. */
async function launchServer(dir: string, port: number, runArgs: string[], env: Record<string, string> = {}): Promise<Launched> {
  const proc = spawn(process.execPath, ['--import', 'tsx', MAIN, 'server', 'run', '--data', dir, '--listen', `127.0.0.1:${port}`, '--json', ...runArgs], {
    cwd: ROOT,
    env: { ...process.env, ...env },
    stdio: ['ignore', 'pipe', 'pipe'],
  });
  let err = '';
  proc.stderr!.on('data', (d) => (err += d));
  const stderr = () => err;
  const first = await new Promise<string>((resolve, reject) => {
    const rl = createInterface({ input: proc.stdout! });
    rl.once('line', (l) => resolve(l));
    proc.once('exit', (c) => reject(new Error(`server exited (${c}) before listening: ${err}`)));
  });
  const line = JSON.parse(first) as { url?: string; fingerprint?: string; error?: { code: string; message: string } };
  if (line.error || !line.url || !line.fingerprint) {
    await new Promise<void>((r) => (proc.exitCode === null && proc.signalCode === null ? proc.once('exit', () => r()) : r()));
    return { proc, url: '', fingerprint: '', stderr, error: line.error ? `${line.error.code}: ${line.error.message}` : first, inUse: /in use/.test(line.error?.message ?? '') };
  }
  return { proc, url: line.url, fingerprint: line.fingerprint, stderr };
}

/** A loopback port that is free now, chosen below the ephemeral range (ip_local_port_range starts at 32768). */
export async function freePort(): Promise<number> {
  for (;;) {
    const port = 20_000 + Math.floor(Math.random() * 12_000);
    const ok = await new Promise<boolean>((resolve) => {
      const srv = net.createServer();
      srv.once('error', () => resolve(false));
      srv.listen(port, '127.0.0.1', () => srv.close(() => resolve(true)));
    });
    if (ok) return port;
  }
}

export interface AgentProc {
  proc: ChildProcess;
  log(): string;
  exited: Promise<number>;
  stop(): Promise<number>;
}

/** `lethe agent run IMAGE` as a real process, with a short heartbeat for tests; TEST_PASSPHRASE on its stdin unseals the keys. */
export async function startAgentProc(home: string, image: string, args: string[] = []): Promise<AgentProc> {
  const heartbeat = args.includes('--heartbeat') ? [] : ['--heartbeat', '1s'];
  const proc = spawn(process.execPath, ['--import', 'tsx', MAIN, 'agent', 'run', image, '--home', home, ...heartbeat, '--passphrase-fd', '0', ...args], {
    cwd: ROOT,
    stdio: ['pipe', 'pipe', 'pipe'],
  });
  proc.stdin!.on('error', () => {});
  proc.stdin!.end(TEST_PASSPHRASE);
  let log = '';
  proc.stdout!.on('data', (d) => (log += d));
  proc.stderr!.on('data', (d) => (log += d));
  const exited = new Promise<number>((r) => proc.once('exit', (code) => r(code ?? -1)));
  const sock = path.join(home, 'agent.sock');
  const t0 = Date.now();
  while (!fs.existsSync(sock)) {
    if (proc.exitCode !== null) throw new Error(`agent exited early: ${log}`);
    // Unsealing the device keys (Argon2id) comes before the socket.
    if (Date.now() - t0 > 30_000) throw new Error(`agent did not start: ${log}`);
    await new Promise((r) => setTimeout(r, 50));
  }
  return {
    proc,
    log: () => log,
    exited,
    async stop() {
      if (proc.exitCode === null && proc.signalCode === null) proc.kill('SIGTERM');
      return exited;
    },
  };
}

/** Polls `fn` until it returns a truthy value or `ms` pass. */
export async function waitFor<T>(fn: () => Promise<T>, ms: number, what: string): Promise<NonNullable<T>> {
  const t0 = Date.now();
  let last: unknown;
  for (;;) {
    try {
      const v = await fn();
      if (v) return v as NonNullable<T>;
    } catch (e) {
      last = e;
    }
    if (Date.now() - t0 > ms) throw new Error(`timed out waiting for ${what}${last ? `: ${String(last)}` : ''}`);
    await new Promise((r) => setTimeout(r, 100));
  }
}
