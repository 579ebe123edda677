// The guest driver's Debian package (guest-driver/debian.ts): what it holds, that
// dpkg installs and removes it (into a scratch root), and how much of the system its
// unit can reach (systemd-analyze security, offline).
import { expect } from 'chai';
import { execFile } from 'node:child_process';
import fs from 'node:fs';
import path from 'node:path';
import { promisify } from 'node:util';
import { GUESTD_PACKAGE, GUESTD_VERSION, buildGuestdDeb } from '../../guest-driver/debian.js';
import { HINT_PORT_NAME } from '../../common/hint-protocol.js';
import { tmpDir } from '../helpers/proc.js';

const run = promisify(execFile);
const FILES = {
  '/usr/sbin/lethe-guestd': '-rwxr-xr-x',
  '/lib/systemd/system/lethe-guestd.service': '-rw-r--r--',
  '/lib/udev/rules.d/60-lethe-guestd.rules': '-rw-r--r--',
};
/** systemd-analyze's exposure score, in tenths (0 best, 100 worst; 2.5 is within "OK"). */
const MAX_EXPOSURE = 25;

describe('the lethe-guestd Debian package', function () {
  this.timeout(120_000);
  let dir: string;
  let deb: string;

  before(async () => {
    dir = tmpDir('lethe-guestd-deb-');
    const work = path.join(dir, 'work');
    fs.mkdirSync(work);
    // As the lethe command runs it: under umask 077, which must not reach the package's modes.
    const umask = process.umask(0o077);
    try {
      deb = await buildGuestdDeb(work, dir);
    } finally {
      process.umask(umask);
    }
  });
  after(() => fs.rmSync(dir, { recursive: true, force: true }));

  it('names itself, its version and its dependencies, and holds the driver, its unit and its udev rule, owned by root', async () => {
    expect(path.basename(deb)).to.equal(`${GUESTD_PACKAGE}_${GUESTD_VERSION}_amd64.deb`);
    const fields = (await run('dpkg-deb', ['--field', deb, 'Package', 'Version', 'Architecture', 'Depends'])).stdout;
    expect(fields).to.include(`Package: ${GUESTD_PACKAGE}\nVersion: ${GUESTD_VERSION}\nArchitecture: amd64\nDepends: systemd, udev`);
    const contents = (await run('dpkg-deb', ['--contents', deb])).stdout.trim().split('\n');
    for (const [file, mode] of Object.entries(FILES)) {
      const line = contents.find((l) => l.endsWith(` .${file}`));
      expect(line, file).to.be.a('string');
      expect(line!.startsWith(`${mode} root/root `), line).to.equal(true);
    }
    // The driver is static: it runs on any Debian or Ubuntu guest whatever its libc.
    const x = path.join(dir, 'x');
    await run('dpkg-deb', ['-x', deb, x]);
    expect((await run('file', [path.join(x, 'usr/sbin/lethe-guestd')])).stdout).to.match(/statically linked/);
  });

  it('the udev rule starts the unit on the hint port, and the unit opens that port', () => {
    const rule = fs.readFileSync(path.join('guest-driver', 'debian', '60-lethe-guestd.rules'), 'utf8');
    expect(rule).to.match(new RegExp(`ATTR\\{name\\}=="${HINT_PORT_NAME.replace(/\./g, '\\.')}".*TAG\\+="systemd".*SYSTEMD_WANTS\\}\\+="lethe-guestd\\.service"`));
    const unit = fs.readFileSync(path.join('guest-driver', 'debian', 'lethe-guestd.service'), 'utf8');
    expect(unit).to.include(`ExecStart=/usr/sbin/lethe-guestd /dev/virtio-ports/${HINT_PORT_NAME}\n`);
    expect(unit).to.include('Restart=always\n');
    expect(unit).to.match(/^Before=systemd-user-sessions\.service$/m);
  });

  it('dpkg -i installs it and dpkg -r removes it, leaving nothing behind', async () => {
    const root = path.join(dir, 'root');
    for (const d of ['var/lib/dpkg/info', 'var/lib/dpkg/updates']) fs.mkdirSync(path.join(root, d), { recursive: true });
    fs.writeFileSync(path.join(root, 'var/lib/dpkg/status'), '');
    // A scratch root has no systemd or udev to depend on, and no shell to chroot into:
    // the maintainer scripts run outside it, with DPKG_ROOT set, and so leave the host alone.
    const dpkg = (...args: string[]) => run('dpkg', [`--root=${root}`, '--force-not-root', '--force-script-chrootless', '--force-depends', ...args]);
    await dpkg('-i', deb);
    for (const file of Object.keys(FILES)) expect(fs.existsSync(path.join(root, file)), file).to.equal(true);
    expect((await dpkg('-s', GUESTD_PACKAGE)).stdout).to.include('Status: install ok installed');
    await dpkg('-r', GUESTD_PACKAGE);
    for (const file of Object.keys(FILES)) expect(fs.existsSync(path.join(root, file)), file).to.equal(false);
    expect((await dpkg('-s', GUESTD_PACKAGE).catch((e: { stdout: string }) => e)).stdout).to.not.include('install ok installed');
  });

  it(`its unit's exposure, by systemd-analyze security, is at most ${MAX_EXPOSURE / 10}`, async () => {
    const unit = path.resolve('guest-driver', 'debian', 'lethe-guestd.service');
    const r = await run('systemd-analyze', ['security', '--offline=true', '--no-pager', unit]).catch((e: { stdout: string }) => e);
    const score = /Overall exposure level for lethe-guestd\.service: (\d+\.\d)/.exec(r.stdout)?.[1];
    expect(score, r.stdout).to.be.a('string');
    expect(Number(score) * 10, r.stdout.split('\n').filter((l) => l.startsWith('✗')).join('\n')).to.be.at.most(MAX_EXPOSURE);
  });
});
