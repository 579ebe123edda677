// The Debian 12 test guest (docs/debian-guest.md) and the guest driver's package.
//   lethe-guestd_VERSION_amd64.deb: the static driver, its hardened systemd unit and
//     the udev rule that starts it when the host's org.lethe.hint port appears.
//   root.ext4: a root file system made by mmdebstrap from this machine's apt sources:
//     systemd, openssh-client, gnupg, the driver installed with dpkg -i, and the test
//     services (the workload, and ssh-agent and gpg-agent for the user alice).
// It boots with the busybox guest's kernel and initramfs, whose /init mounts the disk
// and hands over to systemd (lethe.root=/dev/vda). Cached like the busybox guest: the
// stamp hashes the inputs, and nothing is rebuilt while it matches.
import { createHash } from 'node:crypto';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import { LetheError, errorChain } from '../common/errors.js';
import { DEFAULT_GUEST_DIR, buildGuest, compileProgram, run, type BuildOptions } from './build.js';

const HERE = path.dirname(fileURLToPath(import.meta.url));
const PACKAGE_DIR = path.join(HERE, 'debian');
const GUEST_DIR = path.join(PACKAGE_DIR, 'guest');
export const GUESTD_PACKAGE = 'lethe-guestd';
/** The package's version follows the project's. */
export const GUESTD_VERSION = (JSON.parse(fs.readFileSync(path.join(HERE, '..', 'package.json'), 'utf8')) as { version: string }).version;
export const DEBIAN_SUITE = 'bookworm';
/** What the guest has beside Debian's minbase: an init, a user's agents, pgrep and friends. */
export const DEBIAN_PACKAGES = ['systemd', 'systemd-sysv', 'udev', 'dbus', 'openssh-client', 'gnupg', 'procps'];
export const ROOT_DISK_BYTES = 1024 * 1024 * 1024;
/** The guest's user, whose slice holds the agents (lethe-agents.service). */
export const GUEST_USER = { name: 'alice', uid: 1000 };
export const AGENTS_CGROUP = `/user.slice/user-${GUEST_USER.uid}.slice/lethe-agents.service`;
/** The marker agents-start gives the ssh key's comment; ssh-agent keeps it in its memory. */
export const sshMarker = (secret: string) => `lethe-ssh-${secret}`;
/** The test services, each lethe-NAME.service running NAME-start (guest-driver/debian/guest). */
const SERVICES = ['workload', 'agents', 'restarts'];
/** Where apt's sources are on this machine (deb822 first), for mmdebstrap. */
const APT_SOURCES = ['/etc/apt/sources.list.d/debian.sources', '/etc/apt/sources.list'];

export interface DebianGuest {
  dir: string;
  /** The busybox guest's kernel and initramfs: they boot this disk too. */
  vmlinux: string;
  initramfs: string;
  kernelRelease: string;
  /** Raw ext4 root file system; copy it before booting, the guest writes to it. */
  disk: string;
  /** The driver's package, as installed in the guest. */
  deb: string;
  stamp: string;
  built: boolean;
}

interface Manifest {
  stamp: string;
  deb: string;
}

/** The kernel command line that boots the Debian guest (init_on_free: a freed page keeps no copy of a secret). */
export function debianCmdline(p: { mib: number; secret?: string; intervalMs?: number; sshEveryS?: number; guestdRestartsS?: number }): string {
  const words = ['console=ttyS0', 'panic=-1', 'quiet', 'lethe.root=/dev/vda', 'init_on_free=1', 'systemd.show_status=0', `lethe.mib=${p.mib}`];
  if (p.secret) words.push(`lethe.secret=${p.secret}`);
  if (p.intervalMs !== undefined) words.push(`lethe.interval=${p.intervalMs}`);
  if (p.sshEveryS !== undefined) words.push(`lethe.ssh-every=${p.sshEveryS}`);
  if (p.guestdRestartsS !== undefined) words.push(`lethe.guestd-restarts=${p.guestdRestartsS}`);
  return words.join(' ');
}

/**
 * The Debian test guest, built or from the cache (build/guest/debian).
 * @throws LetheError CONFIG when not root, when mmdebstrap or the apt sources are missing.
 */
