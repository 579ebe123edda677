// lethe vm snapshot: boots the test guest and saves it as a source image — the data
// disk (disk.raw), the guest RAM file itself (ram.bin) and QEMU's device state
// without RAM (state.bin, DESIGN.md "Memory path").
import { randomBytes } from 'node:crypto';
import fs from 'node:fs';
import path from 'node:path';
import type { Argv } from 'yargs';
import { MAX_TIMER_MS, parseDuration } from '../common/duration.js';
import { LetheError } from '../common/errors.js';
import { buildGuest } from '../guest-driver/build.js';
import { buildDebianGuest, debianCmdline, sshMarker } from '../guest-driver/debian.js';
import { SECRET_EVERY, secretMarker } from '../guest-driver/page-format.js';
import { ACCEL_CHOICES, Vm, chooseAccel, guestCmdline, makeRunDir, type Accel, type AccelChoice } from '../agent/index.js';
import { emit, type OutOpts } from './output.js';

const MiB = 1024 * 1024;
/**
 * What the test guest (kernel 6.1, initramfs, lethe-guestd) takes of its RAM beside
 * the workload, measured under TCG as the largest workload that reaches its third
 * verify pass before the guest's OOM killer ends it:
 *   --mem     96M 128M 192M 256M 384M 512M 768M 1024M
 *   workload   11   43  104  166  291  416  631   872 MiB
 *   guest      85   85   88   90   93   96  137   152 MiB
 * GUEST_BASE_MIB and 1/GUEST_RAM_SHARE of the RAM (struct pages, page tables,
 * watermarks) cover it up to 512M. With more, the kernel turns transparent huge
 * pages on (mm/huge_memory.c hugepage_init: 512 MiB of its own count, reached a
 * little above --mem 512M) and khugepaged raises min_free_kbytes to 2 + 9 pageblocks
 * of 2 MiB per memory zone, at most 5% of RAM (set_recommended_min_free_kbytes; the
 * OOM report at 1024M shows min:44344kB): 44 MiB with q35's DMA and DMA32 zones, and
 * by the same code 66 MiB with a Normal zone, once q35 maps RAM above 4 GiB (--mem
 * 2816M or more; not measured). The rule leaves 6 MiB or more below each measured
 * figure, and the largest workload it allows reached its third pass at 128M (36),
 * 510M (406), 768M (617), 1024M (860) and 2048M (1852 MiB).
 */
const GUEST_BASE_MIB = 88;
const GUEST_RAM_SHARE = 32;
const THP_FROM_MIB = 512;
const THP_RESERVE_SHARE = 20;
const THP_RESERVE_MIB = { twoZones: 44, threeZones: 66 };
const Q35_LOW_RAM_LIMIT_MIB = 2816;
const MAX_MEM_BYTES = 64 * 1024 * MiB;
const SECRET_RE = /^[A-Za-z0-9._:+-]{1,64}$/;
const READY_RE = /^LETHE-WORKLOAD-READY pages=(\d+)/;
/** The Debian guest's second ready line: ssh-agent holds its key (guest-driver/debian/guest/agents-start). */
const AGENTS_READY_RE = /^LETHE-AGENTS-READY /;
/**
 * What the Debian guest takes beside the busybox guest's own (systemd, journald,
 * udevd, dbus, the agents and the driver's service): a margin, not a measurement.
 */
const DEBIAN_EXTRA_MIB = 64;
export const GUEST_KINDS = ['busybox', 'debian'] as const;
export type GuestKind = (typeof GUEST_KINDS)[number];
/** The magic at the start of a QEMU migration stream (migration/savevm.c, QEMU_VM_FILE_MAGIC). */
const QEVM_MAGIC = 'QEVM';
const MIGRATE_TIMEOUT_MS = 60_000;
const FILES = { disk: 'disk.raw', ram: 'ram.bin', state: 'state.bin' } as const;

