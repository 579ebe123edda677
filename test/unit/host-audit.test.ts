// lethe audit host over /proc and /sys trees laid out as the kernel lays them out, one
// per case this machine is not in.
import { expect } from 'chai';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { agentLockedBytes, auditHost, type CheckId, type HostCheck } from '../../cli/host-audit/index.js';
import { LetheError } from '../../common/errors.js';
import { ROOT, tmpDir } from '../helpers/proc.js';

type Entry = string | null | { link: string } | { dir: true };

const limits = (core: string, memlock: string) =>
  [
    'Limit                     Soft Limit           Hard Limit           Units     ',
    'Max cpu time              unlimited            unlimited            seconds   ',
    `Max core file size        ${core.padEnd(21)}unlimited            bytes     `,
    'Max processes             63432                63432                processes ',
    `Max locked memory         ${memlock.padEnd(21)}${memlock.padEnd(21)}bytes     `,
    'Max open files            1024                 524288               files     ',
    '',
  ].join('\n');

const SWAPS_HEADER = 'Filename\t\t\t\tType\t\tSize\t\tUsed\t\tPriority\n';
const swaps = (...lines: string[]) => SWAPS_HEADER + lines.map((l) => `${l}\n`).join('');

const USER_UNIT = path.join(os.homedir(), '.config/systemd/user/lethe-agent@.service');

/** A host where every check passes. */
const HARDENED: Record<string, Entry> = {
  '/proc/swaps': swaps(),
  '/proc/sys/kernel/core_pattern': '|/bin/false\n',
  '/proc/sys/fs/suid_dumpable': '0\n',
  '/proc/sys/kernel/yama/ptrace_scope': '1\n',
  '/proc/self/limits': limits('0', 'unlimited'),
  '/proc/self/status': 'Name:\tnode\nCapInh:\t0000000000000000\nCapEff:\t0000000000000000\n',
  '/proc/self/mountinfo':
    '22 1 0:21 / /proc rw,relatime - proc proc rw\n' +
    '1 0 254:1 / / rw,relatime shared:1 - ext4 /dev/mapper/root rw\n' +
    '30 1 8:1 / /boot rw,relatime shared:2 - ext4 /dev/sda1 rw\n',
  '/sys/power/state': 'freeze mem\n',
  '/sys/kernel/kexec_crash_loaded': '0\n',
  '/sys/class/block/sda': { dir: true },
  '/sys/class/block/sda1': { dir: true },
  '/sys/class/block/sda2': { dir: true },
  '/sys/class/block/dm-0/dm/uuid': 'CRYPT-LUKS2-0123456789abcdef-sda3_crypt\n',
  '/sys/class/block/dm-0/dm/name': 'sda3_crypt\n',
  '/sys/class/block/dm-1/dm/uuid': 'LVM-abcdefABCDEF\n',
  '/sys/class/block/dm-1/dm/name': 'root\n',
  '/sys/class/block/dm-1/slaves/dm-0': { link: '../../dm-0' },
  '/sys/dev/block/254:1': { link: '../../devices/virtual/block/dm-1' },
  '/sys/dev/block/8:1': { link: '../../devices/pci0000:00/0000:00:1f.2/ata1/host0/target0:0:0/0:0:0:0/block/sda/sda1' },
  // The unit the project ships, installed as its comment says.
  [USER_UNIT]: fs.readFileSync(path.join(ROOT, 'agent', 'lethe-agent.service'), 'utf8'),
};

const roots: string[] = [];

function host(over: Record<string, Entry> = {}): string {
  const root = tmpDir('lethe-host-');
  roots.push(root);
  for (const [p, e] of Object.entries({ ...HARDENED, ...over })) {
    const at = path.join(root, p);
    if (e === null) continue;
    fs.mkdirSync(typeof e === 'object' && 'dir' in e ? at : path.dirname(at), { recursive: true });
    if (typeof e === 'string') fs.writeFileSync(at, e);
    else if ('link' in e) fs.symlinkSync(e.link, at);
  }
  return root;
}

