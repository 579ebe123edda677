// Builds the test guest from Debian packages (DESIGN.md, "Test guest"): the
// uncompressed kernel, an initramfs with busybox, virtio/ext4 modules, /init, the
// static workload and guest driver, and an ext4 data disk. The result is cached under
// build/guest/ and rebuilt only when an input changes: the stamp hashes the package
// versions, the init script, the C sources and this build code.
import { spawn } from 'node:child_process';
import { createHash } from 'node:crypto';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import { gzipSync } from 'node:zlib';
import { LetheError, errorChain, isLetheError } from '../common/errors.js';
import { CpioWriter } from './cpio.js';
import { indexModules, loadOrder } from './kmod.js';
import { MAGIC_DISK, encodePage } from './page-format.js';

import { DEFAULT_GUEST_DIR, GUEST_FILES as FILES } from './built.js';

export { DEFAULT_GUEST_DIR, ROOT } from './built.js';
const HERE = path.dirname(fileURLToPath(import.meta.url));

/** The meta package whose dependency names the current kernel package. */
const KERNEL_META = 'linux-image-amd64';
const BUSYBOX_PACKAGE = 'busybox-static';
/**
 * Modules the guest loads (their dependencies come from each .ko's depends=).
 * ext4 and jbd2 checksum with the crypto API's "crc32c" (only a softdep alias in
 * ext4's modinfo), so crc32c_generic is named here.
 */
export const MODULE_ROOTS = ['virtio_pci', 'virtio_blk', 'virtio_console', 'virtio_balloon', 'crc32c_generic', 'ext4'];
/** Build code and guest sources whose contents go into the stamp. */
const GUEST_PROGRAMS = [
  { name: 'lethe-workload', sources: ['workload.c'], headers: [] },
  { name: 'lethe-guestd', sources: ['guestd.c', 'guestd-frames.c', 'guestd-policy.c'], headers: ['guestd.h'] },
] as const;
const SOURCE_FILES = ['build.ts', 'built.ts', 'cpio.ts', 'kmod.ts', 'page-format.ts', 'init.sh', ...GUEST_PROGRAMS.flatMap((p) => [...p.sources, ...p.headers])];
const XZ_MAGIC = Buffer.from([0xfd, 0x37, 0x7a, 0x58, 0x5a, 0x00]);
const ELF_MAGIC = Buffer.from([0x7f, 0x45, 0x4c, 0x46]);
export const DATA_DISK_BYTES = 64 * 1024 * 1024;
export const PRESET_BLOCKS = 256;

export interface GuestArtifacts {
  dir: string;
  /** Uncompressed kernel with a PVH entry, for QEMU's -kernel. */
  vmlinux: string;
  /** gzip'd newc cpio. */
  initramfs: string;
  /** Raw ext4 image; copy it before booting, the guest writes to it. */
  disk: string;
  /** The busybox the guest runs, for host-side checks of the initramfs. */
  busybox: string;
  kernelRelease: string;
  packages: Record<string, string>;
  modules: string[];
  stamp: string;
  /** True when this call built the guest, false when the cache was current. */
  built: boolean;
}

export interface BuildOptions {
  dir?: string;
  /** Rebuild even when the stamp matches. */
  force?: boolean;
  log?: (line: string) => void;
}

type Manifest = Omit<GuestArtifacts, 'dir' | 'vmlinux' | 'initramfs' | 'disk' | 'busybox' | 'built'>;

/**
 * The test guest, built or from the cache.
 * @throws LetheError CONFIG when a build tool or the Debian packages are not available.
 */
export async function buildGuest(opts: BuildOptions = {}): Promise<GuestArtifacts> {
  const dir = opts.dir ?? DEFAULT_GUEST_DIR;
  const log = opts.log ?? (() => {});
  const packages = await resolvePackages();
  const stamp = inputStamp(packages);
  const cached = opts.force ? undefined : readCache(dir, stamp);
  if (cached) return cached;
  log(`building the test guest in ${path.relative(process.cwd(), dir) || dir} (kernel ${packages.kernel} ${packages.kernelVersion})`);
  fs.mkdirSync(dir, { recursive: true });
  const work = fs.mkdtempSync(path.join(os.tmpdir(), 'lethe-guest-build-'));
  try {
    const manifest = await buildInto(dir, work, packages, stamp, log);
    return { ...paths(dir), ...manifest, built: true };
  } catch (e) {
    if (e instanceof LetheError) throw e;
    throw new LetheError('INTERNAL', `failed to build the test guest: ${errorChain(e)}`, { cause: e });
  } finally {
    fs.rmSync(work, { recursive: true, force: true });
  }
}