interface SnapshotArgs extends OutOpts {
  out: string;
  guest: GuestKind;
  sshEvery?: string;
  guestdRestarts?: string;
  mem: string;
  workloadMib: number;
  secret?: string;
  interval: string;
  accel: AccelChoice;
  timeout: string;
  force?: boolean;
}

interface Plan {
  out: string;
  guest: GuestKind;
  /** Debian guest: seconds between the agents' ssh-add -l, and between restarts of the driver (none without). */
  sshEveryS?: number;
  guestdRestartsS?: number;
  memBytes: number;
  workloadMib: number;
  secret: string;
  intervalMs: number;
  accel: AccelChoice;
  timeoutMs: number;
}

export function vmCommand(y: Argv) {
  return y.command('vm', 'run the test guest under QEMU', (y) =>
    y
      .command(
        'snapshot',
        'boot the test guest and save its disk, RAM and device state as a source image',
        (y) =>
          y
            .option('out', { type: 'string', demandOption: true, describe: 'directory for disk.raw, ram.bin and state.bin' })
            .option('guest', { choices: GUEST_KINDS, default: 'busybox' as GuestKind, describe: 'the busybox test guest, or Debian 12 with systemd (built as root on first use)' })
            .option('mem', { type: 'string', default: '256M', describe: 'guest RAM (e.g. 128M, 1G)' })
            .option('workload-mib', { type: 'number', default: 64, describe: 'MiB of checksummed pages the workload fills' })
            .option('secret', { type: 'string', describe: 'marker the workload plants in its pages (default: random)' })
            .option('interval', { type: 'string', default: '1s', describe: "pause between the workload's verification passes" })
            .option('ssh-every', { type: 'string', describe: "Debian guest: time between the test user's ssh-add -l (default 20s)" })
            .option('guestd-restarts', { type: 'string', describe: 'Debian guest: restart the guest driver this often (by systemctl and by SIGKILL, in turn)' })
            .option('accel', { choices: ACCEL_CHOICES, default: 'auto' as AccelChoice, describe: 'KVM, TCG, or KVM when it works' })
            .option('timeout', { type: 'string', default: '120s', describe: 'how long to wait for the workload to be ready' })
            .option('force', { type: 'boolean', describe: 'overwrite an earlier snapshot in --out' }),
        (a) => snapshot(a as unknown as SnapshotArgs),
      )
      .demandCommand(1, 'name a vm command'),
  );
}

async function snapshot(a: SnapshotArgs): Promise<void> {
  const plan = planSnapshot(a);
  const files = prepareOut(plan.out, a.force ?? false);
  const guest = await guestBoot(plan);
  const accel = await chooseAccel(plan.accel, { kernel: guest.vmlinux, initrd: guest.initramfs });
  copySparse(guest.disk, files.disk);
  const run = await bootAndSave(plan, guest, accel, files);
  report(a, plan, guest, accel, files, run);
}

/** What boots and what the snapshot waits for, by guest. */
interface GuestBoot {
  vmlinux: string;
  initramfs: string;
  disk: string;
  append: string;
  /** Console lines the guest prints once it is ready; the first one's group 1 is its page count. */
  ready: { re: RegExp; what: string }[];
  kernelRelease: string;
  stamp: string;
  diskWhat: string;
}

async function guestBoot(plan: Plan): Promise<GuestBoot> {
  const log = (l: string) => process.stderr.write(`lethe: ${l}\n`);
  const workload = { re: READY_RE, what: "the workload's ready line (LETHE-WORKLOAD-READY)" };
  const p = { mib: plan.workloadMib, secret: plan.secret, intervalMs: plan.intervalMs };
  if (plan.guest === 'debian') {
    const g = await buildDebianGuest({ log });
    const append = debianCmdline({ ...p, sshEveryS: plan.sshEveryS, guestdRestartsS: plan.guestdRestartsS });
    const agents = { re: AGENTS_READY_RE, what: "the user agents' ready line (LETHE-AGENTS-READY)" };
    return { ...g, append, ready: [workload, agents], diskWhat: 'root disk (ext4, Debian 12)' };
  }
  const g = await buildGuest({ log });
  return { ...g, append: guestCmdline(p), ready: [workload], diskWhat: 'data disk (ext4)' };
}

