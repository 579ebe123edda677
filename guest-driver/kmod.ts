// Kernel modules for the test guest without depmod or modinfo: each .ko is an
// ELF64 object whose ".modinfo" section holds NUL-separated "key=value" strings,
// among them "depends=a,b" (module names, '-' written as '_').
import fs from 'node:fs';
import path from 'node:path';

const ELF_MAGIC = Buffer.from([0x7f, 0x45, 0x4c, 0x46]);
const ELFCLASS64 = 2;
const ELFDATA2LSB = 1;

/** Module name → path of its .ko, for every module under `dir`. */
export function indexModules(dir: string): Map<string, string> {
  const index = new Map<string, string>();
  for (const entry of fs.readdirSync(dir, { recursive: true, withFileTypes: true })) {
    if (entry.isFile() && entry.name.endsWith('.ko')) {
      index.set(moduleName(entry.name), path.join(entry.parentPath ?? entry.path, entry.name));
    }
  }
  return index;
}

/** "virtio-rng.ko" → "virtio_rng": the kernel treats '-' and '_' alike in module names. */
export function moduleName(file: string): string {
  return path.basename(file).replace(/\.ko$/, '').replace(/-/g, '_');
}

/** The key=value pairs of a module's .modinfo section; a key may repeat (alias=, parm=). */
export function readModinfo(ko: Buffer, what = 'module'): [string, string][] {
  const section = findSection(ko, '.modinfo', what);
  return section
    .toString('latin1')
    .split('\0')
    .filter((s) => s.includes('='))
    .map((s) => [s.slice(0, s.indexOf('=')), s.slice(s.indexOf('=') + 1)]);
}

/** The modules `name` needs loaded first, from its "depends=" field. */
export function moduleDepends(ko: Buffer, what = 'module'): string[] {
  const value = readModinfo(ko, what).find(([k]) => k === 'depends')?.[1] ?? '';
  return value.split(',').filter(Boolean).map(moduleName);
}

/**
 * The modules to insmod, dependencies before dependents, for the wanted roots.
 * @throws Error naming the module and who needs it when one is not in `index`, or on a cycle.
 */
export function loadOrder(roots: string[], index: Map<string, string>, read: (file: string) => Buffer = (f) => fs.readFileSync(f)): string[] {
  const order: string[] = [];
  const state = new Map<string, 'visiting' | 'done'>();
  const visit = (name: string, neededBy: string): void => {
    if (state.get(name) === 'done') return;
    if (state.get(name) === 'visiting') throw new Error(`kernel modules depend on each other in a cycle through '${name}'`);
    const file = index.get(name);
    if (!file) throw new Error(`kernel module '${name}' (needed by ${neededBy}) is not in the kernel package`);
    state.set(name, 'visiting');
    for (const dep of moduleDepends(read(file), name)) visit(dep, name);
    state.set(name, 'done');
    order.push(name);
  };
  for (const root of roots) visit(moduleName(root), 'the test guest');
  return order;
}

/** @throws Error when `elf` is not a little-endian ELF64 file or has no such section. */
function findSection(elf: Buffer, wanted: string, what: string): Buffer {
  if (elf.length < 64 || !elf.subarray(0, 4).equals(ELF_MAGIC) || elf[4] !== ELFCLASS64 || elf[5] !== ELFDATA2LSB) {
    throw new Error(`${what} is not a little-endian ELF64 object`);
  }
  const shoff = Number(elf.readBigUInt64LE(0x28));
  const shentsize = elf.readUInt16LE(0x3a);
  const shnum = elf.readUInt16LE(0x3c);
  const shstrndx = elf.readUInt16LE(0x3e);
  const header = (i: number) => {
    const at = shoff + i * shentsize;
    return { name: elf.readUInt32LE(at), offset: Number(elf.readBigUInt64LE(at + 0x18)), size: Number(elf.readBigUInt64LE(at + 0x20)) };
  };
  const strtab = header(shstrndx);
  for (let i = 0; i < shnum; i++) {
    const sh = header(i);
    const nameStart = strtab.offset + sh.name;
    const name = elf.toString('latin1', nameStart, elf.indexOf(0, nameStart));
    if (name === wanted) return elf.subarray(sh.offset, sh.offset + sh.size);
  }
  throw new Error(`${what} has no ${wanted} section`);
}