async function buildInto(dir: string, work: string, packages: Packages, stamp: string, log: (l: string) => void): Promise<Manifest> {
  const debs = await downloadPackages(path.join(dir, 'debs'), packages, log);
  const kernelRoot = path.join(work, 'kernel');
  const busyboxRoot = path.join(work, 'busybox');
  await run('dpkg-deb', ['-x', debs.kernel, kernelRoot]);
  await run('dpkg-deb', ['-x', debs.busybox, busyboxRoot]);
  const kernelRelease = packages.kernel.replace(/^linux-image-/, '');

  log('extracting vmlinux');
  const vmlinux = await extractVmlinux(fs.readFileSync(path.join(kernelRoot, 'boot', `vmlinuz-${kernelRelease}`)));
  log('compiling guest programs');
  const programs = await compilePrograms(work);
  const moduleIndex = indexModules(path.join(kernelRoot, 'lib', 'modules', kernelRelease, 'kernel'));
  const modules = loadOrder(MODULE_ROOTS, moduleIndex);
  const busybox = fs.readFileSync(path.join(busyboxRoot, 'bin', 'busybox'));
  log(`making the initramfs (${modules.length} modules)`);
  const initramfs = makeInitramfs(busybox, programs, modules.map((m) => ({ name: m, ko: fs.readFileSync(moduleIndex.get(m)!) })));
  const out = paths(dir);
  log('making the data disk');
  // mkfs writes next to the final file: a rename from the temp dir could cross filesystems.
  const diskTmp = `${out.disk}.${process.pid}.tmp`;
  try {
    await makeDataDisk(work, diskTmp);
    writeAtomic(out.vmlinux, vmlinux);
    writeAtomic(out.initramfs, initramfs);
    writeAtomic(out.busybox, busybox, 0o755);
    fs.renameSync(diskTmp, out.disk);
  } finally {
    fs.rmSync(diskTmp, { force: true });
  }
  const manifest: Manifest = { kernelRelease, packages: { ...packages }, modules, stamp };
  writeAtomic(path.join(dir, 'manifest.json'), JSON.stringify(manifest, null, 2) + '\n');
  return manifest;
}

// ---- inputs and cache ----

interface Packages {
  kernel: string;
  kernelVersion: string;
  busyboxVersion: string;
  [k: string]: string;
}

/** The kernel package linux-image-amd64 depends on, and the candidate versions. */
async function resolvePackages(): Promise<Packages> {
  // Each apt-cache call re-reads the package lists (~0.4 s where Docker's apt config
  // disables pkgcache.bin), so ask two at a time.
  const [deps, busyboxVersion] = await Promise.all([aptCache(['depends', KERNEL_META]), candidateVersion(BUSYBOX_PACKAGE)]);
  const kernel = /Depends:\s*(linux-image-\S+-amd64)/.exec(deps)?.[1];
  if (!kernel) throw new LetheError('CONFIG', `cannot tell which kernel package '${KERNEL_META}' depends on`, { hint: 'run apt-get update' });
  return { kernel, kernelVersion: await candidateVersion(kernel), busyboxVersion };
}

async function candidateVersion(pkg: string): Promise<string> {
  const version = /^Version:\s*(\S+)/m.exec(await aptCache(['show', '--no-all-versions', pkg]))?.[1];
  if (!version) throw new LetheError('CONFIG', `no version of Debian package '${pkg}' is known to apt`, { hint: 'run apt-get update' });
  return version;
}

/** apt-cache, with one `apt-get update` when the package lists do not know the package. */
async function aptCache(args: string[]): Promise<string> {
  try {
    return (await run('apt-cache', args)).toString();
  } catch (e) {
    if (isLetheError(e, 'CONFIG')) throw e;
    await aptUpdate();
    return (await run('apt-cache', args)).toString();
  }
}

