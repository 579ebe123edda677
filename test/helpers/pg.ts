// A private PostgreSQL cluster for tests and benchmarks, from Debian's postgresql-15:
// initdb into a directory of its own, listening on loopback and a Unix socket in
// that directory, started once per machine and reused (fsync stays on: what is
// measured is what a real deployment does). PostgreSQL refuses to run as root, so
// as root the cluster belongs to the `postgres` user that the package creates.
import { execFileSync, spawnSync } from 'node:child_process';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { randomBytes } from 'node:crypto';

const BIN = '/usr/lib/postgresql/15/bin';
const PORT = Number(process.env.LETHE_TEST_PG_PORT ?? 55432);
const DIR = process.env.LETHE_TEST_PG_DIR ?? path.join(os.tmpdir(), `lethe-pg-${PORT}`);
const asRoot = process.getuid?.() === 0;

function pgCommand(cmd: string, args: string[]): { file: string; args: string[] } {
  const bin = path.join(BIN, cmd);
  return asRoot ? { file: 'runuser', args: ['-u', 'postgres', '--', bin, ...args] } : { file: bin, args };
}

function run(cmd: string, args: string[]): string {
  const c = pgCommand(cmd, args);
  return execFileSync(c.file, c.args, { encoding: 'utf8', stdio: ['ignore', 'pipe', 'pipe'] });
}

function running(): boolean {
  const c = pgCommand('pg_ctl', ['status', '-D', DIR]);
  return spawnSync(c.file, c.args, { stdio: 'ignore' }).status === 0;
}

let started = false;

/** Starts the cluster if it is not running (initdb on first use); returns the superuser's URL of database `postgres`. */
export function ensureCluster(): string {
  if (!started) {
    if (!fs.existsSync(path.join(BIN, 'initdb'))) {
      throw new Error(`PostgreSQL 15 is not installed (${BIN}/initdb): run ./scripts/setup`);
    }
    if (!fs.existsSync(path.join(DIR, 'PG_VERSION'))) {
      fs.mkdirSync(DIR, { recursive: true, mode: 0o700 });
      if (asRoot) execFileSync('chown', ['postgres:postgres', DIR]);
      run('initdb', ['-D', DIR, '-U', 'lethe', '--auth=trust', '-E', 'UTF8', '--locale=C.UTF-8']);
      fs.appendFileSync(
        path.join(DIR, 'postgresql.conf'),
        `\nlisten_addresses = '127.0.0.1'\nport = ${PORT}\nunix_socket_directories = '${DIR}'\nmax_connections = 300\nshared_buffers = 256MB\n`,
      );
    }
    if (!running()) run('pg_ctl', ['start', '-D', DIR, '-w', '-t', '60', '-l', path.join(DIR, 'server.log')]);
    started = true;
  }
  return `postgres://lethe@127.0.0.1:${PORT}/postgres`;
}

/** A new, empty database on the cluster; returns its URL. */
export function freshDatabase(prefix = 'lethe'): string {
  ensureCluster();
  const name = `${prefix}_${randomBytes(6).toString('hex')}`;
  execFileSync('psql', ['-h', '127.0.0.1', '-p', String(PORT), '-U', 'lethe', '-d', 'postgres', '-q', '-c', `CREATE DATABASE ${name}`], {
    stdio: ['ignore', 'ignore', 'pipe'],
  });
  return `postgres://lethe@127.0.0.1:${PORT}/${name}`;
}

/** Runs one SQL statement with psql and returns its unaligned, tuples-only output. */
export function psql(url: string, sql: string): string {
  return execFileSync('psql', [url, '-X', '-A', '-t', '-q', '-v', 'ON_ERROR_STOP=1', '-c', sql], { encoding: 'utf8' }).trim();
}

/** The backend the tests' servers run on: `LETHE_TEST_DB=postgres` selects PostgreSQL. */
export const testBackend = (): 'sqlite' | 'postgres' => (process.env.LETHE_TEST_DB === 'postgres' ? 'postgres' : 'sqlite');

/**
 * For a suite that works on the SQLite files of a data dir (copies them, edits them
 * offline): under the PostgreSQL pass it is skipped, saying why.
 */
export function sqliteFilesOnly(ctx: Mocha.Context): void {
  if (testBackend() === 'postgres') ctx.skip();
}
