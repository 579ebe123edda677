// `lethe audit host`: the ways this laptop could write VM plaintext or keys to disk, or
// let another program read them, each with what to change (docs/host-audit.md).
// Every check reads the kernel's own files under `root`, so tests can lay out a /proc
// and /sys tree for cases this machine is not in.
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { DISK_CHUNK_SIZE, DISK_LARGE_BUFFER_BYTES, DISK_REPLY_BUFFER_BYTES, DISK_REPLY_BUFFERS, DISK_TRANSIT_BUFFERS, FAULT_PAGE_BUFFERS, KEY_BYTES, KEY_RING_MAX_KEYS, KEY_SLAB_SLOTS, MEM_CHUNK_SIZE } from '../common/constants.js';
import { LetheError, errorChain } from '../common/errors.js';
import { formatBytes } from '../policies/format.js';

export type CheckStatus = 'ok' | 'warn' | 'fail';
export type CheckId = 'swap' | 'core-dumps' | 'hibernation' | 'ptrace-scope' | 'memlock' | 'kdump' | 'agent-unit';

export interface HostCheck {
  id: CheckId;
  status: CheckStatus;
  found: string;
  /** What to change; empty when nothing needs to. */
  fix: string;
}

export interface HostAudit {
  checks: HostCheck[];
  /** No check failed (warnings do not count). */
  ok: boolean;
}

export interface HostAuditOptions {
  /** Where the kernel's /proc and /sys are found (default '/'). */
  root?: string;
  /** Whose resource limits and mounts to check: a process id, as a number or as the digits given to --pid (default: this process). */
  pid?: number | string;
  /** The home whose systemd user units are looked at (default: this user's). */
  home?: string;
}

const MiB = 1024 * 1024;

const PAGE = 4096;
/** sodium_malloc locks the size asked for plus a 16-byte canary, in whole pages. */
const locked = (bytes: number) => Math.ceil((bytes + 16) / PAGE) * PAGE;

// What the agent locks with sodium_malloc at its defaults (common/constants.ts).
const AGENT_LOCKS = {
  diskReplies: locked(DISK_REPLY_BUFFERS * DISK_REPLY_BUFFER_BYTES),
  diskTransit: locked(DISK_TRANSIT_BUFFERS * DISK_CHUNK_SIZE),
  pagePool: locked(FAULT_PAGE_BUFFERS * MEM_CHUNK_SIZE),
  keySlab: locked(KEY_SLAB_SLOTS * KEY_BYTES),
  // Single keys, device-state chunks and scratch: each allocation locks whole pages.
  scratch: 1 * MiB,
  // Made the first time an NBD request is longer than a reply buffer or finds none free
  // within 100 ms: one buffer of the largest payload, which such requests take in turn
  // (agent/disk/backend.ts).
  diskLarge: locked(DISK_LARGE_BUFFER_BYTES),
};

/**
 * Bytes the agent locks once it serves a VM, and at most: with the large disk buffer
 * made and its key ring grown to hold `keys` keys (by default all it may hold).
 */
export function agentLockedBytes(keys = KEY_RING_MAX_KEYS): { atStart: number; atMost: number } {
  const l = AGENT_LOCKS;
  const atStart = l.diskReplies + l.diskTransit + l.pagePool + l.keySlab + l.scratch;
  const slabs = Math.max(1, Math.ceil(keys / KEY_SLAB_SLOTS));
  return { atStart, atMost: atStart + (slabs - 1) * l.keySlab + l.diskLarge };
}

/** Reads the kernel's files under a root; paths in messages are the kernel's own. */
class Host {
  constructor(
    private readonly root: string,
    readonly pid: number | 'self',
    readonly home: string,
  ) {}

  private at(p: string): string {
    return path.join(this.root, p);
  }

  get proc(): string {
    return `/proc/${this.pid}`;
  }

  /** Whose limits the findings name. */
  get who(): string {
    return this.pid === 'self' ? 'this shell' : `process ${this.pid}`;
  }

