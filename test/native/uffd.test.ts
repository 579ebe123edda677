// The memory path's native layer against real processes: fault-client stands in for
// QEMU with the shim preloaded; the addon's fault thread serves it from this process,
// or from a child process (native/test/fault-server.ts) when a test kills the server.
import { expect } from 'chai';
import { execFileSync, spawnSync } from 'node:child_process';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { setTimeout as sleep } from 'node:timers/promises';
import { QEMU_BINARY, guestCmdline, qemuArgs } from '../../agent/vm/qemu.js';
import { QmpClient } from '../../agent/vm/qmp.js';
import { errorChain, LetheError } from '../../common/errors.js';
import {
  BUILD_DIR, FaultThread, HELLO_MAGIC, PAGE_SIZE, UffdListener, memzero, mlock, munlock, parseHello, punchHole, shimEnv,
  type Fault, type FaultMode, type UffdMapping,
} from '../../native/index.js';
import { ZERO_PAGE_FNV, fnv32, isZeroPage, pageContent, pageFnv } from '../../native/test/fault-server.js';
import { ROOT } from '../helpers/proc.js';
import { expectSameBytes } from '../helpers/bytes.js';
import { Lines } from '../helpers/lines.js';
import { buildGuest } from '../../guest-driver/build.js';

const CLIENT = path.join(BUILD_DIR, 'fault-client');
const FAULT_SERVER = path.join(ROOT, 'native', 'test', 'fault-server.ts');
const TMPFS_MAGIC = 0x01021994;
const MODES: FaultMode[] = ['loop', 'thread'];
const KILLED_LINE = "lethe-uffd-shim: the agent's socket closed (end of file); killing this process so the guest never runs on zero-filled pages";
const MiB = 1024 * 1024;
const range = (a: number, b: number) => Array.from({ length: b - a }, (_, i) => a + i);
const hex8 = (n: number) => n.toString(16).padStart(8, '0');

/** fault-client mapping `pages` pages of `ram` from page `offset`. */
function client(ram: string, pages: number, env: Record<string, string>, extra: string[] = []): Lines {
  return new Lines(CLIENT, [ram, String(pages), ...extra], env);
}

/** Touches pages [a,b) of the client's mapping; their fnvs and the running checksum. */
async function touch(c: Lines, a: number, b: number): Promise<{ sums: number[]; checksum: number }> {
  c.send(`touch ${a} ${b}`);
  const sums: number[] = [];
  for (let i = a; i < b; i++) sums.push(parseInt((await c.next(new RegExp(`^page ${i} ([0-9a-f]{8})$`)))[1], 16));
  return { sums, checksum: parseInt((await c.next(/^checksum ([0-9a-f]{8})$/))[1], 16) };
}

/** The checksum fault-client prints for file pages [a,b) in generation gen(page). */
function expectedChecksum(pages: number[], gen: (p: number) => number): number {
  return pages.reduce((h, p) => fnv32(pageContent(p, gen(p)) ?? new Uint8Array(PAGE_SIZE), h), 0x811c9dc5);
}

/** Bytes the RAM file holds in memory (tmpfs counts allocated pages in st_blocks). */
function allocated(file: string): number {
  return fs.statSync(file).blocks * 512;
}

const firstGen = (f: Fault) => pageContent(f.offset / PAGE_SIZE, 1);

/** An in-process fault server for one mapping, answering each fault with content(fault). */
async function serve(socketPath: string, content: (f: Fault) => Buffer | null = firstGen, mode?: FaultMode) {
  const faults: Fault[] = [];
  const errors: Error[] = [];
  let mapped!: (v: { mapping: UffdMapping; thread: FaultThread }) => void;
  const ready = new Promise<{ mapping: UffdMapping; thread: FaultThread }>((r) => (mapped = r));
  const listener = await UffdListener.listen(
    socketPath,
    (mapping) => {
      const thread = FaultThread.start(
        mapping,
        {
          onFault(f, t) {
            faults.push(f);
            t.resolve(f.pageAddress, content(f));
          },
          onError: (e) => errors.push(e),
        },
        { mode },
      );
      mapped({ mapping, thread });
    },
    (e) => errors.push(e),
  );
  return { listener, faults, errors, ready };
}