function check(id: CheckId, over: Record<string, Entry> = {}, pid?: number | string): HostCheck {
  return auditHost({ root: host(over), pid }).checks.find((c) => c.id === id)!;
}

describe('lethe audit host', () => {
  after(() => {
    for (const r of roots) fs.rmSync(r, { recursive: true, force: true });
  });

  it('a hardened host passes every check, with nothing to change', () => {
    const r = auditHost({ root: host() });
    expect(r.checks.map((c) => c.id)).to.deep.equal(['swap', 'core-dumps', 'hibernation', 'ptrace-scope', 'memlock', 'kdump', 'agent-unit']);
    expect(r.checks.map((c) => [c.status, c.fix])).to.deep.equal(Array(7).fill(['ok', '']));
    expect(r.ok).to.equal(true);
  });

  describe('swap', () => {
    it('none is ok', () => {
      expect(check('swap')).to.deep.include({ status: 'ok', found: 'no swap in use' });
    });

    it('a plain partition fails, and the fix names it', () => {
      const c = check('swap', { '/proc/swaps': swaps('/dev/sda2                               partition\t8388604\t\t0\t\t-2') });
      expect(c.status).to.equal('fail');
      expect(c.found).to.match(/^swap without encryption on disk: \/dev\/sda2 \(plain, on disk\); guest RAM is shared memory/);
      expect(c.fix).to.include('sudo swapoff /dev/sda2').and.include("'cryptswap /dev/sda2 /dev/urandom swap");
      expect(c.fix).to.equal(
        "sudo swapoff /dev/sda2 and remove it from /etc/fstab, then use zram (apt install systemd-zram-generator) or dm-crypt with a random key at each boot (/etc/crypttab: 'cryptswap /dev/sda2 /dev/urandom swap,cipher=aes-xts-plain64,size=512'; /etc/fstab: '/dev/mapper/cryptswap none swap sw 0 0')",
      );
    });

    it('two plain partitions get a crypttab line each', () => {
      const c = check('swap', { '/proc/swaps': swaps('/dev/sda2 partition 1048572 0 -2', '/dev/sda1 partition 1048572 0 -3') });
      expect(c.fix).to.match(/^sudo swapoff \/dev\/sda2 \/dev\/sda1 and remove them from \/etc\/fstab/);
      expect(c.fix).to.include("'cryptswap /dev/sda2 /dev/urandom swap,cipher=aes-xts-plain64,size=512', 'cryptswap2 /dev/sda1 /dev/urandom swap");
      expect(c.fix).to.include("'/dev/mapper/cryptswap none swap sw 0 0', '/dev/mapper/cryptswap2 none swap sw 0 0'");
    });

    it('dm-crypt is ok, directly, by its /dev/mapper name, or under LVM', () => {
      const crypt = { '/sys/class/block/dm-2/dm/uuid': 'CRYPT-PLAIN-cryptswap\n', '/sys/class/block/dm-2/dm/name': 'cryptswap\n' };
      for (const dev of ['/dev/dm-2', '/dev/mapper/cryptswap']) {
        expect(check('swap', { ...crypt, '/proc/swaps': swaps(`${dev} partition 1048572 0 -2`) })).to.deep.include({
          status: 'ok',
          found: `swap is encrypted or in RAM: ${dev} (dm-crypt)`,
        });
      }
      expect(check('swap', { '/proc/swaps': swaps('/dev/dm-1 partition 1048572 0 -2') }).status).to.equal('ok');
    });

    it('LVM on a plain disk fails', () => {
      const c = check('swap', {
        '/proc/swaps': swaps('/dev/dm-3 partition 1048572 0 -2'),
        '/sys/class/block/dm-3/dm/uuid': 'LVM-xyz\n',
        '/sys/class/block/dm-3/slaves/sda2': { link: '../../sda2' },
      });
      expect(c.status).to.equal('fail');
    });

    it('LVM spanning a LUKS disk and a plain one fails: every disk under it must be encrypted', () => {
      const c = check('swap', {
        '/proc/swaps': swaps('/dev/dm-3 partition 1048572 0 -2'),
        '/sys/class/block/dm-3/dm/uuid': 'LVM-xyz\n',
        '/sys/class/block/dm-3/slaves/dm-0': { link: '../../dm-0' },
        '/sys/class/block/dm-3/slaves/sda2': { link: '../../sda2' },
      });
      expect(c).to.deep.include({ status: 'fail' });
      expect(c.found).to.include('/dev/dm-3 (plain, on disk)');
    });

    it("dm-integrity, dm-verity and cryptsetup's sub-devices are not encryption, though named CRYPT-", () => {
      for (const uuid of ['CRYPT-INTEGRITY-swapint', 'CRYPT-VERITY-0123456789abcdef-swapver', 'CRYPT-SUBDEV-0123456789abcdef-sda2_dif']) {
        const c = check('swap', {
          '/proc/swaps': swaps('/dev/dm-4 partition 1048572 0 -2'),
          '/sys/class/block/dm-4/dm/uuid': `${uuid}\n`,
          '/sys/class/block/dm-4/slaves/sda2': { link: '../../sda2' },
        });
        expect(c.status, uuid).to.equal('fail');
      }
      // dm-integrity over dm-crypt is encrypted underneath
      const over = check('swap', {
        '/proc/swaps': swaps('/dev/dm-4 partition 1048572 0 -2'),
        '/sys/class/block/dm-4/dm/uuid': 'CRYPT-INTEGRITY-swapint\n',
        '/sys/class/block/dm-4/slaves/dm-0': { link: '../../dm-0' },
      });
      expect(over).to.deep.include({ status: 'ok', found: 'swap is encrypted or in RAM: /dev/dm-4 (dm-crypt)' });
    });

    it('zram is ok unless it writes back to a plain disk', () => {
      const zram = { '/proc/swaps': swaps('/dev/zram0 partition 4194300 0 100'), '/sys/class/block/zram0/backing_dev': 'none\n' };
      expect(check('swap', zram)).to.deep.include({ status: 'ok', found: 'swap is encrypted or in RAM: /dev/zram0 (zram, in RAM)' });
      const back = check('swap', { ...zram, '/sys/class/block/zram0/backing_dev': '/dev/sda2\n' });
      expect(back).to.deep.include({ status: 'fail' });
      expect(back.found).to.include('/dev/zram0 (plain, on disk: zram writes back to /dev/sda2)');
      expect(back.fix).to.equal(
        'turn off writeback for /dev/zram0 (remove writeback-device from /etc/systemd/zram-generator.conf, or stop writing /sys/block/zram0/backing_dev) and reboot, or have it write back to a dm-crypt device with a random key instead of /dev/sda2',
      );
      expect(back.fix).not.to.include('swapoff').and.not.include('crypttab');
    });

    it('zram writing back to dm-crypt is ok; to a device it cannot classify, a warning, not ok', () => {
      const zram = { '/proc/swaps': swaps('/dev/zram0 partition 4194300 0 100') };
      const crypt = check('swap', { ...zram, '/sys/class/block/zram0/backing_dev': '/dev/mapper/sda3_crypt\n' });
      expect(crypt).to.deep.include({ status: 'ok', found: 'swap is encrypted or in RAM: /dev/zram0 (zram, in RAM: writes back to /dev/mapper/sda3_crypt, dm-crypt)' });
      expect(check('swap', { ...zram, '/sys/class/block/zram0/backing_dev': '/dev/nvme0n1p3\n' })).to.deep.equal({
        id: 'swap',
        status: 'warn',
        found: 'swap that could not be classified: /dev/zram0 (unknown: zram writes back to /dev/nvme0n1p3, no /sys/class/block/nvme0n1p3)',
        fix: 'check by hand that it is encrypted: swapon --show; lsblk -o NAME,TYPE,FSTYPE',
      });
    });

    it('a swap file is judged by the disk under its filesystem', () => {
      expect(check('swap', { '/proc/swaps': swaps('/swap\\040file file 2097148 0 -2') })).to.deep.include({
        status: 'ok',
        found: 'swap is encrypted or in RAM: /swap file (dm-crypt)',
      });
      const plain = check('swap', { '/proc/swaps': swaps('/boot/swapfile file 2097148 0 -2') });
      expect(plain.status).to.equal('fail');
      expect(plain.fix).to.equal(
        'sudo swapoff /boot/swapfile, remove it from /etc/fstab and delete it; then use zram (apt install systemd-zram-generator), or swap on a partition under dm-crypt with a random key (/etc/crypttab takes a block device, not a file)',
      );
    });

    it('a filesystem with an anonymous device number (btrfs) is found by its source', () => {
      const btrfs = '1 0 0:31 / / rw,relatime shared:1 - btrfs /dev/mapper/root rw,subvol=/@\n';
      const c = check('swap', { '/proc/self/mountinfo': btrfs, '/proc/swaps': swaps('/swap/swapfile file 2097148 0 -2') });
      expect(c).to.deep.include({ status: 'ok', found: 'swap is encrypted or in RAM: /swap/swapfile (dm-crypt)' });
    });

    it('a device sysfs does not know warns and says how to look', () => {
      const c = check('swap', { '/proc/swaps': swaps('/dev/nvme0n1p3 partition 1048572 0 -2') });
      expect(c).to.deep.equal({
        id: 'swap',
        status: 'warn',
        found: 'swap that could not be classified: /dev/nvme0n1p3 (unknown: no /sys/class/block/nvme0n1p3)',
        fix: 'check by hand that it is encrypted: swapon --show; lsblk -o NAME,TYPE,FSTYPE',
      });
    });

    it('an unreadable /proc/swaps is a warning that names it, not a crash', () => {
      expect(check('swap', { '/proc/swaps': { dir: true } })).to.deep.equal({
        id: 'swap',
        status: 'warn',
        found: 'could not tell: cannot read /proc/swaps (EISDIR)',
        fix: 'check by hand: swapon --show; lsblk -o NAME,TYPE,FSTYPE',
      });
    });
  });

  describe('core dumps', () => {
    it('a pattern that drops cores is ok', () => {
      const c = check('core-dumps');
      expect(c.status).to.equal('ok');
      expect(c.found).to.equal(
        "the kernel pipes cores to /bin/false, which drops them; the core size limit of this shell is 0 (the agent's may differ: --pid); the agent makes itself non-dumpable (agent/daemon/harden.ts); QEMU does not, though it leaves guest RAM out of its cores (dump-guest-core=off)",
      );
    });

    it("with --pid the limit is that process's, with no note that the agent's may differ", () => {
      const c = check('core-dumps', { '/proc/4242/limits': limits('0', 'unlimited'), '/proc/4242/status': 'CapEff:\t0000000000000000\n' }, 4242);
      expect(c).to.deep.include({ status: 'ok', fix: '' });
      expect(c.found).to.include('; the core size limit of process 4242 is 0; the agent makes');
    });

    it('cores to files with a core size limit fail', () => {
      const c = check('core-dumps', { '/proc/sys/kernel/core_pattern': 'core\n', '/proc/self/limits': limits('unlimited', 'unlimited') });
      expect(c.status).to.equal('fail');
      expect(c.found).to.match(/^the kernel writes cores to files named 'core' in the crashing program's working directory; the core size limit of this shell is unlimited;/);
      expect(c.fix).to.equal("make the kernel drop cores: echo 'kernel.core_pattern=|/bin/false' | sudo tee /etc/sysctl.d/50-lethe-core.conf && sudo sysctl --system");
    });

    it('systemd-coredump under a zero limit warns; with Storage=none it is ok', () => {
      const sd = { '/proc/sys/kernel/core_pattern': '|/usr/lib/systemd/systemd-coredump %P %u %g %s %t %c %h\n' };
      const c = check('core-dumps', sd);
      expect(c.status).to.equal('warn');
      expect(c.found).to.match(/^systemd-coredump keeps cores in \/var\/lib\/systemd\/coredump; the core size limit of this shell is 0, but a program may raise it/);
      expect(c.fix).to.include("'Storage=none' and 'ProcessSizeMax=0' under [Coredump]");
      const off = { ...sd, '/etc/systemd/coredump.conf': '[Coredump]\n#Storage=external\n', '/etc/systemd/coredump.conf.d/50-lethe.conf': '[Coredump]\nStorage=none\n' };
      expect(check('core-dumps', off)).to.deep.include({ status: 'ok', fix: '' });
      const later = { ...off, '/usr/lib/systemd/coredump.conf.d/90-vendor.conf': '[Coredump]\nStorage=external\n' };
      expect(check('core-dumps', later).status).to.equal('warn');
    });

    it('apport with a limit fails; an unknown pipe program warns', () => {
      expect(check('core-dumps', { '/proc/sys/kernel/core_pattern': '|/usr/share/apport/apport -p%p -s%s -c%c\n', '/proc/self/limits': limits('1048576', 'unlimited') }).status).to.equal('fail');
      const c = check('core-dumps', { '/proc/sys/kernel/core_pattern': '|/usr/local/bin/collect %p\n', '/proc/self/limits': limits('unlimited', 'unlimited') });
      expect(c.status).to.equal('warn');
      expect(c.found).to.match(/^the kernel pipes cores to \/usr\/local\/bin\/collect, which may keep them;/);
    });

    it('fs.suid_dumpable 1 warns even when cores are dropped', () => {
      const c = check('core-dumps', { '/proc/sys/fs/suid_dumpable': '1\n' });
      expect(c.status).to.equal('warn');
      expect(c.found).to.include('fs.suid_dumpable is 1, so setuid programs dump too');
      expect(c.fix).to.equal("set fs.suid_dumpable=0: echo 'fs.suid_dumpable=0' | sudo tee /etc/sysctl.d/50-lethe-suid.conf && sudo sysctl --system");
    });
  });

  describe('hibernation', () => {
    const possible = { '/sys/power/state': 'freeze mem disk\n', '/sys/power/disk': '[platform] shutdown reboot suspend test_resume\n' };

    it('not offered, or disabled by the kernel, is ok', () => {
      expect(check('hibernation').status).to.equal('ok');
      expect(check('hibernation', { ...possible, '/sys/power/disk': '[disabled]\n' }).status).to.equal('ok');
    });

    it('possible with plain swap fails', () => {
      const c = check('hibernation', { ...possible, '/proc/swaps': swaps('/dev/sda2 partition 8388604 0 -2') });
      expect(c.status).to.equal('fail');
      expect(c.found).to.equal('hibernation is possible: it writes an image of all RAM, keys and guest pages included, to swap, and /dev/sda2 (plain, on disk) is not encrypted');
      expect(c.fix).to.equal('sudo systemctl mask hibernate.target hybrid-sleep.target suspend-then-hibernate.target; and encrypt swap (see swap)');
    });

    it('possible with encrypted swap or none warns', () => {
      expect(check('hibernation', { ...possible, '/proc/swaps': swaps('/dev/dm-1 partition 8388604 0 -2') }).status).to.equal('warn');
      const none = check('hibernation', possible);
      expect(none.status).to.equal('warn');
      expect(none.found).to.include('there is no swap now, but adding some enables it');
      const crypt = check('hibernation', { ...possible, '/proc/swaps': swaps('/dev/dm-1 partition 8388604 0 -2') });
      expect(crypt.found).to.match(/; swap is encrypted or in RAM, but keys in the image outlive their lease until resume$/);
    });

    it('possible with swap it cannot classify warns without calling it encrypted', () => {
      const c = check('hibernation', { ...possible, '/proc/swaps': swaps('/dev/dm-1 partition 8388604 0 -2', '/dev/nvme0n1p3 partition 1048572 0 -3') });
      expect(c.status).to.equal('warn');
      expect(c.found).to.equal(
        'hibernation is possible: it writes an image of all RAM, keys and guest pages included, to swap; /dev/nvme0n1p3 (unknown: no /sys/class/block/nvme0n1p3) could not be classified (see swap), and keys in the image outlive their lease until resume either way',
      );
      expect(c.found).not.to.include('encrypted or in RAM');
    });
  });

  describe('ptrace scope', () => {
    it('0 fails, 1 to 3 are ok, no Yama warns', () => {
      const scope = (v: string | null) => check('ptrace-scope', { '/proc/sys/kernel/yama/ptrace_scope': v });
      const zero = scope('0\n');
      expect(zero.status).to.equal('fail');
      expect(zero.fix).to.equal("echo 'kernel.yama.ptrace_scope=1' | sudo tee /etc/sysctl.d/50-lethe-ptrace.conf && sudo sysctl --system");
      expect(['1\n', '2\n', '3\n'].map((v) => scope(v).status)).to.deep.equal(['ok', 'ok', 'ok']);
      expect(scope('2\n').found).to.equal('ptrace_scope is 2: only root may attach');
      expect(scope(null).status).to.equal('warn');
    });

    it('garbage in ptrace_scope is quoted in a warning', () => {
      expect(check('ptrace-scope', { '/proc/sys/kernel/yama/ptrace_scope': 'banana\n' })).to.deep.equal({
        id: 'ptrace-scope',
        status: 'warn',
        found: "could not tell: /proc/sys/kernel/yama/ptrace_scope holds 'banana', not one of 0, 1, 2, 3",
        fix: 'check by hand: sysctl kernel.yama.ptrace_scope',
      });
    });
  });

  describe('locked memory', () => {
    const { atStart, atMost } = agentLockedBytes();

    it('a limit under what the agent locks at start fails, with the systemd and limits.conf fixes', () => {
      const c = check('memlock', { '/proc/self/limits': limits('0', String(8 * 1024 * 1024)) });
      expect(c.status).to.equal('fail');
      expect(c.found).to.match(/^the locked-memory limit of this shell is 8 MiB; the agent locks about [\d.]+ MiB at its defaults/);
      expect(c.fix).to.include('LimitMEMLOCK=infinity').and.include("'USER - memlock 131072' in /etc/security/limits.conf");
    });

    it('enough for the start but not a full key ring warns; enough for both, or unlimited, is ok', () => {
      expect(check('memlock', { '/proc/self/limits': limits('0', String(atStart)) }).status).to.equal('warn');
      expect(check('memlock', { '/proc/self/limits': limits('0', String(atMost - 1)) }).status).to.equal('warn');
      expect(check('memlock', { '/proc/self/limits': limits('0', String(atMost)) }).status).to.equal('ok');
      const ok = check('memlock');
      expect(ok.status).to.equal('ok');
      expect(ok.found).to.match(/^the locked-memory limit of this shell is unlimited \(the agent's may differ: --pid\); the agent locks about/);
    });

    it('CAP_IPC_LOCK lifts the limit', () => {
      const c = check('memlock', { '/proc/self/limits': limits('0', '65536'), '/proc/self/status': 'Name:\tnode\nCapEff:\t000001ffffffffff\n' });
      expect(c).to.deep.include({ status: 'ok', found: "this shell has CAP_IPC_LOCK (the agent's may differ: --pid), so its locked-memory limit (64 KiB) does not apply" });
    });

    it("another process's limits with --pid, and a clear error for a process that is not there", () => {
      const c = check('memlock', { '/proc/4242/limits': limits('0', '65536'), '/proc/4242/status': 'CapEff:\t0000000000000000\n' }, 4242);
      expect(c.status).to.equal('fail');
      expect(c.found).to.match(/^the locked-memory limit of process 4242 is 64 KiB/);
      const cap = check('memlock', { '/proc/4242/limits': limits('0', '65536'), '/proc/4242/status': 'CapEff:\t000001ffffffffff\n' }, '4242');
      expect(cap).to.deep.include({ status: 'ok', found: 'process 4242 has CAP_IPC_LOCK, so its locked-memory limit (64 KiB) does not apply' });
      expect(() => auditHost({ root: host(), pid: 999 })).to.throw(LetheError, 'no process 999');
      expect(() => auditHost({ root: host(), pid: -1 })).to.throw(LetheError, "bad --pid: '-1'");
      for (const bad of ['agent', '', '12a', '1.5', '-1']) {
        expect(() => auditHost({ root: host(), pid: bad }), bad).to.throw(LetheError, `bad --pid: '${bad}'`);
      }
    });

    it('a limits file it cannot parse is a warning', () => {
      const c = check('memlock', { '/proc/self/limits': limits('0', 'lots') });
      expect(c).to.deep.include({ status: 'warn', found: "could not tell: /proc/self/limits: 'Max locked memory' is 'lots', not a number" });
    });
  });

  describe('kdump', () => {
    it('a loaded crash kernel warns; none, or a kernel without kexec, is ok', () => {
      const c = check('kdump', { '/sys/kernel/kexec_crash_loaded': '1\n' });
      expect(c.status).to.equal('warn');
      expect(c.fix).to.equal('sudo systemctl disable --now kdump-tools (Debian, Ubuntu) or kdump (Fedora, RHEL)');
      expect(check('kdump', { '/sys/kernel/kexec_crash_loaded': null })).to.deep.include({ status: 'ok', found: 'this kernel cannot load a crash kernel' });
    });
  });

  it('warnings leave the host ok; one failure does not', () => {
    expect(auditHost({ root: host({ '/proc/sys/kernel/yama/ptrace_scope': null, '/sys/kernel/kexec_crash_loaded': '1\n' }) }).ok).to.equal(true);
    expect(auditHost({ root: host({ '/proc/sys/kernel/yama/ptrace_scope': '0\n' }) }).ok).to.equal(false);
  });
  describe('the agent unit', () => {
    const unit = fs.readFileSync(path.join(ROOT, 'agent', 'lethe-agent.service'), 'utf8');

    it('none installed is a warning that says how to install it', () => {
      const c = check('agent-unit', { [USER_UNIT]: null });
      expect(c.status).to.equal('warn');
      expect(c.found).to.contain('no lethe-agent unit is installed');
      expect(c.fix).to.contain('cp agent/lethe-agent.service');
    });

    it('a unit without LimitCORE=0 or ProtectSystem=strict fails, naming each and why', () => {
      const c = check('agent-unit', { [USER_UNIT]: unit.replace(/^LimitCORE=0$/m, '').replace(/^ProtectSystem=strict$/m, 'ProtectSystem=full') });
      expect(c.status).to.equal('fail');
      expect(c.found).to.contain('LimitCORE is not set, not 0').and.contain('ProtectSystem is full, not strict');
      expect(c.fix).to.contain('LimitCORE=0 ProtectSystem=strict');
    });

    it('a drop-in that turns a setting off counts; booleans in any spelling; settings outside [Service] do not', () => {
      const c = check('agent-unit', { [`${USER_UNIT}.d/override.conf`]: '[Service]\nNoNewPrivileges=false\n' });
      expect(c.status).to.equal('fail');
      expect(c.found).to.contain('NoNewPrivileges is no, not yes');
      const spelled = unit.replace(/^NoNewPrivileges=yes$/m, 'NoNewPrivileges=true');
      expect(check('agent-unit', { [USER_UNIT]: spelled }).status).to.equal('ok');
      const outside = unit.replace(/^UMask=0077$/m, '') + '\n[Install]\nUMask=0077\n';
      expect(check('agent-unit', { [USER_UNIT]: outside }).status).to.equal('warn');
    });

    it('a system unit is found too', () => {
      const c = check('agent-unit', { [USER_UNIT]: null, '/etc/systemd/system/lethe-agent@.service': unit });
      expect(c.status).to.equal('ok');
      expect(c.found).to.match(/^\/etc\/systemd\/system\/lethe-agent@\.service has LimitCORE=0/);
    });
  });
});
