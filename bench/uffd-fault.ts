// Fault-service latency of the memory path, every variant in the same run:
//   c-handler  native/test/c-handler.c, the least a userfaultfd handler can do: the yardstick
//   addon-loop lethe_native polling the uffd on the main libuv loop → JS → resolve (UFFDIO_COPY)
//   addon-thread  lethe_native's fault thread → napi threadsafe function → JS → resolve
//   koffi      the same without the addon: poll.async on a libuv worker, read and UFFDIO_COPY via koffi
//   no-uffd    first touch of a tmpfs page with no userfaultfd at all (the kernel's own floor)
// fault-client (with the shim preloaded, as QEMU would have it) times the first touch of each
// page of a fresh RAM file: fault, round trip to the handler, page installed, thread resumed.
// Rounds interleave the variants so that drift in machine load hits them alike.
//
//   node --import tsx bench/uffd-fault.ts [--pages 4096] [--rounds 3] [--placement same,split,free] [--json]
//
// Where the faulting process and the handler run decides the cost more than the handler
// does: on a VM, waking a thread on another, idle vCPU goes through the hypervisor.
//   same   both on CPU 0 (every wakeup is a context switch on one CPU)
//   split  faulting process on CPU 0, handler (all its threads) on CPU 1
//   free   no pinning: the scheduler decides, and the numbers are a mix of the two
import { execFileSync } from 'node:child_process';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { parseArgs } from 'node:util';
import koffi from 'koffi';
import { table } from '../cli/output.js';
import { FaultThread, PAGE_SIZE, UffdListener, shimEnv, type FaultMode, type UffdMapping } from '../native/index.js';
import { timeCHandler, timeClient } from './lib/fault-client.js';
import { percentile, sortedCopy } from './lib/stats.js';

const { values } = parseArgs({
  options: {
    pages: { type: 'string', default: '4096' },
    rounds: { type: 'string', default: '3' },
    placement: { type: 'string', default: 'same,split,free' },
    json: { type: 'boolean', default: false },
  },
});
const PAGES = Number(values.pages);
const ROUNDS = Number(values.rounds);
const ROOT = path.resolve(import.meta.dirname, '..');

type Placement = 'same' | 'split' | 'free';
const PLACEMENTS: Record<Placement, { client: string; handler: string } | null> = {
  same: { client: '0', handler: '0' },
  split: { client: '0', handler: '1' },
  free: null,
};
const ALL_CPUS = `0-${os.cpus().length - 1}`;
let placement: Placement = 'free';

type Variant = 'c-handler' | 'addon-loop' | 'addon-thread' | 'koffi' | 'no-uffd';
const VARIANTS: Variant[] = ['c-handler', 'addon-loop', 'addon-thread', 'koffi', 'no-uffd'];

/** argv for the client or the handler, under taskset for the current placement. */
function pinned(who: 'client' | 'handler', cmd: string, args: string[]): [string, string[]] {
  const cpus = PLACEMENTS[placement];
  return cpus ? ['taskset', ['-c', cpus[who], cmd, ...args]] : [cmd, args];
}

/** Moves every thread of this process (the in-process handlers) to the placement's handler CPU. */
function place(p: Placement): void {
  placement = p;
  execFileSync('taskset', ['-a', '-cp', PLACEMENTS[p]?.handler ?? ALL_CPUS, String(process.pid)], { stdio: 'ignore' });
}

/** fault-client under the current placement. */
const client = (ram: string, env: Record<string, string>) => timeClient(ram, PAGES, env, (cmd, args) => pinned('client', cmd, args));

/** The byte c-handler fills a page with, so every variant copies the same data. */
const fillByte = (m: UffdMapping, address: number) => ((m.hello.offset + address - m.hello.base) / PAGE_SIZE) & 0xff;

async function withListener(sock: string, serve: (m: UffdMapping, fail: (e: Error) => void) => void, run: () => Promise<number[]>) {
  let failure: Error | undefined;
  let listener: UffdListener | undefined;
  const fail = (e: Error) => {
    failure ??= e;
    void listener?.close(); // the shim then kills fault-client, which ends the run
  };
  listener = await UffdListener.listen(sock, (m) => serve(m, fail), fail);
  try {
    const lat = await run().catch((e) => Promise.reject(failure ?? e));
    if (failure) throw failure;
    return lat;
  } finally {
    await listener.close();
  }
}