export async function buildDebianGuest(opts: BuildOptions = {}): Promise<DebianGuest> {
  const base = await buildGuest({ log: opts.log });
  const dir = path.join(opts.dir ?? DEFAULT_GUEST_DIR, 'debian');
  const log = opts.log ?? (() => {});
  const sources = APT_SOURCES.find((f) => fs.existsSync(f));
  if (!sources) throw new LetheError('CONFIG', `no apt sources on this machine (${APT_SOURCES.join(' or ')})`, { hint: 'the Debian guest is built from the Debian archive apt uses' });
  const stamp = inputStamp(base.stamp, sources);
  const out = { dir, vmlinux: base.vmlinux, initramfs: base.initramfs, kernelRelease: base.kernelRelease, disk: path.join(dir, 'root.ext4'), stamp };
  const cached = opts.force ? undefined : readCache(dir, stamp, out.disk);
  if (cached) return { ...out, deb: path.join(dir, cached.deb), built: false };
  if (process.getuid?.() !== 0) {
    throw new LetheError('CONFIG', 'the Debian guest is built as root (mmdebstrap --mode=root, then a root-owned file system)', {
      hint: 'run it once as root: sudo npm run guest -- --debian',
    });
  }
  log(`building the Debian ${DEBIAN_SUITE} guest in ${path.relative(process.cwd(), dir) || dir}`);
  fs.mkdirSync(dir, { recursive: true });
  const work = fs.mkdtempSync(path.join(os.tmpdir(), 'lethe-debian-build-'));
  // A system's files are made with the usual umask (the lethe command runs under 077):
  // else /usr/local/lib/lethe and the like would be root's alone, and the guest's user
  // could not run her services. Nothing in the guest image is secret.
  const umask = process.umask(0o022);
  try {
    const deb = await buildGuestdDeb(work, dir);
    log(`built ${path.basename(deb)}; making the root file system with mmdebstrap (downloads about 60 MB of packages)`);
    const rootfs = path.join(work, 'rootfs');
    await makeRootfs(rootfs, deb, work, sources);
    log('making the root disk');
    const tmp = `${out.disk}.${process.pid}.tmp`;
    try {
      await run('mkfs.ext4', ['-q', '-F', '-L', 'lethe-root', '-E', 'lazy_itable_init=0,lazy_journal_init=0', '-d', rootfs, tmp, `${ROOT_DISK_BYTES / 1024}k`]);
      fs.renameSync(tmp, out.disk);
    } finally {
      fs.rmSync(tmp, { force: true });
    }
    const manifest: Manifest = { stamp, deb: path.basename(deb) };
    fs.writeFileSync(path.join(dir, 'manifest.json'), JSON.stringify(manifest, null, 2) + '\n');
    return { ...out, deb, built: true };
  } catch (e) {
    if (e instanceof LetheError) throw e;
    throw new LetheError('INTERNAL', `failed to build the Debian guest: ${errorChain(e)}`, { cause: e });
  } finally {
    process.umask(umask);
    fs.rmSync(work, { recursive: true, force: true });
  }
}

/**
 * Builds lethe-guestd_VERSION_amd64.deb into `outDir` (from `work`, a scratch directory); its path.
 * @throws LetheError CONFIG when gcc or dpkg-deb is missing, INTERNAL when either fails.
 */
export async function buildGuestdDeb(work: string, outDir: string): Promise<string> {
  const stage = path.join(work, 'deb');
  // Modes are set outright: the caller's umask (the lethe command runs under 077) would
  // leave dpkg-deb a control directory it refuses, and directories only root can enter.
  const dir = (d: string) => {
    fs.mkdirSync(d, { recursive: true });
    for (let at = d; at !== stage; at = path.dirname(at)) fs.chmodSync(at, 0o755);
  };
  const put = (rel: string, from: string | Buffer, mode = 0o644) => {
    const to = path.join(stage, rel);
    dir(path.dirname(to));
    fs.writeFileSync(to, typeof from === 'string' ? fs.readFileSync(from) : from);
    fs.chmodSync(to, mode);
  };
  fs.mkdirSync(stage);
  fs.chmodSync(stage, 0o755);
  put('usr/sbin/lethe-guestd', await compileProgram('lethe-guestd', work), 0o755);
  put('lib/systemd/system/lethe-guestd.service', path.join(PACKAGE_DIR, 'lethe-guestd.service'));
  put('lib/udev/rules.d/60-lethe-guestd.rules', path.join(PACKAGE_DIR, '60-lethe-guestd.rules'));
  for (const script of ['postinst', 'prerm', 'postrm']) put(`DEBIAN/${script}`, path.join(PACKAGE_DIR, script), 0o755);
  const installedKiB = Math.ceil(fs.statSync(path.join(stage, 'usr/sbin/lethe-guestd')).size / 1024) + 4;
  put(
    'DEBIAN/control',
    Buffer.from([
      `Package: ${GUESTD_PACKAGE}`,
      `Version: ${GUESTD_VERSION}`,
      'Architecture: amd64',
      'Maintainer: Lethe <lethe@localhost>',
      'Section: admin',
      'Priority: optional',
      `Installed-Size: ${installedKiB}`,
      'Depends: systemd, udev',
      'Description: Lethe guest driver',
      ' Reports to the Lethe host which guest-physical frames hold the pages of',
      ' sensitive processes, cgroups and files, over the virtio-serial port',
      ' org.lethe.hint, so the host can evict them from guest RAM when idle.',
      '',
    ].join('\n')),
  );
  fs.mkdirSync(outDir, { recursive: true });
  const deb = path.join(outDir, `${GUESTD_PACKAGE}_${GUESTD_VERSION}_amd64.deb`);
  await run('dpkg-deb', ['--root-owner-group', '-Zxz', '--build', stage, deb]);
  return deb;
}

