import { expect } from 'chai';
import { CpioWriter, NEWC_MAGIC, NEWC_TRAILER } from '../../guest-driver/cpio.js';
import { expectSameBytes } from '../helpers/bytes.js';

interface Parsed {
  offset: number;
  ino: number;
  mode: number;
  nlink: number;
  rdevMajor: number;
  rdevMinor: number;
  name: string;
  data: Buffer;
}

/** An independent newc reader, written from the kernel's buffer-format description. */
function parseNewc(buf: Buffer): Parsed[] {
  const entries: Parsed[] = [];
  const align = (n: number) => (n + 3) & ~3;
  let at = 0;
  for (;;) {
    expect(buf.toString('ascii', at, at + 6), `magic at ${at}`).to.equal(NEWC_MAGIC);
    const field = (i: number) => parseInt(buf.toString('ascii', at + 6 + i * 8, at + 14 + i * 8), 16);
    const nameSize = field(11);
    const size = field(6);
    const nameEnd = at + 110 + nameSize;
    expect(buf[nameEnd - 1], 'name is NUL-terminated').to.equal(0);
    const name = buf.toString('latin1', at + 110, nameEnd - 1);
    const dataAt = align(nameEnd);
    entries.push({ offset: at, ino: field(0), mode: field(1), nlink: field(4), rdevMajor: field(9), rdevMinor: field(10), name, data: buf.subarray(dataAt, dataAt + size) });
    at = align(dataAt + size);
    if (name === NEWC_TRAILER) break;
  }
  expect(at, 'nothing after the trailer').to.equal(buf.length);
  return entries;
}

describe('cpio newc writer', () => {
  const archive = () =>
    new CpioWriter()
      .charDevice('/dev/console', 5, 1)
      .file('bin/busybox', Buffer.from('\x7fELF-not-really'), 0o755)
      .symlink('bin/sh', 'busybox')
      .file('init', '#!/bin/sh\necho hi\n', 0o755)
      .file('lib/modules/a.ko', Buffer.alloc(5, 1))
      .finish();

  it('writes entries a reader lists back, parents first, trailer last', () => {
    const names = parseNewc(archive()).map((e) => e.name);
    expect(names).to.deep.equal(['dev', 'dev/console', 'bin', 'bin/busybox', 'bin/sh', 'init', 'lib', 'lib/modules', 'lib/modules/a.ko', NEWC_TRAILER]);
  });

  it('keeps contents, modes, links and device numbers', () => {
    const byName = new Map(parseNewc(archive()).map((e) => [e.name, e]));
    expect(byName.get('bin/busybox')!.data.toString('latin1')).to.equal('\x7fELF-not-really');
    expect(byName.get('bin/busybox')!.mode).to.equal(0o100755);
    expect(byName.get('bin/sh')!.mode).to.equal(0o120777);
    expect(byName.get('bin/sh')!.data.toString()).to.equal('busybox');
    expect(byName.get('dev')!.mode).to.equal(0o040755);
    expect(byName.get('dev')!.nlink).to.equal(2);
    const console = byName.get('dev/console')!;
    expect([console.mode, console.rdevMajor, console.rdevMinor]).to.deep.equal([0o020600, 5, 1]);
    expect(byName.get('lib/modules/a.ko')!.data).to.deep.equal(Buffer.alloc(5, 1));
  });

  it('starts every header on a 4-byte boundary and gives each entry its own inode', () => {
    const entries = parseNewc(archive());
    for (const e of entries) expect(e.offset % 4, e.name).to.equal(0);
    const inodes = entries.filter((e) => e.name !== NEWC_TRAILER).map((e) => e.ino);
    expect(new Set(inodes).size).to.equal(inodes.length);
  });

  it('is the same bytes for the same inputs', () => {
    expectSameBytes(archive(), archive());
  });

  it('refuses a name given twice and names that climb out', () => {
    expect(() => new CpioWriter().file('a', 'x').file('/a', 'y')).to.throw("cpio: 'a' added twice");
    expect(() => new CpioWriter().file('../etc/passwd', 'x')).to.throw("cpio: bad entry name '../etc/passwd'");
    expect(() => new CpioWriter().file('/', 'x')).to.throw("cpio: bad entry name '/'");
  });

  it('accepts a directory named again with the same mode', () => {
    const names = parseNewc(new CpioWriter().dir('tmp').dir('/tmp/').finish()).map((e) => e.name);
    expect(names).to.deep.equal(['tmp', NEWC_TRAILER]);
  });
});