// ---- arguments ----

/** @throws LetheError BAD_REQUEST naming the bad option and value. */
function planSnapshot(a: SnapshotArgs): Plan {
  const memBytes = parseSize(a.mem, '--mem');
  if (memBytes === 0 || memBytes > MAX_MEM_BYTES || memBytes % (2 * MiB) !== 0) {
    throw new LetheError('BAD_REQUEST', `--mem '${a.mem}' is not usable guest RAM`, {
      hint: 'use a multiple of 2M up to 64G, e.g. --mem 256M',
    });
  }
  // The workload is what the snapshot waits for (its ready line): without one there is nothing to wait for.
  const workloadMib = Number(a.workloadMib);
  if (!Number.isInteger(workloadMib) || workloadMib < 1) {
    throw new LetheError('BAD_REQUEST', `bad --workload-mib: '${a.workloadMib}'`, { hint: 'use a whole number of MiB from 1, e.g. 16' });
  }
  checkWorkloadFits(workloadMib, memBytes / MiB, a.mem, a.guest === 'debian' ? DEBIAN_EXTRA_MIB : 0);
  const secret = a.secret ?? `lethe-${randomBytes(8).toString('hex')}`;
  if (!SECRET_RE.test(secret)) {
    throw new LetheError('BAD_REQUEST', `bad --secret: '${secret}'`, {
      hint: 'use 1 to 64 letters, digits or . _ : + - (it goes on the kernel command line)',
    });
  }
  const timeoutMs = parseDuration(a.timeout, '--timeout', { max: MAX_TIMER_MS });
  const intervalMs = parseDuration(a.interval, '--interval', { max: MAX_TIMER_MS });
  const seconds = (v: string | undefined, flag: string) => {
    if (v === undefined) return undefined;
    if (a.guest !== 'debian') throw new LetheError('BAD_REQUEST', `${flag} is for the Debian guest`, { hint: `add --guest debian, or leave ${flag} out` });
    const ms = parseDuration(v, flag, { max: MAX_TIMER_MS });
    if (ms < 1000 || ms % 1000 !== 0) throw new LetheError('BAD_REQUEST', `bad ${flag}: '${v}'`, { hint: 'use whole seconds from 1s, e.g. 20s' });
    return ms / 1000;
  };
  const sshEveryS = seconds(a.sshEvery, '--ssh-every');
  const guestdRestartsS = seconds(a.guestdRestarts, '--guestd-restarts');
  return { out: path.resolve(a.out), guest: a.guest ?? 'busybox', sshEveryS, guestdRestartsS, memBytes, workloadMib, secret, intervalMs, accel: a.accel, timeoutMs };
}

/** What the guest itself takes of `memMib` (see GUEST_BASE_MIB). */
function guestOwnMib(memMib: number): number {
  const thpCap = memMib >= Q35_LOW_RAM_LIMIT_MIB ? THP_RESERVE_MIB.threeZones : THP_RESERVE_MIB.twoZones;
  const thp = memMib >= THP_FROM_MIB ? Math.min(memMib / THP_RESERVE_SHARE, thpCap) : 0;
  return GUEST_BASE_MIB + Math.ceil(memMib / GUEST_RAM_SHARE + thp);
}

/** The largest workload that fits in `memMib` of guest RAM (0 or less: none). */
export const largestWorkloadMib = (memMib: number) => memMib - guestOwnMib(memMib);

/** The smallest --mem (a multiple of 2 MiB) that holds a `workloadMib` workload. */
export function smallestMemMib(workloadMib: number): number {
  let mem = 2 * Math.ceil((workloadMib + GUEST_BASE_MIB) / 2);
  while (largestWorkloadMib(mem) < workloadMib) mem += 2;
  return mem;
}

/**
 * A workload that leaves the guest less than it needs is killed by the guest's OOM
 * killer, and the snapshot fails with a console dump: refuse it before booting.
 * @throws LetheError BAD_REQUEST naming both values, with the --mem and workload that fit.
 */