/** mmdebstrap: minbase plus DEBIAN_PACKAGES, then the driver package, the test services and the user. */
async function makeRootfs(rootfs: string, deb: string, work: string, sources: string): Promise<void> {
  const workload = await compileProgram('lethe-workload', work);
  const q = (s: string) => `'${s.replace(/'/g, `'\\''`)}'`;
  const hooks = [
    `copy-in ${q(deb)} /tmp`,
    `chroot "$1" dpkg -i /tmp/${path.basename(deb)}`,
    `rm -f "$1"/tmp/*.deb`,
    `copy-in ${q(workload)} /usr/local/bin`,
    `mkdir -p "$1/usr/local/lib/lethe"`,
    `copy-in ${SERVICES.map((s) => q(path.join(GUEST_DIR, `${s}-start`))).join(' ')} /usr/local/lib/lethe`,
    `copy-in ${SERVICES.map((s) => q(path.join(GUEST_DIR, `lethe-${s}.service`))).join(' ')} /etc/systemd/system`,
    `chroot "$1" useradd --create-home --uid ${GUEST_USER.uid} --shell /bin/bash ${GUEST_USER.name}`,
    `chroot "$1" systemctl enable ${SERVICES.map((s) => `lethe-${s}.service`).join(' ')}`,
    // No login prompt on the console (it is the test's channel), no network to wait for.
    `chroot "$1" systemctl mask serial-getty@ttyS0.service getty@tty1.service apt-daily.timer apt-daily-upgrade.timer`,
    `echo lethe-debian > "$1/etc/hostname"`,
    `printf '/dev/vda / ext4 rw,errors=remount-ro 0 0\\n' > "$1/etc/fstab"`,
    // journald keeps its journal on the disk (the guest writes while it runs).
    `mkdir -p "$1/var/log/journal"`,
  ];
  await run('mmdebstrap', [
    '--mode=root',
    '--variant=minbase',
    '--quiet',
    `--include=${DEBIAN_PACKAGES.join(',')}`,
    ...hooks.map((h) => `--customize-hook=${h}`),
    DEBIAN_SUITE,
    rootfs,
    sources,
  ]);
}

function inputStamp(baseStamp: string, sources: string): string {
  const h = createHash('sha256');
  h.update(JSON.stringify({ baseStamp, suite: DEBIAN_SUITE, packages: DEBIAN_PACKAGES, disk: ROOT_DISK_BYTES, version: GUESTD_VERSION, user: GUEST_USER }));
  h.update(fs.readFileSync(sources));
  // The guest programs' sources are in the busybox guest's stamp.
  const files = [fileURLToPath(import.meta.url), ...listFiles(PACKAGE_DIR)];
  for (const f of files) h.update(`\0${path.relative(HERE, f)}\0`).update(fs.readFileSync(f));
  return h.digest('hex');
}

function listFiles(dir: string): string[] {
  return fs
    .readdirSync(dir, { withFileTypes: true })
    .flatMap((e) => (e.isDirectory() ? listFiles(path.join(dir, e.name)) : [path.join(dir, e.name)]))
    .sort();
}

function readCache(dir: string, stamp: string, disk: string): Manifest | undefined {
  try {
    const m = JSON.parse(fs.readFileSync(path.join(dir, 'manifest.json'), 'utf8')) as Manifest;
    return m.stamp === stamp && fs.existsSync(disk) && fs.existsSync(path.join(dir, m.deb)) ? m : undefined;
  } catch {
    return undefined;
  }
}