const addonServe = (mode: FaultMode) => (m: UffdMapping, fail: (e: Error) => void) => {
  const page = Buffer.alloc(PAGE_SIZE);
  FaultThread.start(
    m,
    {
      onFault(f, t) {
        page.fill(fillByte(m, f.pageAddress));
        t.resolve(f.pageAddress, page);
      },
      onError: fail,
    },
    { mode },
  );
};

// ---- koffi ----
const libc = koffi.load('libc.so.6');
const poll = libc.func('int poll(void *fds, unsigned long nfds, int timeout)');
const read = libc.func('long read(int fd, void *buf, unsigned long count)');
const ioctl = libc.func('int ioctl(int fd, unsigned long request, ...)');
const UFFDIO_COPY = 0xc028aa03; // _IOWR(0xAA, 3, struct uffdio_copy), from linux/userfaultfd.h
const UFFDIO_WAKE = 0x8010aa02; // _IOR(0xAA, 2, struct uffdio_range)
const UFFD_EVENT_PAGEFAULT = 0x12;
const UFFD_MSG_BYTES = 32;
const POLLIN = 1;
const EEXIST = 17;
const POLL_MS = 100;

/** Serves faults in JS through koffi until the mapping closes. */
function koffiServe(m: UffdMapping, fail: (e: Error) => void): void {
  const pfd = Buffer.alloc(8); // struct pollfd
  pfd.writeInt32LE(m.uffd, 0);
  pfd.writeInt16LE(POLLIN, 4);
  const msgs = Buffer.alloc(16 * UFFD_MSG_BYTES);
  const page = koffi.alloc('uint8_t', PAGE_SIZE); // a stable address for uffdio_copy.src
  const pageBytes = new Uint8Array(koffi.view(page, PAGE_SIZE));
  const copy = Buffer.alloc(40); // struct uffdio_copy {dst, src, len, mode, copy}
  copy.writeBigUInt64LE(koffi.address(page), 8);
  copy.writeBigUInt64LE(BigInt(PAGE_SIZE), 16);
  const range = Buffer.alloc(16); // struct uffdio_range {start, len}
  range.writeBigUInt64LE(BigInt(PAGE_SIZE), 8);
  const drain = () => {
    const n = Number(read(m.uffd, msgs, msgs.length));
    for (let i = 0; i + UFFD_MSG_BYTES <= n; i += UFFD_MSG_BYTES) {
      if (msgs[i] !== UFFD_EVENT_PAGEFAULT) continue;
      const raw = Number(msgs.readBigUInt64LE(i + 16));
      const address = raw - (raw % PAGE_SIZE);
      pageBytes.fill(fillByte(m, address));
      copy.writeBigUInt64LE(BigInt(address), 0);
      if (ioctl(m.uffd, UFFDIO_COPY, 'void *', copy) === 0) continue;
      if (koffi.errno() !== EEXIST) return fail(new Error(`UFFDIO_COPY via koffi failed: errno ${koffi.errno()}`));
      range.writeBigUInt64LE(BigInt(address), 0);
      ioctl(m.uffd, UFFDIO_WAKE, 'void *', range);
    }
  };
  const step = () => {
    if (!m.open) return;
    poll.async(pfd, 1, POLL_MS, (e: unknown, ready: number) => {
      if (!m.open) return;
      if (e) return fail(e as Error);
      if (ready > 0) drain();
      step();
    });
  };
  step();
}

async function runVariant(v: Variant, dir: string, round: number): Promise<number[]> {
  const ram = path.join('/dev/shm', `${path.basename(dir)}-${v}-${round}.ram`);
  const sock = path.join(dir, `${v}-${round}.sock`);
  fs.closeSync(fs.openSync(ram, 'w', 0o600));
  fs.truncateSync(ram, PAGES * PAGE_SIZE);
  try {
    switch (v) {
      case 'c-handler':
        return await timeCHandler(sock, ram, PAGES, { client: (c, a) => pinned('client', c, a), handler: (c, a) => pinned('handler', c, a) });
      case 'addon-loop':
        return await withListener(sock, addonServe('loop'), () => client(ram, shimEnv(ram, sock)));
      case 'addon-thread':
        return await withListener(sock, addonServe('thread'), () => client(ram, shimEnv(ram, sock)));
      case 'koffi':
        return await withListener(sock, koffiServe, () => client(ram, shimEnv(ram, sock)));
      case 'no-uffd':
        return await client(ram, {});
    }
  } finally {
    fs.rmSync(ram, { force: true });
  }
}

