// lethe server [init|run]
import os from 'node:os';
import path from 'node:path';
import type { Argv } from 'yargs';
import { parseDuration } from '../common/duration.js';
import { LetheError } from '../common/errors.js';
import { initDataDir, isInitialized, startServer, startedLine, type RunningServer } from '../server/index.js';
import { redactUrl } from '../server/sql.js';
import { moveToPostgres } from '../server/move.js';
import { DEFAULT_LIMITS, parseRate, type Rate, type ServerLimits } from '../server/limits.js';
import { emit, type OutOpts } from './output.js';

export const defaultDataDir = () => process.env.LETHE_DATA || path.join(os.homedir(), '.local', 'share', 'lethe', 'server');

interface ServerArgs extends OutOpts {
  data: string;
  listen?: string;
  'metrics-token'?: string;
  'rate-enroll': string;
  'rate-auth-failures': string;
  'rate-login-failures': string;
  'rate-device-address': string;
  'rate-device': string;
  'max-connections': number;
  'headers-timeout': string;
  'request-timeout': string;
  'keep-alive-timeout': string;
  signingKey?: string;
  db?: string;
  signHead?: boolean;
}

const showRate = (r: Rate | null) => (r ? `${r.count}/${r.perMs === 1000 ? 's' : r.perMs === 60_000 ? 'min' : 'h'}` : 'off');
const showMs = (ms: number) => `${ms / 1000}s`;

/** Limits and the metrics token for `server run`; each has a default (DEFAULT_LIMITS). */
const runOpts = <T>(y: Argv<T>) =>
  dataOpts(y)
    .option('metrics-token', { type: 'string', describe: 'bearer token GET /metrics asks for ($LETHE_METRICS_TOKEN; without one /metrics is not served)' })
    .option('rate-enroll', { type: 'string', default: showRate(DEFAULT_LIMITS.enroll), describe: 'enrollment requests per client address (N/s, N/min, N/h or off)' })
    .option('rate-auth-failures', { type: 'string', default: showRate(DEFAULT_LIMITS.authFailures), describe: 'failed admin or metrics token checks per client address' })
    .option('rate-login-failures', { type: 'string', default: showRate(DEFAULT_LIMITS.loginFailures), describe: 'failed logins per client address and per user name' })
    .option('rate-device-address', { type: 'string', default: showRate(DEFAULT_LIMITS.deviceAddress), describe: 'device requests per client address' })
    .option('rate-device', { type: 'string', default: showRate(DEFAULT_LIMITS.device), describe: 'signed requests per device' })
    .option('max-connections', { type: 'number', default: DEFAULT_LIMITS.maxConnections, describe: 'open connections at once; more are closed' })
    .option('headers-timeout', { type: 'string', default: showMs(DEFAULT_LIMITS.headersTimeoutMs), describe: "time for a request's headers (slow clients are cut off)" })
    .option('request-timeout', { type: 'string', default: showMs(DEFAULT_LIMITS.requestTimeoutMs), describe: 'time for a whole request, body included' })
    .option('keep-alive-timeout', { type: 'string', default: showMs(DEFAULT_LIMITS.keepAliveTimeoutMs), describe: 'idle time before a kept-alive connection is closed' });

/** @throws LetheError BAD_REQUEST naming the bad option */
function limitsFrom(a: ServerArgs): ServerLimits {
  const timeout = (flag: 'headers-timeout' | 'request-timeout' | 'keep-alive-timeout') =>
    parseDuration(String(a[flag]), `--${flag}`, { min: 100, max: 3_600_000 });
  const maxConnections = Number(a['max-connections']);
  if (!Number.isSafeInteger(maxConnections) || maxConnections < 1) {
    throw new LetheError('BAD_REQUEST', `bad --max-connections: '${a['max-connections']}'`, { hint: 'use a whole number of connections, e.g. 1024' });
  }
  const limits: ServerLimits = {
    ...DEFAULT_LIMITS,
    enroll: parseRate(String(a['rate-enroll']), '--rate-enroll'),
    authFailures: parseRate(String(a['rate-auth-failures']), '--rate-auth-failures'),
    loginFailures: parseRate(String(a['rate-login-failures']), '--rate-login-failures'),
    deviceAddress: parseRate(String(a['rate-device-address']), '--rate-device-address'),
    device: parseRate(String(a['rate-device']), '--rate-device'),
    maxConnections,
    headersTimeoutMs: timeout('headers-timeout'),
    requestTimeoutMs: timeout('request-timeout'),
    keepAliveTimeoutMs: timeout('keep-alive-timeout'),
  };
  if (limits.headersTimeoutMs > limits.requestTimeoutMs) {
    throw new LetheError('BAD_REQUEST', `--headers-timeout '${a['headers-timeout']}' is longer than --request-timeout '${a['request-timeout']}'`);
  }
  return limits;
}