  /** Said after a limit found fine in this process: the agent runs under its own unit and limits. */
  get agentMayDiffer(): string {
    return this.pid === 'self' ? " (the agent's may differ: --pid)" : '';
  }

  /** The file's text, or undefined when it does not exist; throws, naming it, when it cannot be read. */
  read(p: string): string | undefined {
    try {
      return fs.readFileSync(this.at(p), 'utf8');
    } catch (e) {
      if (missing(e)) return undefined;
      throw new Error(`cannot read ${p} (${codeOf(e)})`);
    }
  }

  list(dir: string): string[] {
    try {
      return fs.readdirSync(this.at(dir)).sort();
    } catch (e) {
      if (missing(e)) return [];
      throw new Error(`cannot list ${dir} (${codeOf(e)})`);
    }
  }

  exists(p: string): boolean {
    return fs.existsSync(this.at(p));
  }

  /** The last part of a symlink's target (sysfs links name devices that way). */
  linkName(p: string): string | undefined {
    try {
      return path.basename(fs.readlinkSync(this.at(p)));
    } catch {
      return undefined;
    }
  }
}

const codeOf = (e: unknown) => (e as NodeJS.ErrnoException).code ?? errorChain(e);
const missing = (e: unknown) => ['ENOENT', 'ENOTDIR'].includes(String((e as NodeJS.ErrnoException).code));
const quote = (s: string) => `'${s.length > 40 ? s.slice(0, 40) + '…' : s}'`;

/** A one-line kernel value, or a clear error quoting what was there instead. */
function oneOf<T extends string>(h: Host, p: string, allowed: readonly T[]): T | undefined {
  const text = h.read(p);
  if (text === undefined) return undefined;
  const v = text.trim();
  if (!(allowed as readonly string[]).includes(v)) throw new Error(`${p} holds ${quote(v)}, not one of ${allowed.join(', ')}`);
  return v as T;
}

// ---- swap ----

type SwapKind = 'zram' | 'dm-crypt' | 'plain' | 'unknown';

interface SwapArea {
  path: string;
  /** A swap file, a zram device, or another block device (a partition, LVM volume and such). */
  type: 'file' | 'zram' | 'partition' | 'other';
  kind: SwapKind;
  why?: string;
  /** Where a zram device writes idle pages back to. */
  backing?: string;
}

/** /proc/swaps escapes spaces and such as \ooo. */
const unescape = (s: string) => s.replace(/\\([0-7]{3})/g, (_, o: string) => String.fromCharCode(parseInt(o, 8)));

function swapAreas(h: Host): SwapArea[] {
  const text = h.read('/proc/swaps');
  if (text === undefined) return []; // a kernel built without swap
  const [header, ...lines] = text.split('\n');
  if (!header.startsWith('Filename')) throw new Error(`/proc/swaps starts with ${quote(header)}, not its header`);
  return lines.filter((l) => l.trim()).map((l) => swapArea(h, l));
}

function swapArea(h: Host, line: string): SwapArea {
  const [name, type] = line.trim().split(/\s+/);
  const file = unescape(name).replace(/ \(deleted\)$/, '');
  if (type === 'partition') {
    const dev = blockName(h, file);
    return { path: file, type: dev.startsWith('zram') ? 'zram' : 'partition', ...deviceKind(h, dev) };
  }
  if (type !== 'file') return { path: file, type: 'other', kind: 'unknown', why: `type ${quote(type ?? '')} in /proc/swaps` };
  const dev = deviceOfFile(h, file);
  return { path: file, type: 'file', ...(dev ? deviceKind(h, dev) : { kind: 'unknown', why: 'cannot tell which disk holds it' }) };
}

/** sysfs's name for /dev/X, /dev/dm-N or /dev/mapper/NAME. */
function blockName(h: Host, dev: string): string {
  const mapped = /^\/dev\/mapper\/(.+)$/.exec(dev);
  if (mapped) {
    const dm = h.list('/sys/class/block').find((d) => h.read(`/sys/class/block/${d}/dm/name`)?.trim() === mapped[1]);
    if (dm) return dm;
  }
  return path.basename(dev);
}