function inputStamp(packages: Packages): string {
  const h = createHash('sha256');
  h.update(JSON.stringify({ packages, roots: MODULE_ROOTS, files: FILES, disk: DATA_DISK_BYTES }));
  for (const f of SOURCE_FILES) h.update(`\0${f}\0`).update(fs.readFileSync(path.join(HERE, f)));
  return h.digest('hex');
}

function paths(dir: string) {
  return {
    dir,
    vmlinux: path.join(dir, FILES.vmlinux),
    initramfs: path.join(dir, FILES.initramfs),
    disk: path.join(dir, FILES.disk),
    busybox: path.join(dir, FILES.busybox),
  };
}

function readCache(dir: string, stamp: string): GuestArtifacts | undefined {
  try {
    const manifest = JSON.parse(fs.readFileSync(path.join(dir, 'manifest.json'), 'utf8')) as Manifest;
    const p = paths(dir);
    if (manifest.stamp !== stamp || ![p.vmlinux, p.initramfs, p.disk, p.busybox].every((f) => fs.existsSync(f))) return undefined;
    return { ...p, ...manifest, built: false };
  } catch {
    return undefined;
  }
}

// ---- packages ----

/** The two .deb files, from the cache in `debDir` or apt-get download. */
async function downloadPackages(debDir: string, packages: Packages, log: (l: string) => void) {
  fs.mkdirSync(debDir, { recursive: true });
  const wanted = { kernel: [packages.kernel, packages.kernelVersion], busybox: [BUSYBOX_PACKAGE, packages.busyboxVersion] };
  const file = ([name, version]: string[]) => path.join(debDir, `${name}_${version.replace(/:/g, '%3a')}_amd64.deb`);
  const missing = Object.values(wanted).filter((p) => !fs.existsSync(file(p)));
  if (missing.length) {
    const specs = missing.map(([n, v]) => `${n}=${v}`);
    log(`downloading ${specs.join(' ')}`);
    try {
      await run('apt-get', ['download', '-q', ...specs], { cwd: debDir });
    } catch {
      await aptUpdate();
      await run('apt-get', ['download', '-q', ...specs], { cwd: debDir });
    }
  }
  const keep = new Set(Object.values(wanted).map(file));
  for (const f of fs.readdirSync(debDir)) if (!keep.has(path.join(debDir, f))) fs.rmSync(path.join(debDir, f), { force: true }); // superseded versions
  return { kernel: file(wanted.kernel), busybox: file(wanted.busybox) };
}

async function aptUpdate(): Promise<void> {
  if (process.getuid?.() !== 0) {
    throw new LetheError('CONFIG', 'the Debian packages for the test guest are not in the package lists', {
      hint: "run 'sudo apt-get update' and try again",
    });
  }
  await run('apt-get', ['update', '-q']);
}

// ---- kernel ----

/**
 * The ELF kernel inside a bzImage: Debian 12 compresses it with xz, so decompress
 * from the xz magic on, ignoring the bzImage's trailing data.
 * @throws LetheError INTERNAL when no xz stream in the image decompresses to an ELF file.
 */
export async function extractVmlinux(bzImage: Buffer): Promise<Buffer> {
  for (let at = bzImage.indexOf(XZ_MAGIC); at >= 0; at = bzImage.indexOf(XZ_MAGIC, at + 1)) {
    const out = await run('xz', ['-dc', '--single-stream'], { input: bzImage.subarray(at) }).catch(() => undefined);
    if (out && out.subarray(0, 4).equals(ELF_MAGIC)) return out;
  }
  throw new LetheError('INTERNAL', 'the kernel image holds no xz-compressed ELF kernel', {
    hint: 'the test guest expects a Debian 12 amd64 kernel (xz-compressed bzImage)',
  });
}

// ---- initramfs and guest programs ----

async function compilePrograms(work: string): Promise<Map<string, Buffer>> {
  const programs = new Map<string, Buffer>();
  for (const p of GUEST_PROGRAMS) programs.set(p.name, fs.readFileSync(await compileProgram(p.name, work)));
  return programs;
}

