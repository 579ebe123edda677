// The guest hint channel end to end: the test guest under real QEMU (TCG) runs
// lethe-guestd beside the workload, and a HintChannel on QEMU's org.lethe.hint socket
// checks what the driver reports against the guest's RAM file, read with pread.
import { expect } from 'chai';
import { once } from 'node:events';
import fs from 'node:fs';
import net from 'node:net';
import path from 'node:path';
import { GuestHintError, HintChannel, HintParser, type FrameRun, type HintMessage, type HintPolicy, type HintReport } from '../../agent/vm/hints.js';
import { Vm, guestCmdline, makeRunDir } from '../../agent/vm/qemu.js';
import { buildGuest, PRESET_BLOCKS } from '../../guest-driver/build.js';
import { FLAG_SECRET, MAGIC_DISK, MAGIC_MEM, PAGE_SIZE, SECRET_EVERY, SECRET_OFFSET, checkPage, secretMarker } from '../../guest-driver/page-format.js';
import { tmpDir } from '../helpers/proc.js';
import { SUITE_TIMEOUT_MS, consoleLine } from '../helpers/progress.js';

const MiB = 1024 * 1024;
const WORKLOAD_MIB = 16;
const WORKLOAD_PAGES = (WORKLOAD_MIB * MiB) / PAGE_SIZE;
const SECRET = 'hints-e2e-5c1d';
const WORKLOAD: HintPolicy = { intervalMs: 0, processes: ['lethe-workload'], cgroups: [], files: [] };

/** What a guest frame holds, from the RAM file. */
interface Frame {
  magic: number;
  index: number;
  marked: boolean;
}

/** Every frame that holds a valid workload page or disk block, read with pread (never a mapping: a hole would be faulted in). */
function readFrames(ramPath: string, frames?: FrameRun[]): Map<number, Frame> {
  const fd = fs.openSync(ramPath, 'r');
  const marker = Buffer.from(secretMarker(SECRET), 'latin1');
  const out = new Map<number, Frame>();
  const runs: FrameRun[] = frames ?? [[0, fs.fstatSync(fd).size / PAGE_SIZE]];
  const buf = Buffer.alloc(MiB);
  try {
    for (const [pfn, count] of runs) {
      for (let done = 0; done < count; ) {
        const n = Math.min(count - done, MiB / PAGE_SIZE);
        const got = fs.readSync(fd, buf, 0, n * PAGE_SIZE, (pfn + done) * PAGE_SIZE);
        for (let i = 0; i < got / PAGE_SIZE; i++) {
          const page = buf.subarray(i * PAGE_SIZE, (i + 1) * PAGE_SIZE);
          const magic = page.readUInt32LE(0);
          if (magic !== MAGIC_MEM && magic !== MAGIC_DISK) continue;
          const c = checkPage(page, magic);
          if (!c.ok) continue;
          const marked = (c.flags & FLAG_SECRET) !== 0 && page.subarray(SECRET_OFFSET, SECRET_OFFSET + marker.length).equals(marker);
          out.set(pfn + done + i, { magic, index: c.index, marked });
        }
        done += n;
      }
    }
  } finally {
    fs.closeSync(fd);
  }
  return out;
}

const inRuns = (runs: FrameRun[]) => {
  const set = new Set<number>();
  for (const [pfn, count] of runs) for (let i = 0; i < count; i++) set.add(pfn + i);
  return set;
};

const indices = (frames: Map<number, Frame>, keep: (f: Frame) => boolean) => new Set([...frames.values()].filter(keep).map((f) => f.index));

function nextReport(c: HintChannel, timeoutMs = 60_000): Promise<HintReport> {
  return new Promise((resolve, reject) => {
    const timer = setTimeout(() => reject(new Error(`no report within ${timeoutMs / 1000} s (counters ${JSON.stringify(c.counters)})`)), timeoutMs);
    c.once('report', (r: HintReport) => {
      clearTimeout(timer);
      resolve(r);
    });
  });
}

/** A channel that has had its hello and the report its policy asked for. */
/** What the driver refused on channels opened by openChannel (which never send anything it should refuse). */
const errors: GuestHintError[] = [];

async function openChannel(socket: string, policy: HintPolicy): Promise<{ channel: HintChannel; report: HintReport }> {
  const channel = new HintChannel(socket, policy);
  channel.on('error', (e: GuestHintError) => errors.push(e));
  const hello = once(channel, 'hello');
  const report = nextReport(channel);
  channel.start();
  await hello;
  return { channel, report: await report };
}