function deviceKind(h: Host, name: string, depth = 0): { kind: SwapKind; why?: string; backing?: string } {
  const dir = `/sys/class/block/${name}`;
  if (name.startsWith('zram')) {
    // zram can write idle pages out to a backing device (CONFIG_ZRAM_WRITEBACK):
    // they are as safe as that device is
    const backing = h.read(`${dir}/backing_dev`)?.trim();
    if (!backing || backing === 'none') return { kind: 'zram' };
    if (depth >= 8) return { kind: 'unknown', why: 'zram writing back to zram, too deep' };
    const k = deviceKind(h, blockName(h, backing), depth + 1);
    if (k.kind === 'dm-crypt') return { kind: 'zram', why: `writes back to ${backing}, dm-crypt`, backing };
    return { kind: k.kind, why: `zram writes back to ${backing}${k.why ? `, ${k.why}` : ''}`, backing };
  }
  if (!h.exists(dir)) return { kind: 'unknown', why: `no ${dir}` };
  return { kind: encrypted(h, name, 0) ? 'dm-crypt' : 'plain' };
}

/**
 * cryptsetup names the device it maps CRYPT-TYPE-…; these types do not encrypt: dm-integrity
 * and dm-verity alone, and SUBDEV, the layers under a LUKS2 volume with integrity or a TCRYPT
 * cascade (the volume on top is what encrypts).
 */
const NOT_CRYPT = ['CRYPT-INTEGRITY-', 'CRYPT-VERITY-', 'CRYPT-SUBDEV-'];

/** A dm-crypt device, or one whose data all lands on dm-crypt (LVM on LUKS), however deep. */
function encrypted(h: Host, name: string, depth: number): boolean {
  const uuid = h.read(`/sys/class/block/${name}/dm/uuid`) ?? '';
  if (uuid.startsWith('CRYPT-') && !NOT_CRYPT.some((p) => uuid.startsWith(p))) return true;
  // an LVM volume spanning a LUKS disk and a plain one is not encrypted
  const slaves = h.list(`/sys/class/block/${name}/slaves`);
  return depth < 8 && slaves.length > 0 && slaves.every((s) => encrypted(h, s, depth + 1));
}

/** The block device under the filesystem that holds a swap file, by the longest mount point above it. */
function deviceOfFile(h: Host, file: string): string | undefined {
  const text = h.read(`${h.proc}/mountinfo`) ?? '';
  let best: { at: string; majmin: string; source: string } | undefined;
  for (const line of text.split('\n').filter(Boolean)) {
    const f = line.split(' ');
    const sep = f.indexOf('-');
    if (f.length < 10 || sep < 6) throw new Error(`${h.proc}/mountinfo has a line it cannot read: ${quote(line)}`);
    const at = unescape(f[4]);
    const under = at === '/' || file === at || file.startsWith(at + '/');
    if (under && (!best || at.length >= best.at.length)) best = { at, majmin: f[2], source: unescape(f[sep + 2]) };
  }
  if (!best) return undefined;
  // btrfs and others report an anonymous device number; their source names the disk
  return h.linkName(`/sys/dev/block/${best.majmin}`) ?? (best.source.startsWith('/dev/') ? blockName(h, best.source) : undefined);
}

const ZRAM = 'zram (apt install systemd-zram-generator)';

