// lethe audit verify | checkpoint | device | host
import fs from 'node:fs';
import type { Argv } from 'yargs';
import { checkpointSigned } from '../common/audit-hash.js';
import { parseSince } from '../common/duration.js';
import { LetheError } from '../common/errors.js';
import { writeFileAtomic } from '../common/fsutil.js';
import { SignedCheckpoint } from '../common/wire.js';
import { latestCheckpoint, type Checkpoint } from '../server/audit.js';
import { AUDIT_PAGE_MAX, auditEntries, auditFilter, deviceReport, verifyAudit, type VerifyResult } from '../server/audit-read.js';
import { dataDirAuditKey, dataDirDb } from '../server/datadir.js';
import { openServerDb, type Sql } from '../server/db.js';
import { adminOpts } from './cmd-admin.js';
import { adminClient, type AdminArgs } from './admin-client.js';
import { auditHost, type HostAudit } from './host-audit/index.js';
import { emit, table, type OutOpts } from './output.js';

interface LogEntry {
  seq: number;
  ts: string;
  type: string;
  device: string | null;
  data: Record<string, unknown>;
}

type A = AdminArgs & OutOpts & { data?: string; db?: string; auditKey?: string };

/**
 * With --data, reads the server's database directly (works while every server is
 * down, and needs no secret): its SQLite files, or the PostgreSQL database its
 * config names (or --db names). `serverKey` is the audit key the data dir names.
 */
async function offline<T>(a: A, fn: (db: Sql, serverKey: Buffer) => Promise<T>): Promise<T> {
  const dir = a.data!;
  const serverKey = dataDirAuditKey(dir);
  const s = await openServerDb({ url: a.db ?? dataDirDb(dir), dir }, { readonly: true, poolSize: 1 });
  try {
    return await fn(s.db, serverKey);
  } finally {
    await s.close();
  }
}

/** The audit key the auditor pinned (--audit-key, $LETHE_AUDIT_KEY), if any. */
function pinnedKey(a: A): Buffer | undefined {
  if (!a.auditKey) return undefined;
  const key = Buffer.from(a.auditKey, 'base64url');
  if (!/^[A-Za-z0-9_-]+$/.test(a.auditKey) || key.length !== 32) {
    throw new LetheError('CONFIG', `bad audit key: '${a.auditKey}'`, {
      hint: "use the audit key 'lethe server init' printed (43 base64url characters)",
    });
  }
  return key;
}

/** An exported checkpoint, or a device's checkpoint.json. */
function readAnchor(file: string): Checkpoint {
  let value: unknown;
  try {
    value = JSON.parse(fs.readFileSync(file, 'utf8'));
  } catch (cause) {
    throw new LetheError('BAD_REQUEST', `cannot read checkpoint '${file}'`, { cause });
  }
  const r = SignedCheckpoint.safeParse(value);
  if (!r.success) {
    const i = r.error.issues[0];
    throw new LetheError('BAD_REQUEST', `'${file}' is not an audit checkpoint: ${i.path.join('.') || 'body'}: ${i.message}`, {
      hint: "use a file from 'lethe audit checkpoint --export' or a device's checkpoint.json",
    });
  }
  return r.data;
}

function verifyPath(key?: Buffer, anchor?: Checkpoint): string {
  const q = new URLSearchParams();
  if (key) q.set('key', key.toString('base64url'));
  if (anchor) for (const [k, v] of Object.entries(anchor)) q.set(k, String(v));
  const s = q.toString();
  return `/audit/verify${s ? `?${s}` : ''}`;
}

function verifyText(r: VerifyResult): string {
  if (!r.ok) {
    return r.firstBad === null
      ? `audit log NOT VERIFIED: ${r.reason}`
      : `audit log BROKEN at entry ${r.firstBad}: ${r.reason} (${r.entries} entries verified before it)`;
  }
  const anchored = r.anchor === undefined ? '' : `; entry ${r.anchor} matches the anchored checkpoint`;
  return `audit log intact: ${r.entries} entries, ${r.checkpoints} signed checkpoint(s)${anchored}`;
}

const UNPINNED =
  "lethe: warning: no pinned audit key (--audit-key, $LETHE_AUDIT_KEY): the signatures were checked with the server's own key, which whoever holds its data dir can replace\n";

async function online<T>(a: A, path: string): Promise<T> {
  const c = adminClient(a);
  try {
    return await c.json<T>('GET', path);
  } finally {
    c.close();
  }
}

