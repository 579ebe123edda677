// lethe image push | ls | verify | pull | rm | policy | promote | trust | untrust
import type { Argv } from 'yargs';
import { withAdmin, type AdminArgs } from './admin-client.js';
import { adminOpts } from './cmd-admin.js';
import { checkImage, parseRef, type CheckResult } from './image-pull.js';
import { pushImage, validatePush, type PushOptions } from './image-push.js';
import { emit, table, type OutOpts } from './output.js';
import { loadPolicyOrRefuse } from './policy-file.js';
import { progressBar } from './progress.js';
import { LetheError } from '../common/errors.js';

type A = AdminArgs & OutOpts;

const mb = (n: number) => `${(n / 1e6).toFixed(1)} MB`;

interface ImageView {
  name: string;
  current: number | null;
  stored: { chunks: number; bytes: number };
  versions: {
    version: number;
    state: string;
    committedAt: string | null;
    sizes: { disk: number; mem: number; state: number };
    /** Set for a device branch (docs/branches.md). */
    device?: string;
    promotedAt?: string | null;
  }[];
  trustedTracers: string[];
}

/** A version in the listing: `3`, `4(draft)`, `5(branch dev-…)`, `6(promoted from dev-…)`. */
function versionLabel(v: ImageView['versions'][number]): string {
  const notes = [
    v.state === 'draft' ? 'draft' : '',
    v.device === undefined ? '' : v.promotedAt ? `promoted from ${v.device}` : `branch ${v.device}`,
  ].filter(Boolean);
  return notes.length ? `${v.version}(${notes.join(', ')})` : String(v.version);
}

function promote(a: A & { name: string; version: string }): Promise<void> {
  const version = versionArg(a.version);
  return withAdmin(a, async (c) => {
    const r = await c.json<{ image: string; version: number; device: string; previous: number | null; changed: boolean }>(
      'POST',
      `/images/${encodeURIComponent(a.name)}/versions/${version}/promote`,
    );
    emit(a, r, () =>
      r.changed
        ? `${r.image}@${r.version} (checked in by ${r.device}) is now the shared version, after ${r.previous}; assigned devices start from it at their next lease`
        : `${r.image}@${r.version} is already the shared version`,
    );
  });
}

function versionArg(v: string): number {
  if (!/^\d{1,12}$/.test(v)) throw new LetheError('BAD_REQUEST', `version must be a number, got '${v}'`, { hint: "'lethe image ls' lists the versions" });
  return Number(v);
}

function trust(a: A & { name: string; device: string }, trusted: boolean): Promise<void> {
  return withAdmin(a, async (c) => {
    const path = `/images/${encodeURIComponent(a.name)}/trusted/${encodeURIComponent(a.device)}`;
    const r = await c.json<{ image: string; device: string; changed: boolean }>(trusted ? 'PUT' : 'DELETE', path);
    const what = trusted ? "traces now shape every device's prefetch order" : 'traces now shape only its own prefetch order';
    emit(a, r, () => `${r.image}: ${r.device} ${r.changed ? '' : 'already '}${trusted ? 'trusted' : 'not trusted'}${r.changed ? `; its ${what}` : ''}`);
  });
}

function checkText(r: CheckResult, verb: string): string {
  if (r.ok) {
    return `${r.image}@${r.version}: ${r.chunks} chunks ${verb} (${mb(r.bytes)} in ${r.seconds.toFixed(1)} s)${r.out ? `, written to ${r.out}` : ''}`;
  }
  const b = r.firstBad!;
  return `${r.image}@${r.version}: ${r.bad} bad chunk(s); first: ${b.kind} chunk ${b.index} (generation ${b.gen}): ${b.reason}`;
}

/** verify (no `out`) or pull (`out`): every chunk fetched, checked and decrypted; exit 1 if any is bad. */
function check(a: A & { ref: string; out?: string }): Promise<void> {
  return withAdmin(a, async (c) => {
    const bar = progressBar(`${a.out ? 'pulling' : 'verifying'} ${a.ref}`, !a.json && process.stderr.isTTY === true);
    const r = await checkImage(c, a.ref, a.out, (d, t) => bar.update(d, t));
    bar.done();
    emit(a, r, () => checkText(r, a.out ? 'pulled' : 'verified'));
    if (!r.ok) process.exitCode = 1;
  });
}

function setImagePolicy(a: A & { name: string; file?: string; clear: boolean }): Promise<void> {
  if (a.clear === (a.file !== undefined)) {
    throw new LetheError('BAD_REQUEST', a.clear ? 'give a policy file or --clear, not both' : 'no policy file given', {
      hint: `lethe image policy ${a.name} policies/laptop-default.yaml, or --clear for the built-in policy`,
    });
  }
  const policy = a.file === undefined ? null : loadPolicyOrRefuse(a.file, 'the image keeps its policy').text;
  return withAdmin(a, async (c) => {
    const r = await c.json<{ image: string; changed: boolean }>('PUT', `/images/${encodeURIComponent(a.name)}/policy`, { policy });
    emit(a, r, () => `${r.image}: ${r.changed ? (policy === null ? 'policy removed (built-in policy applies)' : `policy replaced by ${a.file}`) : 'policy unchanged'}`);
  });
}