/** What to change for each kind of plain area: crypttab takes block devices, so only partitions get its lines. */
function plainSwapFixes(plain: SwapArea[]): string {
  const fixes: string[] = [];
  const parts = plain.filter((a) => a.type === 'partition');
  if (parts.length > 0) {
    const name = (i: number) => `cryptswap${i === 0 ? '' : i + 1}`;
    const crypttab = parts.map((a, i) => `'${name(i)} ${a.path} /dev/urandom swap,cipher=aes-xts-plain64,size=512'`).join(', ');
    const fstab = parts.map((_, i) => `'/dev/mapper/${name(i)} none swap sw 0 0'`).join(', ');
    const devs = parts.map((a) => a.path).join(' ');
    fixes.push(`sudo swapoff ${devs} and remove ${parts.length > 1 ? 'them' : 'it'} from /etc/fstab, then use ${ZRAM} or dm-crypt with a random key at each boot (/etc/crypttab: ${crypttab}; /etc/fstab: ${fstab})`);
  }
  for (const a of plain.filter((a) => a.type === 'zram')) {
    const dev = path.basename(a.path);
    fixes.push(
      `turn off writeback for ${a.path} (remove writeback-device from /etc/systemd/zram-generator.conf, or stop writing /sys/block/${dev}/backing_dev) and reboot, or have it write back to a dm-crypt device with a random key instead of ${a.backing ?? 'a plain one'}`,
    );
  }
  const files = plain.filter((a) => a.type === 'file').map((a) => a.path);
  if (files.length > 0) {
    const them = files.length > 1 ? 'them' : 'it';
    fixes.push(`sudo swapoff ${files.join(' ')}, remove ${them} from /etc/fstab and delete ${them}; then use ${ZRAM}, or swap on a partition under dm-crypt with a random key (/etc/crypttab takes a block device, not a file)`);
  }
  return fixes.join('; ');
}

const KIND_TEXT: Record<SwapKind, string> = { zram: 'zram, in RAM', 'dm-crypt': 'dm-crypt', plain: 'plain, on disk', unknown: 'unknown' };
const areaText = (a: SwapArea) => `${a.path} (${KIND_TEXT[a.kind]}${a.why ? `: ${a.why}` : ''})`;

function checkSwap(h: Host): Omit<HostCheck, 'id'> {
  const areas = swapAreas(h);
  const list = areas.map(areaText).join(', ');
  const plain = areas.filter((a) => a.kind === 'plain');
  if (plain.length > 0) {
    return {
      status: 'fail',
      found: `swap without encryption on disk: ${list}; guest RAM is shared memory the kernel may swap out, so guest pages can land there in plaintext`,
      fix: plainSwapFixes(plain),
    };
  }
  if (areas.some((a) => a.kind === 'unknown')) {
    return { status: 'warn', found: `swap that could not be classified: ${list}`, fix: 'check by hand that it is encrypted: swapon --show; lsblk -o NAME,TYPE,FSTYPE' };
  }
  return { status: 'ok', found: areas.length ? `swap is encrypted or in RAM: ${list}` : 'no swap in use', fix: '' };
}

// ---- core dumps ----

/** Where cores go: nowhere, to disk (and where), or to a pipe program that may keep them. */
function coreDestination(h: Host): { stored: 'no' | 'yes' | 'maybe'; where: string } {
  const pattern = (h.read('/proc/sys/kernel/core_pattern') ?? 'core').trim() || 'core';
  if (!pattern.startsWith('|')) {
    const dir = pattern.startsWith('/') ? '' : " in the crashing program's working directory";
    return { stored: 'yes', where: `the kernel writes cores to files named ${quote(pattern)}${dir}` };
  }
  const program = pattern.slice(1).trim().split(/\s+/)[0] ?? '';
  const base = path.basename(program);
  if (base === 'false' || base === 'true') return { stored: 'no', where: `the kernel pipes cores to ${program}, which drops them` };
  if (base === 'systemd-coredump') {
    return coredumpStorage(h) === 'none'
      ? { stored: 'no', where: 'systemd-coredump drops cores (Storage=none)' }
      : { stored: 'yes', where: 'systemd-coredump keeps cores in /var/lib/systemd/coredump' };
  }
  if (base === 'apport') return { stored: 'yes', where: 'apport keeps cores in /var/crash' };
  return { stored: 'maybe', where: `the kernel pipes cores to ${program}, which may keep them` };
}

