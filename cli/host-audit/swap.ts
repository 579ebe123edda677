// Swap and hibernation: where guest RAM the kernel pages out, or an image of all
// memory, would land on disk, and whether it is encrypted there.
import path from 'node:path';
import type { HostCheck } from './host.js';
import { Host, quote } from './host.js';

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

export function swapAreas(h: Host): SwapArea[] {
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

export function checkSwap(h: Host): Omit<HostCheck, 'id'> {
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


// ---- hibernation ----

export function checkHibernation(h: Host): Omit<HostCheck, 'id'> {
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