/** The metrics token from --metrics-token or $LETHE_METRICS_TOKEN; @throws LetheError BAD_REQUEST when too short to be a secret */
function metricsToken(a: ServerArgs): string | undefined {
  const t = a['metrics-token'] ?? (process.env.LETHE_METRICS_TOKEN || undefined);
  if (t !== undefined && (t.length < 16 || /\s/.test(t))) {
    throw new LetheError('BAD_REQUEST', 'the metrics token is shorter than 16 characters or holds white space', {
      hint: 'use a long random token, e.g. from: openssl rand -hex 24',
    });
  }
  return t;
}

const dataOpts = <T>(y: Argv<T>) =>
  y
    .option('data', { type: 'string', describe: 'server data directory ($LETHE_DATA)', default: defaultDataDir() })
    .option('listen', { type: 'string', describe: 'HOST:PORT to serve on (default 127.0.0.1:7443)' })
    .option('signing-key', {
      type: 'string',
      describe: 'the audit signing key, kept apart from the data dir ($LETHE_SIGNING_KEY_FILE; default DATA/signing.key)',
      default: process.env.LETHE_SIGNING_KEY_FILE || undefined,
    })
    .option('db', {
      type: 'string',
      describe: 'keep the data in PostgreSQL (postgres://USER@HOST:PORT/DB, $LETHE_DB) that several servers share, instead of SQLite files in the data dir',
      default: process.env.LETHE_DB || undefined,
    });

async function init(a: ServerArgs): Promise<void> {
  const r = await initDataDir(a.data, a.listen, a.signingKey, a.db);
  emit(a, r, () =>
    [
      `lethe: initialized server data in ${a.data}${a.db ? ` (database: ${redactUrl(a.db)})` : ''}`,
      `url          ${r.url}`,
      `fingerprint  ${r.fingerprint}`,
      `admin token  ${r.adminToken}`,
      `audit key    ${r.auditKey}`,
      '',
      'The admin token is shown only this once. For admin commands:',
      `  export LETHE_SERVER=${r.url} LETHE_PIN=${r.fingerprint} LETHE_ADMIN_TOKEN=${r.adminToken}`,
      'Keep the audit key outside this server (auditors pin it to verify the log):',
      `  export LETHE_AUDIT_KEY=${r.auditKey}`,
    ].join('\n'),
  );
}

/** Serves until SIGINT or SIGTERM, then closes cleanly. */
async function run(a: ServerArgs): Promise<void> {
  const s: RunningServer = await startServer(a.data, {
    listen: a.listen,
    limits: limitsFrom(a),
    metricsToken: metricsToken(a),
    signingKeyFile: a.signingKey,
    signHead: a.signHead,
    db: a.db,
  });
  emit(a, { url: s.url, fingerprint: s.fingerprint, event: 'listening' }, () => startedLine(s));
  await new Promise<void>((resolve) => {
    const stop = () => {
      process.off('SIGINT', stop);
      process.off('SIGTERM', stop);
      s.close().then(resolve, resolve);
    };
    process.on('SIGINT', stop);
    process.on('SIGTERM', stop);
  });
  process.stderr.write('lethe server: stopped\n');
}

export function serverCommand(y: Argv) {
  return y.command(
    'server',
    'run the Lethe server (initializing its data dir on first use)',
    (y) =>
      runOpts(y)
        .command('init', 'create a data dir: database, chunk store, keys, TLS certificate, admin token', dataOpts, (a) =>
          init(a as unknown as ServerArgs),
        )
        .command(
          'migrate',
          "move a SQLite server's data (audit chain included) into an empty PostgreSQL database; stop the server first",
          (y) =>
            y
              .option('from', { type: 'string', describe: "the SQLite server's data dir ($LETHE_DATA)", default: defaultDataDir() })
              .option('to', { type: 'string', demandOption: true, describe: 'the empty PostgreSQL database (postgres://USER@HOST:PORT/DB)' }),
          async (a) => {
            const args = a as unknown as ServerArgs & { from: string; to: string };
            const r = await moveToPostgres(args.from, args.to);
            emit(args, r, () =>
              [
                `lethe: moved ${args.from} to ${r.to}: ${Object.entries(r.rows).map(([t, n]) => `${n} ${t}`).join(', ')}`,
                `audit log ok in the new database: ${r.verify.entries} entries, ${r.verify.checkpoints} signed checkpoints`,
                `${args.from}/config.json now names the database; 'lethe server run --data ${args.from}' serves from it (copy the data dir to each replica, docs/fleet.md)`,
                'the SQLite files (lethe.db, chunks.db) are left in place: remove them once the new server is serving',
              ].join('\n'),
            );
          },
        )
        .command(
          'run',
          'serve HTTPS from an initialized data dir',
          (y) =>
            runOpts(y).option('sign-head', {
              type: 'boolean',
              default: false,
              describe: 'sign an unsigned audit head as it stands instead of refusing to start (check the log first)',
            }),
          (a) => run(a as unknown as ServerArgs),
        ),
    async (a) => {
      const args = a as unknown as ServerArgs;
      if (!isInitialized(args.data)) await init(args);
      await run(args);
    },
  );
}