/** coredump.conf(5): the main file, then drop-ins in name order, /etc over /run over /usr/lib. */
function coredumpStorage(h: Host): string {
  const dropIns = new Map<string, string>();
  for (const dir of ['/usr/lib/systemd/coredump.conf.d', '/run/systemd/coredump.conf.d', '/etc/systemd/coredump.conf.d']) {
    for (const f of h.list(dir).filter((n) => n.endsWith('.conf'))) dropIns.set(f, `${dir}/${f}`);
  }
  const files = ['/etc/systemd/coredump.conf', ...[...dropIns.keys()].sort().map((k) => dropIns.get(k)!)];
  let storage = 'external';
  for (const f of files) {
    for (const m of (h.read(f) ?? '').matchAll(/^\s*Storage\s*=\s*(\S+)/gm)) storage = m[1];
  }
  return storage;
}

interface Limit {
  soft: number;
  hard: number;
}

/** One line of /proc/PID/limits, Infinity for unlimited. */
function limitOf(h: Host, name: string): Limit {
  const file = `${h.proc}/limits`;
  const text = h.read(file);
  if (text === undefined) throw new Error(`no ${file}`);
  const line = text.split('\n').find((l) => l.startsWith(name));
  if (!line) throw new Error(`${file} has no '${name}' line`);
  const [soft, hard] = line.slice(name.length).trim().split(/\s+/).slice(0, 2).map((v) => {
    if (v === 'unlimited') return Infinity;
    if (!/^\d+$/.test(v)) throw new Error(`${file}: '${name}' is ${quote(v)}, not a number`);
    return Number(v);
  });
  if (hard === undefined) throw new Error(`${file}: '${name}' has no hard limit`);
  return { soft, hard };
}

const HARDENED = 'the agent makes itself non-dumpable (agent/daemon/harden.ts); QEMU does not, though it leaves guest RAM out of its cores (dump-guest-core=off)';
const DROP_CORES = "make the kernel drop cores: echo 'kernel.core_pattern=|/bin/false' | sudo tee /etc/sysctl.d/50-lethe-core.conf && sudo sysctl --system";
const COREDUMP_NONE = "or keep systemd-coredump and put 'Storage=none' and 'ProcessSizeMax=0' under [Coredump] in /etc/systemd/coredump.conf.d/lethe.conf";
const SUID_OFF = "set fs.suid_dumpable=0: echo 'fs.suid_dumpable=0' | sudo tee /etc/sysctl.d/50-lethe-suid.conf && sudo sysctl --system";

function checkCoreDumps(h: Host): Omit<HostCheck, 'id'> {
  const dest = coreDestination(h);
  const suidDumps = oneOf(h, '/proc/sys/fs/suid_dumpable', ['0', '1', '2'] as const) === '1';
  const core = limitOf(h, 'Max core file size');
  const size = core.soft === Infinity ? 'unlimited' : core.soft === 0 ? '0' : `${core.soft} bytes`;
  const raise = core.soft === 0 && dest.stored !== 'no' ? ', but a program may raise it and QEMU started elsewhere may have another' : '';
  const suidText = suidDumps ? '; fs.suid_dumpable is 1, so setuid programs dump too' : '';
  const found = (note: string) => `${dest.where}; the core size limit of ${h.who} is ${size}${note}${raise}${suidText}; ${HARDENED}`;
  if (dest.stored === 'no' && !suidDumps) return { status: 'ok', found: found(h.agentMayDiffer), fix: '' };
  if (dest.stored === 'no') return { status: 'warn', found: found(''), fix: SUID_OFF };
  const fixes = [DROP_CORES, ...(dest.where.startsWith('systemd-coredump') ? [COREDUMP_NONE] : []), ...(suidDumps ? [SUID_OFF] : [])];
  const status = dest.stored === 'yes' && core.soft > 0 ? 'fail' : 'warn';
  return { status, found: found(''), fix: fixes.join('; ') };
}

// ---- hibernation ----

