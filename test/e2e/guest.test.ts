// The test guest under real QEMU (TCG here): the built artifacts, `lethe vm snapshot`
// through the real CLI, the workload's disk mode, and how QEMU failures are reported.
import { expect } from 'chai';
import { execFileSync } from 'node:child_process';
import fs from 'node:fs';
import path from 'node:path';
import { gunzipSync } from 'node:zlib';
import { Vm, guestCmdline, makeRunDir } from '../../agent/vm/qemu.js';
import { buildGuest, PRESET_BLOCKS, type GuestArtifacts } from '../../guest-driver/build.js';
import { FLAG_SECRET, MAGIC_DISK, MAGIC_MEM, PAGE_SIZE, SECRET_EVERY, checkPage, secretMarker } from '../../guest-driver/page-format.js';
import { largestWorkloadMib } from '../../cli/cmd-vm.js';
import { lethe, tmpDir } from '../helpers/proc.js';
import { SUITE_TIMEOUT_MS, consoleLine } from '../helpers/progress.js';

const MiB = 1024 * 1024;

/** QEMU processes whose command line mentions `dir`. */
function qemuUsing(dir: string): string[] {
  return fs
    .readdirSync('/proc')
    .filter((p) => /^\d+$/.test(p))
    .map((p) => {
      try {
        return fs.readFileSync(`/proc/${p}/cmdline`, 'latin1');
      } catch {
        return '';
      }
    })
    .filter((cmd) => cmd.includes('qemu-system') && cmd.includes(dir));
}

/** Boots the test guest directly through the agent's Vm, with `disk` as /dev/vda. */
async function boot(guest: GuestArtifacts, dir: string, append: string, disk?: string): Promise<Vm> {
  const runDir = makeRunDir();
  return Vm.start(
    {
      kernel: guest.vmlinux,
      initrd: guest.initramfs,
      append,
      memBytes: 128 * MiB,
      memPath: path.join(dir, 'ram.bin'),
      disk,
      accel: 'tcg',
      qmpSocket: path.join(runDir, 'qmp.sock'),
    },
    runDir,
  );
}

/** A file from the ext4 image, read on the host with debugfs (e2fsprogs). */
function readFromImage(image: string, file: string): Buffer {
  return execFileSync('debugfs', ['-R', `cat /${file}`, image], { maxBuffer: 64 * MiB, stdio: ['ignore', 'pipe', 'ignore'] });
}

