// The disk path end to end: the agent serves the test guest's disk over NBD
// from the encrypted chunks on a real server; real NBD clients and a real
// QEMU guest read and write it; a flushed write survives kill -9 of the
// agent; check-in makes the writes a new image version.
import { expect } from 'chai';
import { execFile, execFileSync } from 'node:child_process';
import fs from 'node:fs';
import path from 'node:path';
import { promisify } from 'node:util';
import { control } from '../../agent/daemon/control.js';
import type { AgentStatus } from '../../agent/daemon/start.js';
import { Vm, guestCmdline, makeRunDir } from '../../agent/vm/qemu.js';
import { buildGuest, type GuestArtifacts } from '../../guest-driver/build.js';
import { MAGIC_DISK, PAGE_SIZE, checkPage } from '../../guest-driver/page-format.js';
import { assign, enrolledDevice, pushImage, type TestDevice } from '../helpers/fixtures.js';
import { SUITE_TIMEOUT_MS, consoleLine } from '../helpers/progress.js';
import { lethe, startAgentProc, startServer, tmpDir, waitFor, type AgentProc, type ServerProc } from '../helpers/proc.js';
import { expectSameBytes } from '../helpers/bytes.js';

const run = promisify(execFile);
const MiB = 1024 * 1024;

describe('disk path: NBD from the agent (real server, agent, clients and QEMU)', function () {
  this.timeout(SUITE_TIMEOUT_MS);
  this.slow(20_000);
  let guest: GuestArtifacts;
  let s: ServerProc;
  let dev: TestDevice;
  let agent: AgentProc;
  let dir: string;
  const uri = () => `nbd+unix:///guest?socket=${path.join(dev.home, 'nbd.sock')}`;
  const status = () => control<AgentStatus>(dev.home, { cmd: 'status' });

  async function startAgent(args: string[] = []): Promise<void> {
    // qemu-io, nbdcopy and the QEMU this test starts are not the agent's own: they connect by opt-in.
    agent = await startAgentProc(dev.home, 'guest', ['--no-prefetch', '--nbd-peers', 'user', ...args]);
    await waitFor(async () => (await status()).nbd?.address ?? undefined, 20_000, 'the NBD export');
  }

  before(async () => {
    guest = await buildGuest();
    dir = tmpDir('lethe-disk-');
    s = await startServer();
    await pushImage(s, 'guest', { plain: { disk: fs.readFileSync(guest.disk), mem: Buffer.alloc(0), state: Buffer.alloc(0) } });
    dev = await enrolledDevice(s);
    await assign(s, dev.deviceId, 'guest');
    await startAgent();
  });
  after(async () => {
    await agent?.stop();
    dev?.close();
    await s?.stop();
    fs.rmSync(dir, { recursive: true, force: true });
  });

  it('nbdinfo sees the export; qemu-img compare and nbdcopy match the original disk, fetched cold from the server', async () => {
    const info = JSON.parse((await run('nbdinfo', ['--json', uri()])).stdout) as { exports: { 'export-name': string; 'export-size': number }[] };
    expect(info.exports[0]['export-name']).to.equal('guest');
    expect(info.exports[0]['export-size']).to.equal(fs.statSync(guest.disk).size);
    const cmp = await run('qemu-img', ['compare', '-f', 'raw', '-F', 'raw', uri(), guest.disk]);
    expect(cmp.stdout).to.equal('Images are identical.\n');
    const copy = path.join(dir, 'copy.raw');
    await run('nbdcopy', [uri(), copy]);
    expectSameBytes(fs.readFileSync(copy), fs.readFileSync(guest.disk));
    const st = await status();
    expect(st.reads.fromServer).to.be.greaterThan(0);
  });

  it('a QEMU guest writes, reads and checksums files on /dev/vda over NBD, across two boots', async () => {
    for (const mode of ['write', 'verify'] as const) {
      const runDir = makeRunDir();
      const vm = await Vm.start(
        {
          kernel: guest.vmlinux,
          initrd: guest.initramfs,
          append: guestCmdline({ mib: 0, disk: mode }),
          memBytes: 128 * MiB,
          memPath: path.join(runDir, 'ram.bin'),
          nbdDisk: { socket: path.join(dev.home, 'nbd.sock'), export: 'guest' },
          accel: 'tcg',
          qmpSocket: path.join(runDir, 'qmp.sock'),
        },
        runDir,
      );
      try {
        const line = await consoleLine(vm, path.join(runDir, 'ram.bin'), /^LETHE-DISK .*/, 'the disk check');
        expect(line[0], mode).to.equal('LETHE-DISK ok files=2 blocks=1280');
        expect(await vm.exited).to.deep.equal({ code: 0, signal: null });
      } finally {
        await vm.kill();
        fs.rmSync(runDir, { recursive: true, force: true });
      }
    }
  });

  it('check-in makes the writes a new version that pull reassembles', async () => {
    const before = path.join(dir, 'before-checkin.raw');
    await run('nbdcopy', [uri(), before]);
    const r = await lethe(['agent', 'checkin', '--home', dev.home, '--json']);
    expect(r.code, r.stderr).to.equal(0);
    const out = JSON.parse(r.stdout) as { version: number; chunks: number };
    expect(out.version).to.equal(2);
    const pulled = path.join(dir, 'pulled');
    // The check-in is this device's branch: the image's shared version stays 1 (docs/branches.md).
    expect((await lethe(['image', 'pull', `guest@${out.version}`, '--out', pulled], s.env)).code).to.equal(0);
    const disk = fs.readFileSync(path.join(pulled, 'disk.raw'));
    expectSameBytes(disk, fs.readFileSync(before), 'the new version is what the guest left on the export');
    const written = execFileSync('debugfs', ['-R', 'cat /written.blk', path.join(pulled, 'disk.raw')], { maxBuffer: 64 * MiB, stdio: ['ignore', 'pipe', 'ignore'] });
    expect(written.length).to.equal(1024 * PAGE_SIZE);
    for (let i = 0; i < 1024; i += 97) expect(checkPage(written.subarray(i * PAGE_SIZE, (i + 1) * PAGE_SIZE), MAGIC_DISK).ok, `block ${i}`).to.equal(true);
    // The agent moved its lease to the new version and nothing is dirty any more.
    const st = await waitFor(async () => ((await status()).version === 2 ? status() : undefined), 10_000, 'the new lease');
    expect(st.cache.dirty).to.equal(0);
  });
  it('qemu-io patterns from two clients at once, each reading what the other wrote', async () => {
    const io = (...cmds: string[]) => run('qemu-io', ['-f', 'raw', ...cmds.flatMap((c) => ['-c', c]), uri()]);
    await Promise.all([io('write -P 0x5a 0 192k', 'write -P 0x11 200k 4k'), io('write -P 0xa5 1M 256k', 'write -P 0x22 2100k 9k')]);
    const [a, b] = await Promise.all([io('read -P 0xa5 1M 256k', 'read -P 0x22 2100k 9k'), io('read -P 0x5a 0 192k', 'read -P 0x11 200k 4k')]);
    expect(a.stdout + b.stdout).to.not.contain('Pattern verification failed');
    expect(a.stdout).to.contain('read 262144/262144 bytes at offset 1048576');
    const st = await status();
    expect(st.cache.dirty).to.be.greaterThan(0);
    expect(st.nbd!.connections.total).to.be.at.least(4);
  });

  it('a flushed write survives kill -9 of the agent', async () => {
    await run('qemu-io', ['-f', 'raw', '-t', 'writeback', '-c', 'write -P 0x77 3M 100k', '-c', 'flush', uri()]);
    agent.proc.kill('SIGKILL');
    await agent.exited;
    await startAgent();
    const r = await run('qemu-io', ['-f', 'raw', '-c', 'read -P 0x77 3M 100k', '-c', 'read -P 0x5a 0 192k', uri()]).catch((e: { stdout: string; stderr: string }) => {
      throw new Error(`qemu-io failed: ${e.stdout} ${e.stderr}\nagent log:\n${agent.log()}`);
    });
    expect(r.stdout).to.not.contain('Pattern verification failed');
  });

});