function checkHibernation(h: Host): Omit<HostCheck, 'id'> {
  const states = (h.read('/sys/power/state') ?? '').trim().split(/\s+/);
  const modes = h.read('/sys/power/disk')?.trim();
  if (!states.includes('disk') || modes === undefined || modes === '[disabled]') {
    return { status: 'ok', found: "hibernation is not possible (/sys/power/state offers no 'disk')", fix: '' };
  }
  const fix = 'sudo systemctl mask hibernate.target hybrid-sleep.target suspend-then-hibernate.target';
  const image = 'hibernation is possible: it writes an image of all RAM, keys and guest pages included, to swap';
  const areas = swapAreas(h);
  const plain = areas.filter((a) => a.kind === 'plain');
  if (plain.length > 0) return { status: 'fail', found: `${image}, and ${plain.map(areaText).join(', ')} is not encrypted`, fix: `${fix}; and encrypt swap (see swap)` };
  const unknown = areas.filter((a) => a.kind === 'unknown');
  const swapText =
    areas.length === 0
      ? 'there is no swap now, but adding some enables it'
      : unknown.length > 0
        ? `${unknown.map(areaText).join(', ')} could not be classified (see swap), and keys in the image outlive their lease until resume either way`
        : 'swap is encrypted or in RAM, but keys in the image outlive their lease until resume';
  return { status: 'warn', found: `${image}; ${swapText}`, fix };
}

// ---- ptrace ----

function checkPtrace(h: Host): Omit<HostCheck, 'id'> {
  const scope = oneOf(h, '/proc/sys/kernel/yama/ptrace_scope', ['0', '1', '2', '3'] as const);
  const fix = "echo 'kernel.yama.ptrace_scope=1' | sudo tee /etc/sysctl.d/50-lethe-ptrace.conf && sudo sysctl --system";
  if (scope === undefined) {
    return {
      status: 'warn',
      found: "the kernel has no Yama (no /proc/sys/kernel/yama/ptrace_scope): any program of this user may read QEMU's memory, guest RAM included",
      fix: 'use a kernel with Yama (CONFIG_SECURITY_YAMA, in most distributions) and set kernel.yama.ptrace_scope=1',
    };
  }
  if (scope === '0') {
    return {
      status: 'fail',
      found: "ptrace_scope is 0: any program of this user may attach to QEMU and read its memory, guest RAM included (the agent itself is non-dumpable, which refuses that)",
      fix,
    };
  }
  const what = { '1': 'only a parent may attach (the agent to its QEMU)', '2': 'only root may attach', '3': 'no process may attach' }[scope];
  return { status: 'ok', found: `ptrace_scope is ${scope}: ${what}`, fix: '' };
}

// ---- locked memory ----

const CAP_IPC_LOCK = 14;

/** CAP_IPC_LOCK lifts RLIMIT_MEMLOCK for mlock (root usually has it). */
function canLockAnything(h: Host): boolean {
  const m = /^CapEff:\s*([0-9a-f]+)$/im.exec(h.read(`${h.proc}/status`) ?? '');
  return !!m && (BigInt(`0x${m[1]}`) & (1n << BigInt(CAP_IPC_LOCK))) !== 0n;
}

function checkMemlock(h: Host): Omit<HostCheck, 'id'> {
  const { soft } = limitOf(h, 'Max locked memory');
  const limit = soft === Infinity ? 'unlimited' : formatBytes(soft);
  const need = agentLockedBytes();
  const wants = `the agent locks about ${formatBytes(need.atStart)} at its defaults, up to ${formatBytes(need.atMost)} with a full key ring and a busy disk`;
  if (canLockAnything(h)) return { status: 'ok', found: `${h.who} has CAP_IPC_LOCK${h.agentMayDiffer}, so its locked-memory limit (${limit}) does not apply`, fix: '' };
  if (soft >= need.atMost) return { status: 'ok', found: `the locked-memory limit of ${h.who} is ${limit}${h.agentMayDiffer}; ${wants}`, fix: '' };
  const kib = 2 ** Math.ceil(Math.log2(need.atMost / 1024));
  const fix = `raise it where the agent starts: LimitMEMLOCK=infinity in its systemd unit (agent/lethe-agent.service has it; check a running agent with --pid), or 'USER - memlock ${kib}' in /etc/security/limits.conf and log in again`;
  const silent = 'libsodium ignores a refused mlock, so buffers past the limit hold plaintext and keys in memory that can be swapped out';
  const status = soft >= need.atStart ? 'warn' : 'fail';
  return { status, found: `the locked-memory limit of ${h.who} is ${limit}; ${wants}; ${silent}`, fix };
}