describe('native memory path (userfaultfd)', function () {
  let dir: string;
  let ram: string;
  let sock: string;
  const cleanup: (() => unknown)[] = [];

  before(function () {
    this.timeout(120_000);
    execFileSync('make', ['-s', '-C', path.join(ROOT, 'native')], { stdio: ['ignore', 'ignore', 'inherit'] });
  });

  beforeEach(() => {
    dir = fs.mkdtempSync(path.join(os.tmpdir(), 'lethe-uffd-'));
    sock = path.join(dir, 'uffd.sock');
    ram = path.join('/dev/shm', `${path.basename(dir)}.ram`);
  });

  afterEach(async () => {
    for (const f of cleanup.splice(0).reverse()) await f();
    fs.rmSync(dir, { recursive: true, force: true });
    fs.rmSync(ram, { force: true });
  });

  function ramFile(pages: number): string {
    fs.closeSync(fs.openSync(ram, 'w', 0o600));
    fs.truncateSync(ram, pages * PAGE_SIZE);
    return ram;
  }

  function track(...things: (Lines | { listener: UffdListener })[]) {
    for (const t of things) cleanup.push(t instanceof Lines ? () => t.kill() : () => t.listener.close());
  }

  /** A fault-client over a fresh RAM file of `pages` pages, mapped and served; both cleaned up after the test. */
  async function servedClient(pages: number) {
    ramFile(pages);
    const s = await serve(sock);
    const c = client(ram, pages, shimEnv(ram, sock));
    track(s, c);
    await c.next(/^mapped /);
    return { s, c, ...(await s.ready) };
  }

  for (const mode of MODES) {
    it(`serves every page the client touches with the content the agent chose, zero pages with UFFDIO_ZEROPAGE (${mode})`, async () => {
      const pages = 16;
      const first = 4; // map from file page 4: offsets are file offsets, not mapping offsets
      ramFile(first + pages + 4);
      const s = await serve(sock, firstGen, mode);
      const c = client(ram, pages, shimEnv(ram, sock), ['--offset', String(first)]);
      track(s, c);
      const base = Number((await c.next(/^mapped (0x[0-9a-f]+)$/))[1]);
      const { mapping, thread } = await s.ready;
      expect(mapping.hello).to.deep.include({ pid: c.proc.pid, pageSize: PAGE_SIZE, base, length: pages * PAGE_SIZE, offset: first * PAGE_SIZE });

      const filePages = range(first, first + pages);
      const { sums, checksum } = await touch(c, 0, pages);
      expect(sums.map(hex8)).to.deep.equal(filePages.map((p) => hex8(pageFnv(p, 1))));
      expect(hex8(checksum)).to.equal(hex8(expectedChecksum(filePages, () => 1)));
      expect(s.faults.map((f) => f.offset / PAGE_SIZE)).to.have.members(filePages);
      expect(s.faults.map((f) => f.pageAddress)).to.deep.equal(filePages.map((p) => base + (p - first) * PAGE_SIZE));
      expect(s.faults.every((f) => !f.write)).to.equal(true);
      const zeros = filePages.filter(isZeroPage).length;
      expect(thread.stats()).to.deep.equal({ faults: pages, copied: pages - zeros, zeroed: zeros, present: 0 });

      // The guest's writes land in the file, where pread sees them: eviction saves a page that way before punching it.
      c.send('write 0 2 0x5a');
      await c.next(/^wrote 2$/);
      const fd = fs.openSync(ram, 'r');
      cleanup.push(() => fs.closeSync(fd));
      const back = Buffer.alloc(2 * PAGE_SIZE);
      fs.readSync(fd, back, 0, back.length, first * PAGE_SIZE);
      expectSameBytes(back, Buffer.alloc(2 * PAGE_SIZE, 0x5a));
      expect(thread.stats().faults).to.equal(pages); // writes to present pages do not fault

      c.end();
      expect(await c.exited).to.deep.equal({ code: 0, signal: null });
      await mapping.closed; // the client's exit closed the shim's socket
      expect(thread.running).to.equal(false);
      expect(s.errors).to.deep.equal([]);
    });

    it(`faults a page again after punchHole and shows its new content: the eviction mechanism (${mode})`, async () => {
      const pages = 8;
      ramFile(pages);
      const gens = new Map<number, number>();
      const s = await serve(sock, (f) => pageContent(f.offset / PAGE_SIZE, gens.get(f.offset / PAGE_SIZE) ?? 1), mode);
      const c = client(ram, pages, shimEnv(ram, sock));
      track(s, c);
      await c.next(/^mapped /);
      const { thread } = await s.ready;
      expect((await touch(c, 0, pages)).sums.map(hex8)).to.deep.equal(range(0, pages).map((p) => hex8(pageFnv(p, 1))));
      expect(allocated(ram)).to.equal(pages * PAGE_SIZE);

      const evicted = [2, 5, 7]; // 7 is a zero page: it comes back through UFFDIO_ZEROPAGE
      const fd = fs.openSync(ram, 'r+');
      cleanup.push(() => fs.closeSync(fd));
      for (const p of evicted) {
        punchHole(fd, p * PAGE_SIZE, PAGE_SIZE);
        gens.set(p, 2);
      }
      expect(allocated(ram)).to.equal((pages - evicted.length) * PAGE_SIZE);

      const before = s.faults.length;
      const { sums, checksum } = await touch(c, 0, pages);
      expect(sums.map(hex8)).to.deep.equal(range(0, pages).map((p) => hex8(pageFnv(p, gens.get(p) ?? 1))));
      expect(hex8(checksum)).to.equal(hex8(expectedChecksum(range(0, pages), (p) => gens.get(p) ?? 1)));
      expect(s.faults.slice(before).map((f) => f.offset / PAGE_SIZE)).to.deep.equal(evicted);
      expect(thread.stats()).to.deep.equal({ faults: pages + 3, copied: 6 + 2, zeroed: 2 + 1, present: 0 });
      expect(s.errors).to.deep.equal([]);
    });
  }

  it('a fault taken but never answered comes again after a wake of the range: how the agent recovers a lost one; each names its thread', async () => {
    const pages = 4;
    ramFile(pages);
    const faults: number[] = [];
    const threads: number[] = [];
    const errors: Error[] = [];
    let mapped!: (v: { mapping: UffdMapping; thread: FaultThread }) => void;
    const ready = new Promise<{ mapping: UffdMapping; thread: FaultThread }>((r) => (mapped = r));
    const listener = await UffdListener.listen(sock, (mapping) => {
      const thread = FaultThread.start(mapping, {
        onFault(f, t) {
          // The first fault is dropped, as a lost one would be; later ones are answered.
          faults.push(f.offset / PAGE_SIZE);
          threads.push(f.thread);
          if (faults.length > 1) t.resolve(f.pageAddress, pageContent(f.offset / PAGE_SIZE, 1));
        },
      });
      mapped({ mapping, thread });
    }, (e) => errors.push(e));
    const c = client(ram, pages, shimEnv(ram, sock));
    track({ listener }, c);
    await c.next(/^mapped /);
    const { mapping, thread } = await ready;
    const touched = touch(c, 2, 3);
    while (faults.length === 0) await new Promise((r) => setTimeout(r, 10));
    expect(faults).to.deep.equal([2]);
    thread.wake(mapping.hello.base, mapping.hello.length);
    expect((await touched).sums.map(hex8)).to.deep.equal([hex8(pageFnv(2, 1))]);
    expect(faults, 'the woken thread faulted again').to.deep.equal([2, 2]);
    expect(threads, "the client's one thread (its pid)").to.deep.equal([c.proc.pid, c.proc.pid]);
    expect(errors).to.deep.equal([]);
  });

  it('installs a page resolved before it is touched without a fault (prefetch), and reports a present page', async () => {
    const pages = 4;
    const { s, c, thread } = await servedClient(pages);
    expect(thread.resolveOffset(1 * PAGE_SIZE, pageContent(1, 1))).to.equal('copied');
    expect(thread.resolveOffset(1 * PAGE_SIZE, pageContent(1, 2))).to.equal('present');
    expect((await touch(c, 1, 2)).sums.map(hex8)).to.deep.equal([hex8(pageFnv(1, 1))]);
    expect(s.faults).to.deep.equal([]);
    expect(thread.stats()).to.deep.equal({ faults: 0, copied: 1, zeroed: 0, present: 1 });
  });

  describe('fail closed (DESIGN.md invariant 7)', () => {
    async function startServer(hold?: number, mode: FaultMode = 'loop'): Promise<Lines> {
      const server = new Lines(process.execPath, ['--import', 'tsx', FAULT_SERVER, sock, '--mode', mode, ...(hold === undefined ? [] : ['--hold', String(hold)])]);
      track(server);
      await server.next(/^listening$/, 30_000);
      return server;
    }

    for (const mode of MODES) {
      it(`kills the client when the fault server dies while the client waits on a fault, and no zero page appears (${mode})`, async () => {
        const pages = 8;
        ramFile(pages);
        const server = await startServer(3, mode);
        const c = client(ram, pages, shimEnv(ram, sock));
        track(c);
        await c.next(/^mapped /);
        c.send(`touch 0 ${pages}`);
        await server.next(/^holding 3$/);
        await sleep(200);
        expect(c.proc.exitCode, 'the client waits on page 3').to.equal(null);

        server.kill();
        const status = await Promise.race([c.exited, sleep(5_000).then(() => 'still running')]);
        expect(status).to.deep.equal({ code: null, signal: 'SIGKILL' });
        expect(c.stderr.trim().split('\n')).to.deep.equal([KILLED_LINE]);
        expect(c.lines.filter((l) => l.startsWith('page '))).to.deep.equal([0, 1, 2].map((p) => `page ${p} ${hex8(pageFnv(p, 1))}`));
        expect(c.lines.some((l) => l.startsWith('checksum'))).to.equal(false);
        expect(c.lines.some((l) => l.endsWith(` ${hex8(ZERO_PAGE_FNV)}`))).to.equal(false);
        expect(allocated(ram), 'page 3 was never filled in the RAM file').to.equal(3 * PAGE_SIZE);
      });
    }

    for (const mode of MODES) {
      it(`reports a fault the agent cannot serve and leaves the client waiting, never on a zero page (${mode})`, async () => {
        ramFile(4);
        const errors: Error[] = [];
        const listener = await UffdListener.listen(
          sock,
          (m) =>
            FaultThread.start(
              m,
              {
                async onFault(f, t) {
                  await sleep(2); // as readInto does: the answer comes later
                  if (f.offset === 2 * PAGE_SIZE) throw new LetheError('TAMPERED', 'mem chunk 2 failed authentication; refused');
                  t.resolve(f.pageAddress, pageContent(f.offset / PAGE_SIZE, 1));
                },
                onError: (e) => errors.push(e),
              },
              { mode },
            ),
          (e) => errors.push(e),
        );
        const c = client(ram, 4, shimEnv(ram, sock));
        track({ listener }, c);
        await c.next(/^mapped /);
        c.send('touch 0 4');
        await c.next(/^page 1 /);
        while (errors.length === 0) await sleep(10);
        expect(errors.map(errorChain)).to.deep.equal(['cannot handle the read fault at file offset 8192: mem chunk 2 failed authentication; refused']);
        await sleep(200);
        expect(c.proc.exitCode, 'the client still waits on page 2').to.equal(null);
        expect(c.lines.some((l) => l.startsWith('page 2 '))).to.equal(false);
        await listener.close();
        expect(await c.exited).to.deep.equal({ code: null, signal: 'SIGKILL' });
      });
    }

    it('kills an idle client as soon as the fault server dies', async () => {
      ramFile(4);
      const server = await startServer();
      const c = client(ram, 4, shimEnv(ram, sock));
      track(c);
      await c.next(/^mapped /);
      expect((await touch(c, 0, 2)).sums.map(hex8)).to.deep.equal([0, 1].map((p) => hex8(pageFnv(p, 1))));
      server.kill();
      const status = await Promise.race([c.exited, sleep(5_000).then(() => 'still running')]);
      expect(status).to.deep.equal({ code: null, signal: 'SIGKILL' });
      expect(c.stderr.trim().split('\n')).to.deep.equal([KILLED_LINE]);
    });

    it('kills the client when the agent closes the mapping', async () => {
      const { c, mapping, thread } = await servedClient(4);
      mapping.close();
      expect(thread.running).to.equal(false);
      expect(await c.exited).to.deep.equal({ code: null, signal: 'SIGKILL' });
      expect(() => thread.resolve(mapping.hello.base, null)).to.throw(Error, `resolve: the mapping at 0x${mapping.hello.base.toString(16)} is closed (its QEMU is gone)`);
    });
  });

  describe('under QEMU', () => {
    const VERIFY = /^LETHE-VERIFY pass=(\d+) ok=(\d+) bad=(\d+)/;

    it('boots the test guest with every RAM page served by the agent, survives the eviction of all of it, and dies with the agent', async function () {
      this.timeout(120_000);
      // scripts/setup installs QEMU: on CI its absence is a failure, elsewhere a skip.
      if (spawnSync(QEMU_BINARY, ['--version']).status !== 0) {
        if (process.env.CI) throw new Error(`${QEMU_BINARY} cannot run: scripts/setup installs it`);
        this.skip();
      }
      // The test guest, built once (the e2e suites share the build).
      const { vmlinux: kernel, initramfs: initrd } = await buildGuest();
      const memBytes = 128 * MiB;
      ramFile(memBytes / PAGE_SIZE);
      // A fresh boot expects zeroed RAM; after the eviction the agent serves what it saved.
      const saved = new Map<number, Buffer>();
      let restoring = false;
      const s = await serve(sock, (f) => (restoring ? (saved.get(f.offset) ?? null) : null));
      const qmpSocket = path.join(dir, 'qmp.sock');
      const args = qemuArgs({ kernel, initrd, append: guestCmdline({ mib: 4, intervalMs: 200 }), memBytes, memPath: ram, accel: 'tcg', qmpSocket });
      const q = new Lines(QEMU_BINARY, args, shimEnv(ram, sock));
      track(s, q);
      expect((await q.next(VERIFY, 60_000)).slice(2)).to.deep.equal(['1024', '0']);
      const { mapping, thread } = await s.ready;
      const booted = thread.stats();
      expect(booted.faults).to.be.greaterThan(1000);
      expect(booted).to.deep.include({ zeroed: booted.faults, copied: 0 });

      const qmp = await QmpClient.connect(qmpSocket);
      cleanup.push(() => qmp.close());
      await qmp.execute('stop');
      await sleep(300); // console lines from before the stop reach us first
      const fd = fs.openSync(ram, 'r+');
      cleanup.push(() => fs.closeSync(fd));
      for (const offset of new Set(s.faults.map((f) => f.offset))) {
        const page = Buffer.alloc(PAGE_SIZE);
        fs.readSync(fd, page, 0, PAGE_SIZE, offset); // pread: never through a mapping, so no fault
        if (page.some((b) => b !== 0)) saved.set(offset, page);
      }
      punchHole(fd, 0, memBytes);
      expect(allocated(ram)).to.equal(0);
      const lastPass = Math.max(...q.lines.map((l) => Number(VERIFY.exec(l)?.[1] ?? 0)));
      restoring = true;
      await qmp.execute('cont');
      let m: RegExpExecArray;
      do m = await q.next(VERIFY, 60_000);
      while (Number(m[1]) <= lastPass);
      expect(m.slice(2), 'the guest verifies every page after the eviction').to.deep.equal(['1024', '0']);
      const restored = thread.stats();
      expect(restored.copied).to.be.greaterThan(1000);
      expect(s.errors).to.deep.equal([]);

      mapping.close();
      expect(await q.exited).to.deep.include({ signal: 'SIGKILL' });
      expect(q.stderr).to.include(KILLED_LINE);
    });
  });

  describe('the shim refuses to run unserved', () => {
    async function aborted(c: Lines): Promise<string[]> {
      expect(await c.exited).to.deep.equal({ code: null, signal: 'SIGABRT' });
      return c.stderr.trim().split('\n');
    }

    it('aborts when no agent listens on LETHE_UFFD_SOCKET', async () => {
      ramFile(4);
      const c = client(ram, 4, shimEnv(ram, sock));
      track(c);
      expect(await aborted(c)).to.deep.equal([`lethe-uffd-shim: cannot connect to the agent at '${sock}': No such file or directory`]);
    });

    it('aborts when the RAM file is mapped private', async () => {
      ramFile(4);
      const c = client(ram, 4, shimEnv(ram, sock), ['--private']);
      track(c);
      expect(await aborted(c)).to.deep.equal([
        `lethe-uffd-shim: '${ram}' is mapped private (flags 0x2); its pages would never reach the agent (hint: memory-backend-file needs share=on)`,
      ]);
    });

    it('aborts when the RAM file is not shared memory', async function () {
      const file = path.join(dir, 'ram.bin');
      if (fs.statfsSync(dir).type === TMPFS_MAGIC) this.skip(); // this needs a disk-backed file
      fs.writeFileSync(file, Buffer.alloc(4 * PAGE_SIZE));
      const s = await serve(sock);
      const c = client(file, 4, shimEnv(file, sock));
      track(s, c);
      const [line, ...rest] = await aborted(c);
      expect(line).to.match(/^lethe-uffd-shim: UFFDIO_REGISTER of 16384 bytes at 0x[0-9a-f]+ failed: Invalid argument \(is '.*ram\.bin' on tmpfs or a memfd\?\)$/);
      expect(rest).to.deep.equal([]);
    });

    it('aborts when LETHE_UFFD_SOCKET is missing', async () => {
      ramFile(4);
      const c = client(ram, 4, { LD_PRELOAD: shimEnv(ram, sock).LD_PRELOAD, LETHE_RAM_PATH: ram });
      track(c);
      expect(await aborted(c)).to.deep.equal(['lethe-uffd-shim: LETHE_RAM_PATH is set but LETHE_UFFD_SOCKET is not']);
    });

    it('does nothing without LETHE_RAM_PATH (QEMU helper processes inherit LD_PRELOAD)', async () => {
      ramFile(2);
      const c = client(ram, 2, { LD_PRELOAD: shimEnv(ram, sock).LD_PRELOAD });
      track(c);
      expect((await touch(c, 0, 1)).sums).to.deep.equal([ZERO_PAGE_FNV]);
      c.end();
      expect(await c.exited).to.deep.equal({ code: 0, signal: null });
    });
  });

  describe('argument checks', () => {
    it('punchHole names the bad argument and its value', () => {
      const fd = fs.openSync(ramFile(2), 'r+');
      cleanup.push(() => fs.closeSync(fd));
      expect(() => punchHole(-1, 0, PAGE_SIZE)).to.throw(TypeError, 'punchHole: fd must be a file descriptor, a non-negative integer (got -1)');
      expect(() => punchHole('3' as unknown as number, 0, PAGE_SIZE)).to.throw(TypeError, 'punchHole: fd must be a file descriptor, a non-negative integer (got "3")');
      expect(() => punchHole(fd, 100, PAGE_SIZE)).to.throw(RangeError, 'punchHole: offset must be a multiple of 4096 (got 100)');
      expect(() => punchHole(fd, -PAGE_SIZE, PAGE_SIZE)).to.throw(RangeError, 'punchHole: offset must be an integer ≥ 0 (got -4096)');
      expect(() => punchHole(fd, 0, 0)).to.throw(RangeError, 'punchHole: length must be an integer ≥ 4096 (got 0)');
      expect(() => punchHole(fd, 0, 6000)).to.throw(RangeError, 'punchHole: length must be a multiple of 4096 (got 6000)');
      expect(() => punchHole(fd, 0, null as unknown as number)).to.throw(TypeError, 'punchHole: length must be a number (got null)');
    });

    it("punchHole reports fallocate's errno with context", () => {
      const fd = fs.openSync(ramFile(2), 'r');
      try {
        punchHole(fd, 0, PAGE_SIZE);
        expect.fail('punchHole on a read-only fd succeeded');
      } catch (e) {
        expect(e).to.be.instanceOf(LetheError);
        expect(errorChain(e)).to.equal(`cannot punch a hole of 4096 bytes at offset 0 of fd ${fd}: fallocate: Bad file descriptor`);
        expect((e as LetheError).cause).to.include({ code: 'EBADF', syscall: 'fallocate', errno: 9 });
      } finally {
        fs.closeSync(fd);
      }
    });

    it('mlock, munlock and memzero take only buffers and typed arrays', () => {
      expect(() => memzero('secret' as unknown as Buffer)).to.throw(TypeError, 'memzero: bytes must be a Buffer or typed array (got "secret")');
      expect(() => mlock(123 as unknown as Buffer)).to.throw(TypeError, 'mlock: bytes must be a Buffer or typed array (got 123)');
      expect(() => munlock({} as unknown as Buffer)).to.throw(TypeError, 'munlock: bytes must be a Buffer or typed array (got Object)');
      expect(() => memzero(new ArrayBuffer(8) as unknown as Buffer)).to.throw(TypeError, 'memzero: bytes must be a Buffer or typed array (got ArrayBuffer)');
    });

    it('memzero zeroes exactly the bytes of a view; mlock and munlock lock and unlock them', () => {
      const b = Buffer.alloc(32, 0xaa);
      memzero(b.subarray(8, 16));
      expect([...b]).to.deep.equal([...Array(8).fill(0xaa), ...Array(8).fill(0), ...Array(16).fill(0xaa)]);
      const f = new Float64Array([1.5, 2.5]);
      memzero(f);
      expect([...f]).to.deep.equal([0, 0]);

      const lockedKb = () => Number(/VmLck:\s+(\d+) kB/.exec(fs.readFileSync('/proc/self/status', 'utf8'))![1]);
      const big = Buffer.alloc(64 * 1024);
      const before = lockedKb();
      mlock(big);
      expect(lockedKb() - before).to.be.at.least(64);
      munlock(big);
      expect(lockedKb()).to.equal(before);
    });

    it('FaultThread.resolve checks the address and the data', async () => {
      const { mapping, thread } = await servedClient(4);
      const base = mapping.hello.base;
      const span = `0x${base.toString(16)}..0x${(base + 4 * PAGE_SIZE).toString(16)}`;
      expect(() => thread.resolve(base + 1, null)).to.throw(RangeError, `resolve: address 0x${(base + 1).toString(16)} is not page-aligned`);
      expect(() => thread.resolve(base - PAGE_SIZE, null)).to.throw(RangeError, `resolve: address 0x${(base - PAGE_SIZE).toString(16)} is outside the mapping ${span}`);
      expect(() => thread.resolve(base + 4 * PAGE_SIZE, null)).to.throw(RangeError, 'is outside the mapping');
      expect(() => thread.resolve(base, Buffer.alloc(100))).to.throw(RangeError, 'resolve: data must be 4096 bytes (got 100)');
      expect(() => thread.resolve(base, 'page' as unknown as Buffer)).to.throw(TypeError, 'resolve: data must be a Buffer or typed array (got "page")');
      expect(() => thread.resolveOffset(9 * PAGE_SIZE, null)).to.throw(RangeError, 'addressOf: file offset 36864 is outside the mapping (offsets 0..16384)');
      expect(() => thread.wake(base, 100)).to.throw(RangeError, 'wake: length must be an integer ≥ 4096 (got 100)');
      expect(() => FaultThread.start(mapping, { onFault() {} })).to.throw(Error, `FaultThread.start: a fault thread already serves the mapping at 0x${base.toString(16)}`);
      expect(thread.stats().faults).to.equal(0);
    });

    it('parseHello names the bad field', () => {
      const good = Buffer.alloc(48);
      good.writeUInt32LE(HELLO_MAGIC, 0);
      good.writeUInt16LE(1, 4);
      good.writeUInt16LE(48, 6);
      good.writeUInt32LE(1234, 8);
      good.writeUInt32LE(PAGE_SIZE, 12);
      good.writeBigUInt64LE(0x7f0000000000n, 16);
      good.writeBigUInt64LE(1n << 20n, 24);
      good.writeBigUInt64LE(0n, 32);
      good.writeBigUInt64LE(0x1cn, 40);
      expect(parseHello(good)).to.deep.equal({ pid: 1234, pageSize: PAGE_SIZE, base: 0x7f0000000000, length: 1 << 20, offset: 0, ioctls: 0x1cn });
      const bad = (edit: (b: Buffer) => void) => {
        const b = Buffer.from(good);
        edit(b);
        return () => parseHello(b);
      };
      const prefix = 'bad uffd hello from the shim: ';
      expect(() => parseHello(good.subarray(0, 47))).to.throw(LetheError, `${prefix}47 bytes, expected 48`);
      expect(bad((b) => b.writeUInt32LE(0x12345678, 0))).to.throw(LetheError, `${prefix}magic 0x12345678, expected 0x4446554c`);
      expect(bad((b) => b.writeUInt16LE(2, 4))).to.throw(LetheError, `${prefix}version 2, this agent speaks 1`);
      expect(bad((b) => b.writeUInt32LE(65536, 12))).to.throw(LetheError, `${prefix}page size 65536, expected 4096`);
      expect(bad((b) => b.writeBigUInt64LE(0x7f0000000100n, 16))).to.throw(LetheError, `${prefix}base 0x7f0000000100 is not page-aligned`);
      expect(bad((b) => b.writeBigUInt64LE(0n, 24))).to.throw(LetheError, `${prefix}length 0`);
      expect(bad((b) => b.writeBigUInt64LE(0x8n, 40))).to.throw(LetheError, `${prefix}ioctls 0x8 lack COPY, ZEROPAGE or WAKE`);
    });
  });
});
