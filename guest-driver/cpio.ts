// A writer for cpio "newc" archives, the format the Linux kernel unpacks as an
// initramfs (Documentation/driver-api/early-userspace/buffer-format.rst).
//
// Each entry is a 110-byte ASCII header ("070701" and 13 fields of 8 hex digits),
// the NUL-terminated name padded to 4 bytes, then the data padded to 4 bytes. The
// archive ends with an entry named "TRAILER!!!". Entries are owned by root and
// dated 0 so the same inputs give the same bytes.

export const NEWC_MAGIC = '070701';
export const NEWC_TRAILER = 'TRAILER!!!';

const S_IFDIR = 0o040000;
const S_IFREG = 0o100000;
const S_IFLNK = 0o120000;
const S_IFCHR = 0o020000;

interface Entry {
  name: string;
  mode: number;
  data: Buffer;
  nlink: number;
  rdevMajor: number;
  rdevMinor: number;
}

export class CpioWriter {
  private readonly entries: Entry[] = [];
  private readonly names = new Set<string>();

  /** Adds a directory; parents are added first when missing. */
  dir(path: string, mode = 0o755): this {
    return this.add(path, S_IFDIR | mode, Buffer.alloc(0), { nlink: 2 });
  }

  file(path: string, data: Uint8Array | string, mode = 0o644): this {
    return this.add(path, S_IFREG | mode, Buffer.from(data));
  }

  symlink(path: string, target: string): this {
    return this.add(path, S_IFLNK | 0o777, Buffer.from(target));
  }

  /** A character device node, e.g. /dev/console (5, 1), which the kernel opens for init. */
  charDevice(path: string, major: number, minor: number, mode = 0o600): this {
    return this.add(path, S_IFCHR | mode, Buffer.alloc(0), { rdevMajor: major, rdevMinor: minor });
  }

  /** The archive, trailer included. */
  finish(): Buffer {
    const parts: Buffer[] = [];
    this.entries.forEach((e, i) => parts.push(...encodeEntry(e, i + 1)));
    parts.push(...encodeEntry({ name: NEWC_TRAILER, mode: 0, data: Buffer.alloc(0), nlink: 1, rdevMajor: 0, rdevMinor: 0 }, 0));
    return Buffer.concat(parts);
  }

  /** @throws Error on an empty name, a name given twice, or a field too big for 8 hex digits. */
  private add(path: string, mode: number, data: Buffer, extra: Partial<Entry> = {}): this {
    const name = normalize(path);
    if (this.names.has(name)) {
      if ((mode & S_IFDIR) !== 0 && this.entries.find((e) => e.name === name)!.mode === mode) return this;
      throw new Error(`cpio: '${name}' added twice`);
    }
    if (data.length > 0xffffffff) throw new Error(`cpio: '${name}' is too large for newc (${data.length} bytes)`);
    const parent = name.includes('/') ? name.slice(0, name.lastIndexOf('/')) : '';
    if (parent && !this.names.has(parent)) this.dir(parent);
    this.names.add(name);
    this.entries.push({ name, mode, data, nlink: 1, rdevMajor: 0, rdevMinor: 0, ...extra });
    return this;
  }
}

/** "/bin/sh" and "bin/sh/" both name "bin/sh": newc names are relative, without a leading slash. */
function normalize(path: string): string {
  const name = path.split('/').filter((p) => p && p !== '.').join('/');
  if (!name || name.split('/').includes('..')) throw new Error(`cpio: bad entry name '${path}'`);
  return name;
}

function encodeEntry(e: Entry, ino: number): Buffer[] {
  const name = Buffer.from(e.name + '\0');
  const fields = [ino, e.mode, 0, 0, e.nlink, 0, e.data.length, 0, 0, e.rdevMajor, e.rdevMinor, name.length, 0];
  const header = Buffer.from(NEWC_MAGIC + fields.map(hex8).join(''), 'ascii');
  return [header, name, pad(header.length + name.length), e.data, pad(e.data.length)];
}

function hex8(n: number): string {
  return n.toString(16).padStart(8, '0');
}

function pad(length: number): Buffer {
  return Buffer.alloc((4 - (length % 4)) % 4);
}
