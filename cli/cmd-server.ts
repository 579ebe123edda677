// lethe server [init|run]
import os from 'node:os';
import path from 'node:path';
import type { Argv } from 'yargs';
import { initDataDir, isInitialized, startServer, startedLine, type RunningServer } from '../server/index.js';
import { emit, type OutOpts } from './output.js';

export const defaultDataDir = () => process.env.LETHE_DATA || path.join(os.homedir(), '.local', 'share', 'lethe', 'server');

interface ServerArgs extends OutOpts {
  data: string;
  listen?: string;
  signingKey?: string;
  signHead?: boolean;
}

const dataOpts = <T>(y: Argv<T>) =>
  y
    .option('data', { type: 'string', describe: 'server data directory ($LETHE_DATA)', default: defaultDataDir() })
    .option('listen', { type: 'string', describe: 'HOST:PORT to serve on (default 127.0.0.1:7443)' })
    .option('signing-key', {
      type: 'string',
      describe: 'the audit signing key, kept apart from the data dir ($LETHE_SIGNING_KEY_FILE; default DATA/signing.key)',
      default: process.env.LETHE_SIGNING_KEY_FILE || undefined,
    });

async function init(a: ServerArgs): Promise<void> {
  const r = await initDataDir(a.data, a.listen, a.signingKey);
  emit(a, r, () =>
    [
      `lethe: initialized server data in ${a.data}`,
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
  const s: RunningServer = await startServer(a.data, { listen: a.listen, signingKeyFile: a.signingKey, signHead: a.signHead });
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
      dataOpts(y)
        .command('init', 'create a data dir: database, chunk store, keys, TLS certificate, admin token', dataOpts, (a) =>
          init(a as unknown as ServerArgs),
        )
        .command(
          'run',
          'serve HTTPS from an initialized data dir',
          (y) =>
            dataOpts(y).option('sign-head', {
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