// ---- crash dumps ----

function checkKdump(h: Host): Omit<HostCheck, 'id'> {
  const loaded = oneOf(h, '/sys/kernel/kexec_crash_loaded', ['0', '1'] as const);
  if (loaded !== '1') return { status: 'ok', found: loaded === '0' ? 'no crash kernel is loaded' : 'this kernel cannot load a crash kernel', fix: '' };
  return {
    status: 'warn',
    found: 'a crash kernel is loaded (kdump): after a kernel panic it saves all of RAM, keys and guest pages included, to disk (usually /var/crash)',
    fix: 'sudo systemctl disable --now kdump-tools (Debian, Ubuntu) or kdump (Fedora, RHEL)',
  };
}

// ---- the agent's systemd unit ----

const UNIT_FILES = ['lethe-agent@.service', 'lethe-agent.service'];
const unitDirs = (home: string) => [path.join(home, '.config/systemd/user'), '/etc/systemd/user', '/usr/lib/systemd/user', '/etc/systemd/system', '/usr/lib/systemd/system'];

/** Settings the unit must have (a fail without) and should have (a warning): name, value, what goes wrong without. */
const UNIT_MUST: [string, string, string][] = [
  ['LimitCORE', '0', 'a crash of the agent or QEMU may write keys and guest RAM to a core file'],
  ['NoNewPrivileges', 'yes', 'a program the agent or QEMU runs may gain privileges through a setuid binary'],
  ['ProtectSystem', 'strict', 'the agent and its QEMU may write wherever their user can'],
  ['PrivateTmp', 'yes', "the agent's run dir (QEMU's sockets, the state FIFO) is in the /tmp every program shares"],
];
const UNIT_SHOULD: [string, string, string][] = [
  ['UMask', '0077', 'files the agent makes may be readable by other users'],
  ['RestrictSUIDSGID', 'yes', 'the agent may make setuid files'],
];

/** systemd's booleans, as one spelling. */
const unitValue = (v: string) => (/^(yes|true|on|1)$/i.test(v) ? 'yes' : /^(no|false|off)$/i.test(v) ? 'no' : v === '0:0' ? '0' : v);

/** The [Service] settings of a unit file and its drop-ins (`FILE.d/*.conf`, in order; the last one set wins). */
function unitSettings(h: Host, file: string): Map<string, string> {
  const out = new Map<string, string>();
  const texts = [h.read(file), ...h.list(`${file}.d`).filter((f) => f.endsWith('.conf')).map((f) => h.read(`${file}.d/${f}`))];
  for (const text of texts) {
    let service = false;
    for (const raw of (text ?? '').split('\n')) {
      const l = raw.trim();
      if (!l || l.startsWith('#') || l.startsWith(';')) continue;
      if (l.startsWith('[')) {
        service = l === '[Service]';
        continue;
      }
      const eq = l.indexOf('=');
      if (service && eq > 0) out.set(l.slice(0, eq).trim(), unitValue(l.slice(eq + 1).trim()));
    }
  }
  return out;
}

