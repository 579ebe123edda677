// The server process: loads the data dir, opens the databases and serves HTTPS.
import https from 'node:https';
import type { AddressInfo } from 'node:net';
import { iso } from '../common/duration.js';
import { AuditLog } from './audit.js';
import { buildApp } from './app.js';
import type { Ctx } from './context.js';
import { checkDbUrl, checkKeysMatch, loadDataDir, parseListen, urlFor } from './datadir.js';
import { openServerDb } from './db.js';
import { loadKeyring } from './keyring.js';
import { servedTls, type TlsPair } from './tls.js';
import { Escrow } from './escrow.js';
import { Metrics } from './metrics.js';
import { memoryNonces, tableNonces } from './nonces.js';
import { DEFAULT_LIMITS, type ServerLimits } from './limits.js';
import { LetheError } from '../common/errors.js';
import { PushHub } from './push.js';
import { wipe } from '../common/crypto.js';

export { initDataDir, isInitialized } from './datadir.js';

export interface RunningServer {
  url: string;
  fingerprint: string;
  close(): Promise<void>;
}

export interface ServerOptions {
  listen?: string;
  /** Connection caps, timeouts and rate limits (default DEFAULT_LIMITS). */
  limits?: ServerLimits;
  /** Bearer token for GET /metrics; without one /metrics is not served. */
  metricsToken?: string;
  /** The audit signing key's file, when it is kept apart from the data dir. */
  signingKeyFile?: string;
  /** Sign an unsigned audit head instead of refusing to start (after an operator checked the log). */
  signHead?: boolean;
  /** The PostgreSQL URL, instead of the one config.json names (e.g. with a password from the environment). */
  db?: string;
}

/** How often a replica checks the database for a certificate rotated on another. */
const TLS_CHECK_MS = 2_000;

/** Serves `tls` (a finished rotation's pair) instead of the data dir's. */
function useTls(ctx: Ctx, tls: TlsPair | undefined): void {
  if (!tls) return;
  ctx.data.tlsCert = tls.cert;
  ctx.data.tlsKey = tls.key;
  ctx.data.fingerprint = tls.fingerprint;
}

/** How often timeouts of open connections are checked (Node's default is 30 s, which would stretch every timeout by as much). */
const CONNECTIONS_CHECK_MS = 1_000;