describe('test guest (real QEMU)', function () {
  this.timeout(SUITE_TIMEOUT_MS);
  this.slow(20_000);
  let guest: GuestArtifacts;
  // Each run leaves guest RAM files and disk copies (~200 MiB); remove them.
  const dirs: string[] = [];
  const scratch = (prefix?: string) => {
    const d = tmpDir(prefix);
    dirs.push(d);
    return d;
  };
  after(() => dirs.forEach((d) => fs.rmSync(d, { recursive: true, force: true })));

  before(async function () {
    this.timeout(600_000); // the first build downloads the kernel package
    guest = await buildGuest();
  });

  it('packs busybox, /init, the workload and the modules into the initramfs', () => {
    const cpio = gunzipSync(fs.readFileSync(guest.initramfs));
    const listing = execFileSync(guest.busybox, ['cpio', '-t'], { input: cpio, stdio: ['pipe', 'pipe', 'ignore'] }).toString().split('\n');
    expect(listing).to.include.members(['init', 'dev/console', 'bin/busybox', 'bin/sh', 'bin/lethe-workload', 'lib/modules/order']);
    expect(guest.modules).to.include.members(['virtio', 'virtio_ring', 'virtio_pci', 'virtio_blk', 'virtio_console', 'virtio_balloon', 'ext4', 'jbd2']);
    for (const m of guest.modules) expect(listing).to.include(`lib/modules/${m}.ko`);
    expect(guest.modules.indexOf('virtio')).to.be.lessThan(guest.modules.indexOf('virtio_pci'));
    expect(guest.modules.indexOf('jbd2')).to.be.lessThan(guest.modules.indexOf('ext4'));
    expect(fs.readFileSync(guest.vmlinux).subarray(0, 4).toString('latin1')).to.equal('\x7fELF');
  });

  it('reuses the cached build when no input changed', async () => {
    const again = await buildGuest();
    expect(again.built).to.equal(false);
    expect(again.stamp).to.equal(guest.stamp);
  });

  describe('lethe vm snapshot', () => {
    const secret = 'e2e-secret-7f3a';
    let out: string;
    let result: {
      files: Record<'disk' | 'ram' | 'state', { path: string; bytes: number }>;
      pages: number;
      secret: string;
      accel: string;
      bootToReadySeconds: number;
    };

    before(async function () {
      out = path.join(scratch('lethe-snapshot-'), 'snap');
      const r = await lethe(['vm', 'snapshot', '--out', out, '--mem', '128M', '--workload-mib', '16', '--secret', secret, '--json']);
      expect(r.code, r.stderr).to.equal(0);
      result = JSON.parse(r.stdout) as typeof result;
    });

    it('leaves disk.raw, ram.bin (the RAM size) and state.bin (a QEMU migration stream without RAM)', () => {
      expect(result.files.disk.path).to.equal(path.join(out, 'disk.raw'));
      expect(fs.statSync(path.join(out, 'disk.raw')).size).to.equal(fs.statSync(guest.disk).size);
      expect(fs.statSync(path.join(out, 'ram.bin')).size).to.equal(128 * MiB);
      const state = fs.readFileSync(path.join(out, 'state.bin'));
      expect(state.subarray(0, 4).toString('latin1')).to.equal('QEVM');
      expect(state.length).to.be.greaterThan(0).and.lessThan(4 * MiB);
      expect(result.pages).to.equal(16 * 256);
      expect(result.secret).to.equal(secret);
      expect(['tcg', 'kvm']).to.include(result.accel);
      expect(result.bootToReadySeconds).to.be.greaterThan(0);
    });

    it('ram.bin is the plaintext guest RAM: every workload page intact, the secret in every 8th', () => {
      const ram = fs.readFileSync(path.join(out, 'ram.bin'));
      const marker = Buffer.from(secretMarker(secret));
      const seen = new Set<number>();
      let marked = 0;
      for (let at = 0; at < ram.length; at += PAGE_SIZE) {
        if (ram.readUInt32LE(at) !== MAGIC_MEM) continue;
        const c = checkPage(ram.subarray(at, at + PAGE_SIZE), MAGIC_MEM);
        if (!c.ok) continue;
        seen.add(c.index);
        if (c.flags & FLAG_SECRET && ram.subarray(at + 64, at + 64 + marker.length).equals(marker)) marked++;
      }
      // vCPUs stop between instructions: at most the one page being rewritten is torn.
      expect(seen.size).to.be.at.least(result.pages - 1);
      expect(marked).to.be.at.least(result.pages / SECRET_EVERY - 1);
    });

    it('leaves no QEMU running', () => {
      expect(qemuUsing(out)).to.deep.equal([]);
    });

    it('refuses to overwrite an earlier snapshot without --force', async () => {
      const r = await lethe(['vm', 'snapshot', '--out', out]);
      expect(r.code).to.equal(2);
      expect(r.stderr).to.equal(
        `lethe: error: '${out}' already holds a snapshot (disk.raw, ram.bin, state.bin)\nlethe: hint: choose another --out, or add --force to replace it\n`,
      );
    });
  });

  it('refuses a bad --mem with exit code 2 before doing anything', async () => {
    const out = path.join(scratch(), 'never');
    const r = await lethe(['vm', 'snapshot', '--out', out, '--mem', '12Q']);
    expect([r.code, r.stdout, r.stderr]).to.deep.equal([2, '', "lethe: error: bad --mem: '12Q'\nlethe: hint: use a size with a unit, e.g. 128M or 1G\n"]);
    expect(fs.existsSync(out)).to.equal(false);
  });

  it('issue #22: refuses a workload the guest has no room for before booting, naming the --mem and the workload that fit (exit 2)', async () => {
    const out = path.join(scratch(), 'never');
    const r = await lethe(['vm', 'snapshot', '--out', out, '--mem', '128M']); // the default 64 MiB workload
    expect([r.code, r.stdout, r.stderr]).to.deep.equal([
      2,
      '',
      'lethe: error: --workload-mib 64 does not fit in --mem 128M: the guest itself needs 92 MiB of it\n' +
        'lethe: hint: use --mem 158M or more for this workload, or --workload-mib 36 or less with this --mem\n',
    ]);
    expect(fs.existsSync(out)).to.equal(false);
  });

  it('the largest workload the rule lets into --mem 128M runs: the rule holds for the guest as built', async () => {
    const mib = largestWorkloadMib(128);
    const r = await lethe(['vm', 'snapshot', '--out', path.join(scratch(), 'full'), '--mem', '128M', '--workload-mib', String(mib), '--accel', 'tcg', '--timeout', '10m', '--json']);
    expect(r.code, r.stderr).to.equal(0);
    expect((JSON.parse(r.stdout) as { pages: number }).pages).to.equal(mib * 256);
  });

  it('kills QEMU and says what it waited for when the workload is not ready in time', async () => {
    const out = path.join(scratch(), 'slow');
    const r = await lethe(['vm', 'snapshot', '--out', out, '--mem', '128M', '--workload-mib', '16', '--timeout', '1s', '--accel', 'tcg']);
    expect(r.code).to.equal(1);
    expect(r.stderr).to.match(/^lethe: error: timed out after 1 s waiting for the workload's ready line \(LETHE-WORKLOAD-READY\) \(qemu killed\)\n/);
    expect(fs.existsSync(path.join(out, 'state.bin'))).to.equal(false);
    expect(qemuUsing(out)).to.deep.equal([]);
  });

  it('reports a guest that dies early with QEMU exit status and the kernel panic', async () => {
    const dir = scratch();
    const vm = await boot(guest, dir, 'console=ttyS0 panic=-1 quiet rdinit=/nonexistent');
    const err = await vm.waitForConsole(/LETHE-WORKLOAD-READY/, 60_000, 'the ready line').then(
      () => undefined,
      (e: Error) => e,
    );
    await vm.kill();
    expect(err?.message).to.match(/^qemu exited while waiting for the ready line: qemu exited with status 0\n/);
    expect(err?.message).to.contain('Kernel panic - not syncing: VFS: Unable to mount root fs');
    expect(err?.message).to.contain('last console lines:');
  });

  it('writes and verifies files on /dev/vda, and they survive into the next boot', async () => {
    const dir = scratch();
    const disk = path.join(dir, 'disk.raw');
    fs.copyFileSync(guest.disk, disk);
    for (const [mode, expected] of [['write', 'LETHE-DISK ok files=2 blocks=1280'], ['verify', 'LETHE-DISK ok files=2 blocks=1280']] as const) {
      fs.rmSync(path.join(dir, 'ram.bin'), { force: true });
      const vm = await boot(guest, dir, guestCmdline({ mib: 0, disk: mode }), disk);
      try {
        const line = await consoleLine(vm, path.join(dir, 'ram.bin'), /^LETHE-DISK .*/, 'the disk check');
        expect(line[0], mode).to.equal(expected);
        // With no memory workload the guest powers off by itself.
        expect(await vm.exited).to.deep.equal({ code: 0, signal: null });
      } finally {
        await vm.kill();
      }
    }
    const written = readFromImage(disk, 'written.blk');
    expect(written.length).to.equal(1024 * PAGE_SIZE);
    for (let i = 0; i < 1024; i++) {
      expect(checkPage(written.subarray(i * PAGE_SIZE, (i + 1) * PAGE_SIZE), MAGIC_DISK), `block ${i}`).to.deep.equal({ ok: true, index: i, seq: 2, flags: 0 });
    }
    expect(readFromImage(disk, 'preset.blk').length).to.equal(PRESET_BLOCKS * PAGE_SIZE);
  });
});