export function imageCommand(y: Argv) {
  return y.command('image', 'VM images on the server: push, list, verify, pull, remove, set their policy, promote device branches, trust tracers', (y) =>
    adminOpts(y)
      .command(
        'push <name>',
        'upload a disk (and memory + device state) as a new version of an image',
        (y) =>
          y
            .positional('name', { type: 'string', demandOption: true })
            .option('disk', { type: 'string', demandOption: true, describe: 'raw disk image' })
            .option('memory', { type: 'string', describe: 'guest RAM file (ram.bin)' })
            .option('state', { type: 'string', describe: 'QEMU device state (state.bin)' })
            .option('policy', { type: 'string', describe: 'policy YAML for the image' }),
        async (a) => {
          const o: PushOptions = { name: String(a.name), disk: String(a.disk), memory: a.memory, state: a.state, policy: a.policy };
          validatePush(o); // local checks first, before any settings or network
          await withAdmin(a as A, async (c) => {
            const bar = progressBar(`pushing ${o.name}`, !a.json && process.stderr.isTTY === true);
            const r = await pushImage(c, o, (d, t) => bar.update(d, t));
            bar.done();
            emit(a as A, r, () =>
              [
                `pushed ${r.image}@${r.version}${r.resumed ? ' (resumed)' : ''} in ${r.seconds.toFixed(1)} s`,
                `  ${r.chunks.uploaded} chunk(s) uploaded (${mb(r.bytes.uploaded)}), ${r.chunks.unchanged} unchanged, ${r.chunks.zero} zero (not stored)`,
              ].join('\n'),
            );
          });
        },
      )
      .command('ls', 'list images and their versions', {}, (a) =>
        withAdmin(a as A, async (c) => {
          const r = await c.json<{ images: ImageView[] }>('GET', '/images');
          emit(a as A, r, () =>
            r.images.length === 0
              ? 'no images'
              : table(
                  ['NAME', 'CURRENT', 'VERSIONS', 'DISK', 'MEMORY', 'STORED', 'TRUSTED TRACERS'],
                  r.images.map((i) => {
                    const cur = i.versions.find((v) => v.version === i.current);
                    return [
                      i.name,
                      i.current,
                      i.versions.map(versionLabel).join(','),
                      cur ? mb(cur.sizes.disk) : null,
                      cur ? mb(cur.sizes.mem) : null,
                      `${mb(i.stored.bytes)} in ${i.stored.chunks} chunks`,
                      i.trustedTracers.length ? i.trustedTracers.join(',') : null,
                    ];
                  }),
                ),
          );
        }),
      )
      .command(
        'verify <ref>',
        'fetch, decrypt and check every chunk of NAME[@VERSION]; names the first bad one',
        (y) => y.positional('ref', { type: 'string', demandOption: true }),
        (a) => check(a as A & { ref: string }),
      )
      .command(
        'pull <ref>',
        'reassemble NAME[@VERSION] as plaintext files for recovery (admin only; audited)',
        (y) => y.positional('ref', { type: 'string', demandOption: true }).option('out', { type: 'string', demandOption: true }),
        (a) => check(a as A & { ref: string; out: string }),
      )
      .command(
        'rm <ref>',
        'remove an image (ends its leases and assignments), or one old version NAME@VERSION',
        (y) => y.positional('ref', { type: 'string', demandOption: true }),
        (a) =>
          withAdmin(a as A, async (c) => {
            const { name, version } = parseRef(String(a.ref));
            const path = `/images/${encodeURIComponent(name)}${version === undefined ? '' : `/versions/${version}`}`;
            const r = await c.json<{ chunksFreed: number; draftsRemoved?: number[] }>('DELETE', path);
            const drafts = r.draftsRemoved?.length ? ` and ${r.draftsRemoved.length} device draft(s) on it, writes never checked in` : '';
            emit(a as A, r, () => `removed ${a.ref}${drafts} (${r.chunksFreed} stored chunk(s) freed)`);
          }),
      )
      .command(
        'policy <name> [file]',
        "replace an image's policy (checked here first), or go back to the built-in one with --clear; leases take it at their next renewal",
        (y) =>
          y
            .positional('name', { type: 'string', demandOption: true })
            .positional('file', { type: 'string', describe: 'policy YAML (see lethe policy check)' })
            .option('clear', { type: 'boolean', default: false, describe: 'remove the image policy: the built-in one applies' }),
        (a) => setImagePolicy(a as A & { name: string; file?: string; clear: boolean }),
      )
      .command(
        'promote <name> <version>',
        "make a device's checked-in version (a branch) the image's shared version, which every assigned device starts from (audited)",
        (y) => y.positional('name', { type: 'string', demandOption: true }).positional('version', { type: 'string', demandOption: true }),
        (a) => promote(a as A & { name: string; version: string }),
      )
      .command(
        'trust <name> <device>',
        "let a device's first-touch traces shape the prefetch order of every device on the image (audited)",
        (y) => y.positional('name', { type: 'string', demandOption: true }).positional('device', { type: 'string', demandOption: true }),
        (a) => trust(a as A & { name: string; device: string }, true),
      )
      .command(
        'untrust <name> <device>',
        "stop a device's traces from reaching other devices on the image (audited)",
        (y) => y.positional('name', { type: 'string', demandOption: true }).positional('device', { type: 'string', demandOption: true }),
        (a) => trust(a as A & { name: string; device: string }, false),
      )
      .demandCommand(1, 'name an image command'),
  );
}