function checkWorkloadFits(workloadMib: number, memMib: number, memText: string, extraMib: number): void {
  const largest = largestWorkloadMib(memMib) - extraMib;
  if (workloadMib <= largest) return;
  const mem = `use --mem ${smallestMemMib(workloadMib + extraMib)}M or more for this workload`;
  throw new LetheError('BAD_REQUEST', `--workload-mib ${workloadMib} does not fit in --mem ${memText}: the guest itself needs ${guestOwnMib(memMib) + extraMib} MiB of it`, {
    hint: largest > 0 ? `${mem}, or --workload-mib ${largest} or less with this --mem` : mem,
  });
}

const SIZE_UNITS: Record<string, number> = { K: 1024, M: MiB, G: 1024 * MiB, T: 1024 * 1024 * MiB };

/**
 * "256M", "1G", "512MiB"; a bare number is MiB, as for QEMU's -m.
 * @throws LetheError BAD_REQUEST quoting the bad value.
 */
export function parseSize(text: string, what = 'size'): number {
  const m = /^\s*(\d+)\s*(?:([KMGT])(?:i?B)?)?\s*$/i.exec(String(text));
  if (!m) {
    throw new LetheError('BAD_REQUEST', `bad ${what}: '${text}'`, { hint: 'use a size with a unit, e.g. 128M or 1G' });
  }
  return Number(m[1]) * (m[2] ? SIZE_UNITS[m[2].toUpperCase()] : MiB);
}

type OutFiles = Record<keyof typeof FILES, string>;

/** @throws LetheError CONFIG when --out holds an earlier snapshot and --force is not given. */
function prepareOut(out: string, force: boolean): OutFiles {
  fs.mkdirSync(out, { recursive: true });
  const files = Object.fromEntries(Object.entries(FILES).map(([k, f]) => [k, path.join(out, f)])) as OutFiles;
  const existing = Object.values(FILES).filter((f) => fs.existsSync(path.join(out, f)));
  if (existing.length && !force) {
    throw new LetheError('CONFIG', `'${out}' already holds a snapshot (${existing.join(', ')})`, {
      hint: 'choose another --out, or add --force to replace it',
    });
  }
  // An existing RAM file would become the new guest's initial RAM.
  for (const f of Object.values(files)) fs.rmSync(f, { force: true });
  return files;
}

const COPY_BLOCK = 64 * 1024;

/** Copies a disk image leaving all-zero blocks as holes, so the copy takes the space the image's data takes. */
function copySparse(src: string, dst: string): void {
  const from = fs.openSync(src, 'r');
  const to = fs.openSync(dst, 'w', 0o600);
  try {
    const buf = Buffer.alloc(COPY_BLOCK);
    let at = 0;
    for (let got; (got = fs.readSync(from, buf, 0, COPY_BLOCK, at)) > 0; at += got) {
      const block = buf.subarray(0, got);
      if (block.some((b) => b !== 0)) fs.writeSync(to, block, 0, got, at);
    }
    fs.ftruncateSync(to, at);
  } finally {
    fs.closeSync(from);
    fs.closeSync(to);
  }
}

// ---- the guest run ----

interface RunResult {
  pages: number;
  bootToReadySeconds: number;
  saveSeconds: number;
}

