// QEMU's 'stop' with a disk read outstanding: the vCPUs pause and STOP is sent at
// once, but 'stop' is answered only once block I/O has drained, so a hold (which
// waits for the answer) knows no read will still land in guest RAM. A read that
// waits on a server that is down therefore holds the hold back: demand fetches
// give up at the lease's eviction point (agent/remote/fetcher.ts) for that reason. The
// same guest shows its RAM kept out of QEMU's core dumps.
import { expect } from 'chai';
import fs from 'node:fs';
import path from 'node:path';
import { FileBackend } from '../../agent/disk/nbd/file-backend.js';
import { NbdServer, type BlockBackend } from '../../agent/disk/nbd/server.js';
import { Vm, guestCmdline, makeRunDir } from '../../agent/vm/qemu.js';
import { buildGuest } from '../../guest-driver/build.js';
import { SUITE_TIMEOUT_MS, consoleLine, vmProgress, waitOnProgress } from '../helpers/progress.js';

const MiB = 1024 * 1024;

/** Settles within `ms`? */
async function settlesWithin(p: Promise<unknown>, ms: number): Promise<boolean> {
  let done = false;
  void p.then(
    () => (done = true),
    () => (done = true),
  );
  await new Promise((r) => setTimeout(r, ms));
  return done;
}

describe("QMP 'stop' with a disk read outstanding (real QEMU, TCG)", function () {
  this.timeout(SUITE_TIMEOUT_MS);
  this.slow(15_000);

  it("the vCPUs pause at once, but 'stop' answers only once the read is served; no read is lost; guest RAM is left out of core dumps", async () => {
    const guest = await buildGuest();
    const runDir = makeRunDir();
    const image = path.join(runDir, 'disk.img');
    fs.copyFileSync(guest.disk, image);
    const file = await FileBackend.open(image);
    // Reads wait while `stalled` is set, as a demand fetch waits on a server that is down.
    let reads = 0;
    let stalled = false;
    const waiting: (() => void)[] = [];
    const backend: BlockBackend = {
      size: file.size,
      read: async (offset, length) => {
        reads++;
        if (stalled) await new Promise<void>((r) => waiting.push(r));
        return file.read(offset, length);
      },
      write: (offset, data, fua) => file.write(offset, data, fua),
      flush: () => file.flush(),
      trim: (offset, length) => file.trim(offset, length),
      writeZeroes: (offset, length, fua) => file.writeZeroes(offset, length, fua),
    };
    const nbd = new NbdServer(new Map([['guest', backend]]));
    const socket = path.join(runDir, 'nbd.sock');
    await nbd.listen({ path: socket });
    const vm = await Vm.start(
      {
        kernel: guest.vmlinux,
        initrd: guest.initramfs,
        append: guestCmdline({ mib: 0, disk: 'verify' }),
        memBytes: 128 * MiB,
        memPath: path.join(runDir, 'ram.bin'),
        nbdDisk: { socket, export: 'guest' },
        accel: 'tcg',
        qmpSocket: path.join(runDir, 'qmp.sock'),
      },
      runDir,
    );
    try {
      // Guest RAM is kept out of QEMU's core dumps (dump-guest-core=off: VmFlags 'dd').
      const smaps = fs.readFileSync(`/proc/${vm.pid}/smaps`, 'utf8').split(/\n(?=[0-9a-f]+-[0-9a-f]+ )/);
      const ram = smaps.find((m) => m.split('\n')[0].endsWith(path.join(runDir, 'ram.bin')));
      expect(ram, 'the RAM file is mapped').to.not.equal(undefined);
      expect(ram!.match(/^VmFlags:(.*)$/m)?.[1].split(' '), 'guest RAM VmFlags').to.include('dd');
      const ramPath = path.join(runDir, 'ram.bin');
      await waitOnProgress(async () => reads >= 3, vmProgress(vm, ramPath), { what: 'the guest reading its disk' });
      stalled = true;
      await waitOnProgress(async () => waiting.length > 0, vmProgress(vm, ramPath), { what: 'a guest disk read to wait' });

      const stopEvent = vm.qmp.waitForEvent('STOP', 2_000);
      const stop = vm.qmp.execute('stop');
      await stopEvent;
      // The vCPUs are paused, yet QEMU is still draining: 'stop' has no answer.
      expect(await settlesWithin(stop, 1_000), "'stop' answers only after the drain").to.equal(false);

      stalled = false;
      waiting.splice(0).forEach((r) => r());
      await stop;
      const st = await vm.qmp.execute<{ running: boolean; status: string }>('query-status');
      expect(st).to.include({ running: false, status: 'paused' });
      // No read was lost: the guest carries on to its disk check.
      await vm.qmp.execute('cont');
      await consoleLine(vm, ramPath, /^LETHE-DISK /, 'the disk check');
    } finally {
      await vm.kill();
      await nbd.close();
      await file.close();
      fs.rmSync(runDir, { recursive: true, force: true });
    }
  });
});