describe('guest hints (real QEMU guest and lethe-guestd)', function () {
  this.timeout(SUITE_TIMEOUT_MS);
  this.slow(60_000);
  let dir: string;
  let vm: Vm;
  let hintSocket: string;
  let ramPath: string;
  let channel: HintChannel | undefined;
  const consoleLines: string[] = [];

  before(async function () {
    this.timeout(SUITE_TIMEOUT_MS);
    const guest = await buildGuest();
    dir = tmpDir('lethe-hints-');
    const runDir = makeRunDir();
    hintSocket = path.join(runDir, 'hint.sock');
    ramPath = path.join(dir, 'ram.bin');
    const disk = path.join(dir, 'disk.raw');
    fs.copyFileSync(guest.disk, disk);
    vm = await Vm.start(
      {
        kernel: guest.vmlinux,
        initrd: guest.initramfs,
        // disk=verify reads /mnt/preset.blk, so its blocks are in the guest's page cache.
        append: guestCmdline({ mib: WORKLOAD_MIB, secret: SECRET, disk: 'verify', intervalMs: 500 }),
        memBytes: 128 * MiB,
        memPath: ramPath,
        disk,
        accel: 'tcg',
        qmpSocket: path.join(runDir, 'qmp.sock'),
        hintSocket,
      },
      runDir,
    );
    vm.onConsoleLine((l) => consoleLines.push(l));
    await consoleLine(vm, ramPath, /^LETHE-GUESTD started port=\S+ frames=\d+ free-pages=yes$/, "the guest driver's start line");
    await consoleLine(vm, ramPath, /^LETHE-WORKLOAD-READY pages=4096 /, "the workload's ready line");
  });

  afterEach(function () {
    channel?.close();
    channel = undefined;
    if (this.currentTest?.state === 'failed') console.log(vm.consoleTail(30).join('\n'));
  });

  after(async () => {
    await vm?.kill();
    if (dir) fs.rmSync(dir, { recursive: true, force: true });
  });

  /** Holds the guest while RAM is read, so the frames are the ones the report named. */
  async function whileHeld<T>(fn: () => T): Promise<T> {
    await vm.qmp.execute('stop');
    try {
      return fn();
    } finally {
      await vm.qmp.execute('cont');
    }
  }

  it("reports the workload's frames as sensitive: its planted pages are there, and no live one is free", async () => {
    const opened = await openChannel(hintSocket, WORKLOAD);
    channel = opened.channel;
    const report = opened.report;
    const { all, sensitive, free } = await whileHeld(() => ({ all: readFrames(ramPath), sensitive: readFrames(ramPath, report.sensitive), free: readFrames(ramPath, report.free) }));

    expect(report.procs).to.equal(1);
    expect(report.sensitiveFrames).to.be.at.least(WORKLOAD_PAGES);
    expect(report.freeFrames).to.be.greaterThan(0);
    const planted = indices(all, (f) => f.magic === MAGIC_MEM && f.marked);
    const plantedSensitive = indices(sensitive, (f) => f.magic === MAGIC_MEM && f.marked);
    expect(planted.size).to.be.at.least(WORKLOAD_PAGES / SECRET_EVERY - 1);
    expect(plantedSensitive.size, 'planted pages in reported sensitive frames').to.be.at.least(planted.size - 1);
    const workloadSensitive = indices(sensitive, (f) => f.magic === MAGIC_MEM);
    expect(workloadSensitive.size).to.be.at.least(WORKLOAD_PAGES - 1);
    // A freed frame keeps its old bytes (a copy the kernel moved away from), so a
    // workload page may show up in a free frame; its live copy must be sensitive.
    const freeWorkload = [...free.values()].filter((f) => f.magic === MAGIC_MEM);
    expect(freeWorkload.filter((f) => !workloadSensitive.has(f.index))).to.deep.equal([]);
    const sensitiveSet = inRuns(report.sensitive);
    expect(report.free.filter(([pfn, count]) => [...Array(count).keys()].some((i) => sensitiveSet.has(pfn + i)))).to.deep.equal([]);
  });

  it('reports nothing sensitive for a process that does not exist, free frames still', async () => {
    const opened = await openChannel(hintSocket, { ...WORKLOAD, processes: ['no-such-proc'] });
    channel = opened.channel;
    expect(opened.report).to.include({ sensitiveFrames: 0, procs: 0 });
    expect(opened.report.sensitive).to.deep.equal([]);
    expect(opened.report.freeFrames).to.be.greaterThan(0);
  });

  it("reports the page cache of a sensitive file: /mnt/preset.blk's blocks", async () => {
    const opened = await openChannel(hintSocket, { ...WORKLOAD, processes: [], files: ['/mnt/preset.blk'] });
    channel = opened.channel;
    const pending = nextReport(channel);
    channel.requestReport();
    const report = await pending;
    const sensitive = await whileHeld(() => readFrames(ramPath, report.sensitive));
    expect(report.procs).to.equal(0);
    const blocks = indices(sensitive, (f) => f.magic === MAGIC_DISK);
    expect(blocks.size).to.be.at.least(PRESET_BLOCKS - 1);
    expect(indices(sensitive, (f) => f.magic === MAGIC_MEM).size, 'workload pages').to.equal(0);
  });

  it('says hello again to a host that comes back, reports go on, the workload is unaffected', async () => {
    const verified = () => consoleLines.filter((l) => /^LETHE-VERIFY pass=\d+ ok=4096 bad=0$/.test(l)).length;
    let opened = await openChannel(hintSocket, WORKLOAD);
    opened.channel.close();
    // Once idle, once while reports stream every 100 ms.
    for (const intervalMs of [0, 100]) {
      opened = await openChannel(hintSocket, { ...WORKLOAD, intervalMs });
      channel = opened.channel;
      expect(opened.report.procs).to.equal(1);
      if (intervalMs) await nextReport(channel);
      channel.close();
    }
    const before = verified();
    opened = await openChannel(hintSocket, WORKLOAD);
    channel = opened.channel;
    expect(opened.report.sensitiveFrames).to.be.at.least(WORKLOAD_PAGES);
    const after = await new Promise<number>((resolve) => {
      const check = () => (verified() > before ? resolve(verified()) : setTimeout(check, 200));
      check();
    });
    expect(after).to.be.greaterThan(before);
    expect(consoleLines.filter((l) => /LETHE-VERIFY-BAD|LETHE-WORKLOAD-EXIT|bad=[1-9]/.test(l))).to.deep.equal([]);
  });

  it('answers malformed lines with errors and goes on reporting', async () => {
    const sock = net.createConnection(hintSocket);
    const parser = new HintParser();
    const messages: HintMessage[] = [];
    sock.on('data', (d: Buffer) => messages.push(...parser.push(d)));
    await once(sock, 'connect');
    const wait = async (pred: (m: HintMessage[]) => boolean) => {
      for (const deadline = Date.now() + 60_000; !pred(messages); await new Promise((r) => setTimeout(r, 100))) {
        if (Date.now() > deadline) throw new Error(`timed out; got ${JSON.stringify(messages.map((m) => m.kind))}`);
      }
    };
    try {
      sock.write('hello\n');
      await wait((m) => m.some((x) => x.kind === 'hello'));
      const bad = [
        Buffer.from([0x00, 0xff, 0x1b, 0x5b, 0x41, 0x0a]),
        Buffer.from('x'.repeat(5000) + '\n'),
        Buffer.from('policy interval=1000 procs=a%2 cgroups= files=\n'),
        Buffer.from('policy interval=1000 procs=a%zz cgroups= files=\n'),
        Buffer.from('policy interval=10 procs= cgroups= files=\n'),
        Buffer.from('policy interval=1000 procs= cgroups=relative files=\n'),
        Buffer.from('policy interval=1000 procs=\n'),
        Buffer.from('policy interval=1000 procs= cgroups= files= colour=blue\n'),
        Buffer.from('frobnicate\n'),
        Buffer.from('report now\n'),
        Buffer.from('\n'),
      ];
      // Split across writes at odd places, as a stream may be.
      const all = Buffer.concat(bad);
      for (let at = 0; at < all.length; at += 777) sock.write(all.subarray(at, at + 777));
      sock.write('report\n');
      // A report the driver was writing when this host connected may come first.
      const lastRefusal = (m: HintMessage[]) => m.map((x) => x.kind === 'error' && x.reason === "unknown command ''").lastIndexOf(true);
      await wait((m) => lastRefusal(m) >= 0 && m.slice(lastRefusal(m)).some((x) => x.kind === 'report'));
      const refusals = messages.filter((m) => m.kind === 'error').map((m) => (m as { reason: string }).reason);
      expect(refusals).to.deep.equal([
        'non-printable byte in line',
        'line too long',
        'bad percent-encoding in procs',
        'bad percent-encoding in procs',
        'bad interval \'10\' (0, or 100 to 86400000 ms)',
        'a path that is not absolute in cgroups',
        "missing policy field 'cgroups'",
        "unknown policy field 'colour'",
        "unknown command 'frobnicate'",
        'report takes no arguments',
        "unknown command ''",
      ]);
      // The policy from before the bad lines still holds: the last channel's.
      const report = messages.slice(lastRefusal(messages)).find((m) => m.kind === 'report') as { report: HintReport };
      expect(report.report.procs).to.equal(1);
      expect(parser.counters).to.deep.equal({ overlong: 0, garbage: 0, brokenReports: 0 });
    } finally {
      sock.destroy();
    }
    const again = await openChannel(hintSocket, WORKLOAD);
    channel = again.channel;
    expect(again.report.procs).to.equal(1);
  });

  it('drops the page cache of the sensitive files on request', async () => {
    const opened = await openChannel(hintSocket, { ...WORKLOAD, processes: [], files: ['/mnt'] });
    channel = opened.channel;
    expect(opened.report.sensitiveFrames).to.be.at.least(PRESET_BLOCKS);
    const dropped = await channel.dropCache();
    expect(dropped.files).to.be.at.least(2); // hello.txt and preset.blk
    expect(dropped.pages).to.be.at.least(PRESET_BLOCKS);
    const pending = nextReport(channel);
    channel.requestReport();
    const after = await pending;
    const blocks = indices(await whileHeld(() => readFrames(ramPath, after.sensitive)), (f) => f.magic === MAGIC_DISK);
    expect(blocks.size).to.equal(0);
    expect(errors).to.deep.equal([]);
  });
});