export async function startServer(dir: string, opts: ServerOptions = {}): Promise<RunningServer> {
  const data = loadDataDir(dir, { signingKeyFile: opts.signingKeyFile });
  const url = opts.db === undefined ? data.config.db : checkDbUrl(opts.db);
  let sdb;
  try {
    sdb = await openServerDb({ url, dir });
  } catch (e) {
    wipeKeys(data);
    throw e;
  }
  const { db, store } = sdb;
  const ctx: Ctx = {
    db,
    store,
    data,
    audit: new AuditLog(db, data.signingKey),
    escrow: new Escrow(data.masterKey),
    metrics: new Metrics(),
    // One SQLite process remembers nonces itself; replicas share them in PostgreSQL.
    nonces: db.dialect === 'postgres' ? tableNonces(db) : memoryNonces(db, Date.now()),
    publicUrl: '',
    now: () => Date.now(),
  };
  let app;
  try {
    await checkKeysMatch(db, data);
    await loadKeyring(ctx);
    await ctx.audit.initOnce({ fingerprint: data.fingerprint });
    await checkAuditHead(ctx, dir, opts.signHead ?? false);
    useTls(ctx, await servedTls(ctx));
    app = await buildApp(ctx, { limits: opts.limits ?? DEFAULT_LIMITS, metricsToken: opts.metricsToken });
  } catch (e) {
    await sdb.close();
    ctx.escrow.close();
    wipeKeys(data);
    throw e;
  }
  const { host, port } = parseListen(opts.listen ?? data.config.listen);
  const limits = opts.limits ?? DEFAULT_LIMITS;
  const server = https.createServer(
    {
      key: data.tlsKey,
      cert: data.tlsCert,
      keepAliveTimeout: limits.keepAliveTimeoutMs,
      headersTimeout: limits.headersTimeoutMs,
      requestTimeout: limits.requestTimeoutMs,
      handshakeTimeout: limits.handshakeTimeoutMs,
      connectionsCheckingInterval: Math.min(CONNECTIONS_CHECK_MS, limits.headersTimeoutMs),
    },
    app,
  );
  const push = new PushHub(ctx, limits);
  try {
    await push.start(server);
  } catch (e) {
    await sdb.close();
    ctx.escrow.close();
    wipeKeys(data);
    throw e;
  }
  // Past the cap, a new connection is closed at once (counted in lethe_connections_refused_total).
  server.maxConnections = limits.maxConnections;
  server.on('drop', () => ctx.metrics.inc('lethe_connections_refused_total'));
  const listening = new Promise<void>((resolve, reject) => {
    server.once('error', (e: NodeJS.ErrnoException) =>
      reject(
        e.code === 'EADDRINUSE' || e.code === 'EACCES' || e.code === 'EADDRNOTAVAIL'
          ? new LetheError('CONFIG', `cannot listen on ${host}:${port}: ${e.code === 'EADDRINUSE' ? 'the address is in use' : e.code === 'EACCES' ? 'permission denied' : 'no such local address'}`, {
              hint: e.code === 'EADDRINUSE' ? 'another process listens there (another lethe server?): stop it, or choose another --listen' : 'choose another --listen HOST:PORT',
              cause: e,
            })
          : e,
      ),
    );
    server.listen(port, host, () => resolve());
  });
  try {
    await listening;
  } catch (e) {
    await push.close();
    await sdb.close();
    ctx.escrow.close();
    wipeKeys(data);
    throw e;
  }
  const actual = (server.address() as AddressInfo).port;
  ctx.publicUrl = data.config.publicUrl ?? urlFor(host, actual);
  const pruner = setInterval(() => void ctx.nonces.prune(ctx.now()).catch(() => {}), 30_000);
  pruner.unref();
  // A rotation finished on any replica: serve its certificate from the next handshake on.
  const tlsWatch = setInterval(() => {
    servedTls(ctx).then(
      (tls) => {
        if (tls && tls.fingerprint !== ctx.data.fingerprint) {
          server.setSecureContext({ key: tls.key, cert: tls.cert });
          useTls(ctx, tls);
          process.stderr.write(`lethe server: serving certificate sha256 ${tls.fingerprint} (rotated)\n`);
        }
      },
      () => {},
    );
  }, TLS_CHECK_MS);
  tlsWatch.unref();

  let closed = false;
  return {
    url: ctx.publicUrl,
    fingerprint: data.fingerprint,
    async close() {
      if (closed) return;
      closed = true;
      clearInterval(pruner);
      clearInterval(tlsWatch);
      await push.close();
      (app.locals.closeConsole as () => void)();
      server.closeAllConnections();
      await new Promise<void>((resolve) => server.close(() => resolve()));
      await sdb.close();
      ctx.escrow.close();
      wipeKeys(data);
    },
  };
}

/**
 * Every append signs the head in its own transaction, so an unsigned head means the
 * log was changed outside the server: refuse to serve (and so to sign over it)
 * until an operator has checked the log and says so (`--sign-head`).
 */
async function checkAuditHead(ctx: Ctx, dir: string, signHead: boolean): Promise<void> {
  const problem = await ctx.audit.checkHead();
  if (!problem) return;
  if (!signHead) {
    throw new LetheError('AUDIT_UNAVAILABLE', `${problem}: entries were cut or added outside the server`, {
      hint: `check the log with 'lethe audit verify --data ${dir} --against CHECKPOINT' (an exported or device-held checkpoint); if it is as it should be, start once with --sign-head`,
      status: 0,
    });
  }
  await ctx.audit.signCurrentHead();
  process.stderr.write(`lethe server: warning: ${problem}; signed it as it stands (--sign-head)\n`);
}

export const startedLine = (s: RunningServer) =>
  `lethe server: listening on ${s.url} (certificate sha256 ${s.fingerprint}) at ${iso(Date.now())}`;

function wipeKeys(data: { signingKey: Uint8Array }): void {
  wipe(data.signingKey);
}