function summary(ns: number[]) {
  const s = sortedCopy(ns);
  const us = (x: number) => x / 1000;
  return { faults: ns.length, p50: us(percentile(s, 50)), p90: us(percentile(s, 90)), p99: us(percentile(s, 99)), max: us(s[s.length - 1]) };
}

type Summary = ReturnType<typeof summary>;

/** Every variant, `ROUNDS` times interleaved, at the current placement. */
async function measure(dir: string): Promise<{ stats: Record<Variant, Summary>; p50PerRound: Record<Variant, number[]> }> {
  const all = Object.fromEntries(VARIANTS.map((v) => [v, [] as number[]])) as Record<Variant, number[]>;
  const p50PerRound = Object.fromEntries(VARIANTS.map((v) => [v, [] as number[]])) as Record<Variant, number[]>;
  for (let r = 0; r < ROUNDS; r++) {
    for (const v of VARIANTS) {
      const lat = await runVariant(v, dir, r);
      all[v].push(...lat);
      p50PerRound[v].push(summary(lat).p50);
    }
  }
  return { stats: Object.fromEntries(VARIANTS.map((v) => [v, summary(all[v])])) as Record<Variant, Summary>, p50PerRound };
}

function render(p: Placement, r: Awaited<ReturnType<typeof measure>>): string {
  const cpus = PLACEMENTS[p];
  const where = cpus ? `fault-client on cpu ${cpus.client}, handler on cpu ${cpus.handler}` : 'unpinned';
  const yard = r.stats['c-handler'];
  const f = (x: number) => x.toFixed(1);
  const rows = VARIANTS.map((v) => {
    const s = r.stats[v];
    return [v, s.faults, f(s.p50), f(s.p90), f(s.p99), f(s.max), (s.p50 / yard.p50).toFixed(2), (s.p99 / yard.p99).toFixed(2), r.p50PerRound[v].map(f).join(' ')];
  });
  const header = ['variant', 'faults', 'p50 µs', 'p90 µs', 'p99 µs', 'max µs', 'p50 ÷ c-handler', 'p99 ÷ c-handler', 'p50 per round µs'];
  return `placement ${p} (${where}):\n${table(header, rows)}\n`;
}

async function main(): Promise<void> {
  const placements = values.placement.split(',') as Placement[];
  for (const p of placements) if (!(p in PLACEMENTS)) throw new Error(`unknown placement "${p}"; use same, split or free`);
  if (os.cpus().length < 2 && placements.includes('split')) throw new Error('placement "split" needs two cpus');
  execFileSync('make', ['-s', '-C', path.join(ROOT, 'native')], { stdio: ['ignore', 'ignore', 'inherit'] });
  const load = os.loadavg()[0];
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'lethe-uffd-bench-'));
  const results: Partial<Record<Placement, Awaited<ReturnType<typeof measure>>>> = {};
  try {
    for (const p of placements) {
      place(p);
      results[p] = await measure(dir);
    }
  } finally {
    place('free');
    fs.rmSync(dir, { recursive: true, force: true });
  }
  const env = { node: process.version, kernel: os.release(), cpus: os.cpus().length, loadAverageAtStart: load, pages: PAGES, rounds: ROUNDS };
  if (values.json) {
    console.log(JSON.stringify({ env, results }));
    return;
  }
  console.log(
    `uffd fault service: node ${process.version}, kernel ${os.release()}, ${os.cpus().length} cpus, ` +
      `load average ${load.toFixed(2)} at start, ${ROUNDS} rounds × ${PAGES} first touches per variant\n`,
  );
  for (const p of placements) console.log(render(p, results[p]!));
}

await main();