type Report = Awaited<ReturnType<typeof deviceReport>>;

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
      .option('data', { type: 'string', describe: "read the server's data dir (and its database) directly instead of asking the server" })
      .option('db', { type: 'string', describe: 'with --data: the PostgreSQL URL, instead of the one the data dir names ($LETHE_DB)', default: process.env.LETHE_DB || undefined })
      .option('audit-key', {
        type: 'string',
        describe: "the audit key 'lethe server init' printed, pinned outside the server ($LETHE_AUDIT_KEY)",
        default: process.env.LETHE_AUDIT_KEY || undefined,
      })
      .command(
        'verify',
        'check the hash chain and the signed checkpoints (every interval and the head) end to end',
        (y) => y.option('against', { type: 'string', describe: "a checkpoint the log must still hold: an export, or a device's checkpoint.json" }),
        async (a) => {
          const args = a as A & { against?: string };
          const key = pinnedKey(args);
          const anchor = args.against === undefined ? undefined : readAnchor(args.against);
          const r = args.data
            ? await offline(args, (db, serverKey) => verifyAudit(db, { serverKey, pinnedKey: key, anchor }))
            : await online<VerifyResult>(args, verifyPath(key, anchor));
          if (!key) process.stderr.write(UNPINNED);
          emit(args, r, () => verifyText(r));
          if (!r.ok) process.exitCode = 1;
        },
      )
      .command(
        'checkpoint',
        "show the log's signed head; --export writes it as an anchor for 'verify --against'",
        (y) =>
          y
            .option('export', { type: 'boolean', default: false, describe: 'write the checkpoint as JSON (to stdout, or --out)' })
            .option('out', { type: 'string', describe: 'file to export to' }),
        async (a) => {
          const args = a as A & { export: boolean; out?: string };
          const key = pinnedKey(args);
          const cp = args.data
            ? await offline(args, (db) => latestCheckpoint(db))
            : await online<Checkpoint>(args, '/audit/checkpoint');
          if (!cp) throw new LetheError('NOT_FOUND', 'the audit log has no signed checkpoint yet');
          if (key && !checkpointSigned(key, cp)) {
            throw new LetheError('TAMPERED', `the audit head (entry ${cp.seq}) is not signed by the pinned audit key`, {
              hint: "check the key with the one 'lethe server init' printed; run 'lethe audit verify'",
            });
          }
          if (!key) process.stderr.write(UNPINNED);
          const text = JSON.stringify({ seq: cp.seq, hash: cp.hash, signature: cp.signature }) + '\n';
          if (args.export && args.out) writeFileAtomic(args.out, text, 0o644);
          else if (args.export) process.stdout.write(text);
          else emit(args, cp, () => `signed head: entry ${cp.seq} ${cp.hash}`);
        },
      )
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
            ? await offline(args, (db) => deviceReport(db, args.device, since))
            : await online<Report>(args, `/audit/devices/${encodeURIComponent(args.device)}?since=${encodeURIComponent(new Date(since).toISOString())}`);
          emit(args, r, () => reportText(r));
        },
      )
      .command(
        'log',
        'list audit entries, newest first, by device, type (keys.release, user.*) and time',
        (y) =>
          y
            .option('device', { type: 'string', describe: 'entries of this device' })
            .option('type', { type: 'string', describe: 'an entry type, or a family like user.*' })
            .option('since', { type: 'string', describe: 'ISO time, or a duration ago (24h)' })
            .option('until', { type: 'string', describe: 'ISO time, or a duration ago' })
            .option('limit', { type: 'number', default: 200, describe: `at most this many (up to ${AUDIT_PAGE_MAX})` }),
        async (a) => {
          const args = a as A & { device?: string; type?: string; since?: string; until?: string; limit: number };
          const q = { device: args.device, type: args.type, since: args.since, until: args.until, limit: String(args.limit) };
          const r = args.data
            ? { entries: await offline(args, (db) => auditEntries(db, auditFilter(q))) }
            : await online<{ entries: LogEntry[] }>(args, `/audit/entries?${new URLSearchParams(Object.entries(q).filter((e): e is [string, string] => e[1] !== undefined)).toString()}`);
          emit(args, r, () =>
            r.entries.length === 0
              ? 'no entries'
              : table(
                  ['SEQ', 'TIME', 'TYPE', 'DEVICE', 'ACTOR', 'DETAIL'],
                  r.entries.map((e) => {
                    const { actor, ...rest } = e.data as { actor?: string };
                    return [e.seq, e.ts, e.type, e.device ?? '-', actor ?? '-', JSON.stringify(rest)];
                  }),
                ),
          );
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
