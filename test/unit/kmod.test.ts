import { expect } from 'chai';
import { loadOrder, moduleDepends, moduleName, readModinfo } from '../../guest-driver/kmod.js';
import { MAGIC_MEM, PAGE_SIZE, checkPage, encodePage, secretMarker } from '../../guest-driver/page-format.js';

/** A minimal little-endian ELF64 object with a .modinfo section, as a .ko has. */
function fakeKo(modinfo: string[]): Buffer {
  const shstrtab = Buffer.from('\0.shstrtab\0.modinfo\0');
  const info = Buffer.from(modinfo.join('\0') + '\0');
  const dataAt = 64;
  const shoff = dataAt + shstrtab.length + info.length;
  const elf = Buffer.alloc(shoff + 3 * 64);
  Buffer.from([0x7f, 0x45, 0x4c, 0x46, 2, 1, 1]).copy(elf);
  elf.writeBigUInt64LE(BigInt(shoff), 0x28);
  elf.writeUInt16LE(64, 0x3a); // e_shentsize
  elf.writeUInt16LE(3, 0x3c); // e_shnum: null, .shstrtab, .modinfo
  elf.writeUInt16LE(1, 0x3e); // e_shstrndx
  shstrtab.copy(elf, dataAt);
  info.copy(elf, dataAt + shstrtab.length);
  const section = (i: number, name: number, offset: number, size: number) => {
    elf.writeUInt32LE(name, shoff + i * 64);
    elf.writeBigUInt64LE(BigInt(offset), shoff + i * 64 + 0x18);
    elf.writeBigUInt64LE(BigInt(size), shoff + i * 64 + 0x20);
  };
  section(1, 1, dataAt, shstrtab.length);
  section(2, 11, dataAt + shstrtab.length, info.length);
  return elf;
}

describe('kernel module order from .modinfo', () => {
  const kos: Record<string, Buffer> = {
    ext4: fakeKo(['softdep=pre: crypto-crc32c', 'depends=jbd2,mbcache,crc16', 'name=ext4']),
    jbd2: fakeKo(['depends=', 'name=jbd2']),
    mbcache: fakeKo(['depends=', 'name=mbcache']),
    crc16: fakeKo(['depends=', 'name=crc16']),
    virtio_pci: fakeKo(['depends=virtio_pci_modern_dev,virtio,virtio_ring', 'name=virtio_pci']),
    virtio_pci_modern_dev: fakeKo(['depends=virtio', 'name=virtio_pci_modern_dev']),
    virtio: fakeKo(['depends=', 'name=virtio']),
    virtio_ring: fakeKo(['depends=virtio', 'name=virtio_ring']),
    loop_a: fakeKo(['depends=loop_b']),
    loop_b: fakeKo(['depends=loop_a']),
  };
  const index = new Map(Object.keys(kos).map((k) => [k, k]));
  const read = (name: string) => kos[name];

  it('reads key=value pairs and the dependency list', () => {
    expect(readModinfo(kos.ext4)).to.deep.include(['softdep', 'pre: crypto-crc32c']);
    expect(moduleDepends(kos.ext4)).to.deep.equal(['jbd2', 'mbcache', 'crc16']);
    expect(moduleDepends(kos.jbd2)).to.deep.equal([]);
  });

  it('puts every module after its dependencies, each once', () => {
    const order = loadOrder(['virtio_pci', 'ext4', 'virtio'], index, read);
    expect(order).to.deep.equal(['virtio', 'virtio_pci_modern_dev', 'virtio_ring', 'virtio_pci', 'jbd2', 'mbcache', 'crc16', 'ext4']);
  });

  it('names a missing module and who needs it, and refuses a cycle', () => {
    const partial = new Map([['ext4', 'ext4']]);
    expect(() => loadOrder(['ext4'], partial, read)).to.throw("kernel module 'jbd2' (needed by ext4) is not in the kernel package");
    expect(() => loadOrder(['loop_a'], index, read)).to.throw("kernel modules depend on each other in a cycle through 'loop_a'");
  });

  it("treats '-' and '_' alike in module names", () => {
    expect(moduleName('/lib/modules/x/virtio-rng.ko')).to.equal('virtio_rng');
  });

  it('refuses a file that is not ELF64', () => {
    expect(() => readModinfo(Buffer.from('not an elf file, long enough to have a header of sixty-four bytes'), 'x.ko')).to.throw(
      'x.ko is not a little-endian ELF64 object',
    );
  });
});

describe('workload page format', () => {
  it('checks a page it encoded, marker included, and notices one flipped bit', () => {
    const page = encodePage({ magic: MAGIC_MEM, index: 8, seq: 3, marker: secretMarker('s3cret') });
    expect(page.length).to.equal(PAGE_SIZE);
    expect(checkPage(page, MAGIC_MEM)).to.deep.equal({ ok: true, index: 8, seq: 3, flags: 1 });
    expect(page.indexOf('LETHE-SECRET[s3cret]')).to.equal(64);
    page[4000] ^= 1;
    expect(checkPage(page, MAGIC_MEM)).to.deep.equal({ ok: false, reason: 'checksum' });
  });
});