function checkAgentUnit(h: Host): Omit<HostCheck, 'id'> {
  const dirs = unitDirs(h.home);
  const file = dirs.flatMap((d) => UNIT_FILES.map((f) => path.join(d, f))).find((f) => h.exists(f));
  if (!file) {
    return {
      status: 'warn',
      found: `no lethe-agent unit is installed (looked in ${dirs.join(', ')}): an agent started from a shell has none of its limits`,
      fix: 'cp agent/lethe-agent.service ~/.config/systemd/user/lethe-agent@.service && systemctl --user daemon-reload (then run the agent as lethe-agent@IMAGE)',
    };
  }
  const set = unitSettings(h, file);
  const lacking = (wanted: [string, string, string][]) => wanted.filter(([k, v]) => set.get(k) !== v);
  const must = lacking(UNIT_MUST);
  const should = lacking(UNIT_SHOULD);
  const fix = (l: [string, string, string][]) => `add to [Service] in ${file} (or a drop-in in ${file}.d/): ${l.map(([k, v]) => `${k}=${v}`).join(' ')}; then systemctl daemon-reload (--user for a user unit)`;
  const say = (l: [string, string, string][]) => l.map(([k, v, why]) => `${k} is ${set.has(k) ? set.get(k) : 'not set'}, not ${v}: ${why}`).join('; ');
  if (must.length > 0) return { status: 'fail', found: `${file}: ${say(must)}`, fix: fix([...must, ...should]) };
  if (should.length > 0) return { status: 'warn', found: `${file}: ${say(should)}`, fix: fix(should) };
  return { status: 'ok', found: `${file} has ${[...UNIT_MUST, ...UNIT_SHOULD].map(([k, v]) => `${k}=${v}`).join(', ')}`, fix: '' };
}

interface CheckDef {
  id: CheckId;
  /** How a person looks for themself when the check cannot tell. */
  manual: string;
  run(h: Host): Omit<HostCheck, 'id'>;
}

const CHECKS: CheckDef[] = [
  { id: 'swap', manual: 'swapon --show; lsblk -o NAME,TYPE,FSTYPE', run: checkSwap },
  { id: 'core-dumps', manual: 'sysctl kernel.core_pattern fs.suid_dumpable; ulimit -c', run: checkCoreDumps },
  { id: 'hibernation', manual: 'cat /sys/power/state /sys/power/disk; swapon --show', run: checkHibernation },
  { id: 'ptrace-scope', manual: 'sysctl kernel.yama.ptrace_scope', run: checkPtrace },
  { id: 'memlock', manual: 'ulimit -l', run: checkMemlock },
  { id: 'kdump', manual: 'cat /sys/kernel/kexec_crash_loaded', run: checkKdump },
  { id: 'agent-unit', manual: 'systemctl --user cat lethe-agent@.service', run: checkAgentUnit },
];

/** A check that cannot read or make sense of a file says so as a warning, never throws. */
function runCheck(c: CheckDef, h: Host): HostCheck {
  try {
    const r = c.run(h);
    return { id: c.id, status: r.status, found: r.found, fix: r.fix };
  } catch (e) {
    return { id: c.id, status: 'warn', found: `could not tell: ${errorChain(e)}`, fix: `check by hand: ${c.manual}` };
  }
}

const PID_HINT = "give the process id of a running agent, e.g. from pgrep -f 'lethe agent'";

/** A process id as --pid gives it, or as a number; throws BAD_REQUEST, quoting it, for anything but digits. */
function processId(given: number | string): number {
  const text = String(given);
  if (!/^\d+$/.test(text)) throw new LetheError('BAD_REQUEST', `bad --pid: ${quote(text)}`, { hint: PID_HINT });
  return Number(text);
}

/** Runs every check; throws only for a pid that is not digits or names no process. */
export function auditHost(opts: HostAuditOptions = {}): HostAudit {
  const pid = opts.pid === undefined ? 'self' : processId(opts.pid);
  const h = new Host(opts.root ?? '/', pid, opts.home ?? os.homedir());
  if (pid !== 'self' && !h.exists(`${h.proc}/limits`)) {
    throw new LetheError('BAD_REQUEST', `no process ${pid}`, { hint: PID_HINT });
  }
  const checks = CHECKS.map((c) => runCheck(c, h));
  return { checks, ok: checks.every((c) => c.status !== 'fail') };
}