/** Compiles guest program `name` (lethe-workload or lethe-guestd), static, into `dir`; its path. */
export async function compileProgram(name: (typeof GUEST_PROGRAMS)[number]['name'], dir: string): Promise<string> {
  const p = GUEST_PROGRAMS.find((g) => g.name === name)!;
  const out = path.join(dir, p.name);
  await run('gcc', ['-static', '-O2', '-Wall', '-Wextra', '-s', '-o', out, ...p.sources.map((s) => path.join(HERE, s))]);
  return out;
}


export function makeInitramfs(busybox: Buffer, programs: Map<string, Buffer>, modules: { name: string; ko: Buffer }[]): Buffer {
  const cpio = new CpioWriter()
    .charDevice('dev/console', 5, 1)
    .dir('proc')
    .dir('sys')
    .dir('mnt')
    .dir('tmp', 0o1777)
    .file('bin/busybox', busybox, 0o755)
    .symlink('bin/sh', 'busybox')
    .file('init', fs.readFileSync(path.join(HERE, 'init.sh')), 0o755);
  for (const [name, binary] of programs) cpio.file(`bin/${name}`, binary, 0o755);
  for (const m of modules) cpio.file(`lib/modules/${m.name}.ko`, m.ko);
  cpio.file('lib/modules/order', modules.map((m) => m.name).join('\n') + '\n');
  return gzipSync(cpio.finish(), { level: 9 });
}

// ---- data disk ----

/** Makes `image`: ext4 with a text file and preset.blk (checksummed blocks the workload verifies). */
async function makeDataDisk(work: string, image: string): Promise<void> {
  const content = path.join(work, 'disk-content');
  fs.mkdirSync(content);
  fs.writeFileSync(path.join(content, 'hello.txt'), 'Lethe test guest data disk\n');
  const blocks = Array.from({ length: PRESET_BLOCKS }, (_, index) => encodePage({ magic: MAGIC_DISK, index, seq: 1 }));
  fs.writeFileSync(path.join(content, 'preset.blk'), Buffer.concat(blocks));
  // Inode tables and journal are initialised now, so the guest does not write them lazily after mounting.
  await run('mkfs.ext4', ['-q', '-F', '-L', 'lethe-data', '-E', 'lazy_itable_init=0,lazy_journal_init=0,root_owner=0:0', '-d', content, image, `${DATA_DISK_BYTES / 1024}k`]);
}

// ---- helpers ----

function writeAtomic(file: string, data: Uint8Array | string, mode = 0o644): void {
  const tmp = `${file}.${process.pid}.tmp`;
  fs.writeFileSync(tmp, data, { mode });
  fs.renameSync(tmp, file);
}

const SETUP_HINT = 'run scripts/setup to install the Debian packages Lethe needs';

/**
 * Runs a program and returns its stdout.
 * @throws LetheError CONFIG when the program is not installed, INTERNAL (with its stderr) when it fails.
 */
export function run(cmd: string, args: string[], opts: { cwd?: string; input?: Buffer } = {}): Promise<Buffer> {
  return new Promise((resolve, reject) => {
    const p = spawn(cmd, args, { cwd: opts.cwd, stdio: ['pipe', 'pipe', 'pipe'] });
    const out: Buffer[] = [];
    let err = '';
    p.stdout.on('data', (d: Buffer) => out.push(d));
    p.stderr.on('data', (d: Buffer) => (err += d));
    p.stdin.on('error', () => {}); // a program may exit before reading all its input (xz --single-stream)
    p.on('error', (e: NodeJS.ErrnoException) =>
      reject(
        e.code === 'ENOENT'
          ? new LetheError('CONFIG', `'${cmd}' is not installed`, { hint: SETUP_HINT })
          : new LetheError('INTERNAL', `cannot run '${cmd}'`, { cause: e }),
      ),
    );
    p.on('close', (code) => {
      if (code === 0) return resolve(Buffer.concat(out));
      const detail = err.trim().split('\n').slice(-5).join('; ');
      reject(new LetheError('INTERNAL', `'${cmd} ${args.join(' ')}' failed (exit ${code})${detail ? `: ${detail}` : ''}`));
    });
    p.stdin.end(opts.input);
  });
}
