// lethe audit verify | device | host
import type { Argv } from 'yargs';
import { parseSince } from '../common/duration.js';
import { verifyChain, deviceReport, type VerifyResult } from '../server/audit.js';
import { files, loadDataDir } from '../server/datadir.js';
import { openDatabase } from '../server/db.js';
import { wipe } from '../common/crypto.js';
import { adminOpts } from './cmd-admin.js';
import { adminClient, type AdminArgs } from './admin-client.js';
import { auditHost, type HostAudit } from '../agent/host-audit.js';
import { emit, type OutOpts } from './output.js';

type A = AdminArgs & OutOpts & { data?: string };

/** With --data, reads the server's database directly (works while the server is down). */
function offline<T>(dir: string, fn: (db: ReturnType<typeof openDatabase>, pk: Buffer) => T): T {
  const d = loadDataDir(dir);
  wipe(d.masterKey, d.signingKey);
  const db = openDatabase(files(dir).db, { readonly: true });
  try {
    return fn(db, d.signPublicKey);
  } finally {
    db.close();
  }
}

async function online<T>(a: A, path: string): Promise<T> {
  const c = adminClient(a);
  try {
    return await c.json<T>('GET', path);
  } finally {
    c.close();
  }
}

type Report = ReturnType<typeof deviceReport>;

function reportText(r: Report): string {
  const s = r.summary;
  const lines = [
    `device ${r.device} since ${r.since}:`,
    `  ${s.leases} lease(s), ${s.renewals} renewal(s), ${s.keysReleased} chunk key(s) released (${s.sensitiveKeys} sensitive), ${s.chunksServed} chunk(s) served`,
    `  images: ${s.images.join(', ') || 'none'}`,
  ];
  for (const e of r.entries) lines.push(`  #${e.seq} ${e.ts} ${e.type} ${JSON.stringify(e.data)}`);
  return lines.join('\n');
}

function hostText(r: HostAudit): string {
  const idWidth = Math.max(...r.checks.map((c) => c.id.length));
  const lines: string[] = [];
  for (const c of r.checks) {
    lines.push(`${c.status.padEnd(4)}  ${c.id.padEnd(idWidth)}  ${c.found}`);
    if (c.fix) lines.push(`${' '.repeat(idWidth + 8)}fix: ${c.fix}`);
  }
  const count = (s: string) => r.checks.filter((c) => c.status === s).length;
  lines.push(`${count('fail')} fail, ${count('warn')} warn, ${count('ok')} ok`);
  return lines.join('\n');
}

export function auditCommand(y: Argv) {
  return y.command('audit', "audit the server's log (chain integrity, what a device was given) and this host's leak paths", (y) =>
    adminOpts(y)
      .option('data', { type: 'string', describe: "read the server's data dir directly instead of asking the server" })
      .command('verify', 'check the hash chain and signed checkpoints end to end', {}, async (a) => {
        const args = a as A;
        const r = args.data
          ? offline(args.data, (db, pk) => verifyChain(db, pk))
          : await online<VerifyResult>(args, '/audit/verify');
        emit(args, r, () =>
          r.ok
            ? `audit log intact: ${r.entries} entries, ${r.checkpoints} signed checkpoint(s)`
            : `audit log BROKEN at entry ${r.firstBad}: ${r.reason} (${r.entries} entries verified before it)`,
        );
        if (!r.ok) process.exitCode = 1;
      })
      .command(
        'device <device>',
        'list what a device was given (leases, keys, chunks) after a time',
        (y) =>
          y
            .positional('device', { type: 'string', demandOption: true })
            .option('since', { type: 'string', default: '0', describe: 'ISO time, or a duration ago (24h)' }),
        async (a) => {
          const args = a as A & { device: string; since: string };
          const since = args.since === '0' ? 0 : parseSince(args.since);
          const r = args.data
            ? offline(args.data, (db) => deviceReport(db, args.device, since))
            : await online<Report>(args, `/audit/devices/${encodeURIComponent(args.device)}?since=${encodeURIComponent(new Date(since).toISOString())}`);
          emit(args, r, () => reportText(r));
        },
      )
      .command(
        'host',
        "check this laptop's leak paths (swap, core dumps, hibernation, ptrace, locked memory, kdump) and say what to change",
        (y) =>
          y
            .option('pid', { type: 'string', describe: "check this process's limits (e.g. a running agent's) instead of this shell's" })
            // the kernel's /proc and /sys laid out under another directory: for tests
            .option('root', { type: 'string', default: '/', hidden: true }),
        (a) => {
          const args = a as OutOpts & { pid?: string; root: string };
          // auditHost checks --pid: BAD_REQUEST, quoting it, with a hint, for anything but a running process's id
          const r = auditHost({ root: args.root, pid: args.pid });
          emit(args, r, () => hostText(r));
          if (!r.ok) process.exitCode = 1;
        },
      )
      .demandCommand(1, 'name an audit command'),
  );
}