/** Boots the guest, waits for the workload, saves the device state; QEMU is gone when this returns or throws. */
async function bootAndSave(plan: Plan, guest: GuestBoot, accel: Accel, files: OutFiles): Promise<RunResult> {
  const runDir = makeRunDir();
  const vm = await Vm.start(
    {
      kernel: guest.vmlinux,
      initrd: guest.initramfs,
      append: guest.append,
      memBytes: plan.memBytes,
      memPath: files.ram,
      disk: files.disk,
      accel,
      qmpSocket: path.join(runDir, 'qmp.sock'),
      hintSocket: path.join(runDir, 'hint.sock'),
    },
    runDir,
  ).catch((e: unknown) => {
    if (accel !== 'kvm' || !(e instanceof LetheError)) throw e;
    throw new LetheError(e.code, e.message, { cause: e.cause, hint: 'KVM could not run the guest on this host; use --accel tcg or auto' });
  });
  try {
    const deadline = Date.now() + plan.timeoutMs;
    const ready = await vm.waitForConsole(guest.ready[0].re, plan.timeoutMs, guest.ready[0].what);
    for (const r of guest.ready.slice(1)) await vm.waitForConsole(r.re, Math.max(deadline - Date.now(), 1), r.what);
    const bootToReadySeconds = (performance.now() - vm.startedAt) / 1000;
    const t0 = performance.now();
    await saveDeviceState(vm, files.state);
    await vm.quit();
    return { pages: Number(ready[1]), bootToReadySeconds, saveSeconds: (performance.now() - t0) / 1000 };
  } catch (e) {
    await vm.kill();
    fs.rmSync(files.state, { force: true });
    throw e;
  }
}

/**
 * Stops the vCPUs and migrates the device state, without the shared RAM, to `file`.
 * @throws LetheError INTERNAL when QEMU refuses, the migration fails, or the file is not a migration stream.
 */
async function saveDeviceState(vm: Vm, file: string): Promise<void> {
  await vm.qmp.execute('stop');
  await vm.saveState(`exec:cat > ${shellQuote(file)}`, MIGRATE_TIMEOUT_MS);
  const head = Buffer.alloc(4);
  const fd = fs.openSync(file, 'r');
  try {
    fs.readSync(fd, head, 0, 4, 0);
  } finally {
    fs.closeSync(fd);
  }
  if (head.toString('latin1') !== QEVM_MAGIC) {
    throw new LetheError('VM_FAILED', `the saved device state '${file}' does not start with ${QEVM_MAGIC}`);
  }
}

function shellQuote(s: string): string {
  return `'${s.replace(/'/g, `'\\''`)}'`;
}

// ---- output ----

function report(a: SnapshotArgs, plan: Plan, guest: GuestBoot, accel: Accel, files: OutFiles, run: RunResult): void {
  const info = (f: string) => {
    const st = fs.statSync(f);
    return { path: f, bytes: st.size, allocatedBytes: st.blocks * 512 };
  };
  const result = {
    out: plan.out,
    files: { disk: info(files.disk), ram: info(files.ram), state: info(files.state) },
    memBytes: plan.memBytes,
    workloadMib: plan.workloadMib,
    pages: run.pages,
    secret: plan.secret,
    marker: secretMarker(plan.secret),
    ...(plan.guest === 'debian' ? { sshMarker: sshMarker(plan.secret) } : {}),
    secretEvery: SECRET_EVERY,
    accel,
    bootToReadySeconds: round(run.bootToReadySeconds),
    saveSeconds: round(run.saveSeconds),
    guest: { kind: plan.guest, kernelRelease: guest.kernelRelease, stamp: guest.stamp },
  };
  const f = result.files;
  emit(a, result, () =>
    [
      `snapshot of the test guest in ${plan.out}`,
      `  ${FILES.disk.padEnd(10)} ${size(f.disk.bytes).padStart(10)}  ${guest.diskWhat}`,
      `  ${FILES.ram.padEnd(10)} ${size(f.ram.bytes).padStart(10)}  guest RAM, plaintext (${size(f.ram.allocatedBytes)} allocated)`,
      `  ${FILES.state.padEnd(10)} ${size(f.state.bytes).padStart(10)}  device state (QEMU migration stream without RAM)`,
      `workload ready ${result.bootToReadySeconds} s after start (${accel}, kernel ${guest.kernelRelease}): ${run.pages} pages`,
      `secret marker ${result.marker} in every ${SECRET_EVERY}th page`,
    ].join('\n'),
  );
}

const round = (s: number) => Math.round(s * 100) / 100;

function size(bytes: number): string {
  if (bytes >= MiB) return `${(bytes / MiB).toFixed(1)} MiB`;
  return `${(bytes / 1024).toFixed(1)} KiB`;
}
