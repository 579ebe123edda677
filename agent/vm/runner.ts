// Post-copy resume of an image's VM: QEMU starts with `-incoming defer` and its
// RAM in a fresh, empty tmpfs file that the preloaded shim registers with
// userfaultfd; the device state (a few hundred KiB) streams in through a FIFO,
// and every guest page arrives on first touch, decrypted by the agent core
// from the ciphertext cache or the server. The FIFO and the empty RAM file hold
// no plaintext at rest; pages the guest touched live in the RAM file (tmpfs)
// until they are punched out.
import { execFileSync } from 'node:child_process';
import { randomBytes } from 'node:crypto';
import fs from 'node:fs';
import net from 'node:net';
import path from 'node:path';
import { FAULT_PAGE_BUFFERS, MEM_CHUNK_SIZE, STATE_CHUNK_SIZE } from '../../common/constants.js';
import { secureBuffer, wipe } from '../../common/crypto.js';
import { LetheError, errorChain } from '../../common/errors.js';
import { UffdListener, shimEnv, type UffdMapping } from '../../native/index.js';
import type { AgentCore } from '../chunks/core.js';
import { AccessTrace } from '../memory/access-trace.js';
import { FaultService } from '../memory/fault-service.js';
import { BufferPool } from '../chunks/buffer-pool.js';
import { Evictor, type EvictTarget } from '../memory/evictor.js';
import { VcpuHolds } from '../memory/vcpu-holds.js';
import { HintChannel, type HintPolicy, type HintReport } from './hints.js';
import type { ManagerPolicy } from '../../policies/manager.js';
import { Vm, qemuUser, type Accel, type QemuUser } from './qemu.js';

export interface ResumeOptions {
  runDir: string;
  kernel: string;
  initrd: string;
  append: string;
  accel: Accel;
  nbd?: { socket: string; export: string };
  log: (line: string) => void;
  /** Where the RAM file goes (tmpfs); default /dev/shm. */
  shmDir?: string;
  /** What the evictor decides by (the lease's policy). */
  policy: ManagerPolicy;
  /** What the guest driver reports (the lease's policy). */
  hints: HintPolicy;
  /** Ask the guest driver to drop the page cache of sensitive files after a pass that evicted. */
  dropGuestCache: boolean;
  /** Records every fault and guest report to this file (JSON lines, docs/policy-simulate.md). */
  traceFile?: string;
  /** Error messages may quote the guest console (off by default: it can carry guest plaintext into logs). */
  showConsole?: boolean;
  /**
   * Pages (the startup buffer, cached) installed ahead before the guest runs:
   * installAhead(). Batches fed as they arrive let the buffer come over the network
   * while QEMU starts and pages go in; the guest runs after the last (a feed that
   * throws fails the resume).
   */
  installFirst?: readonly number[] | AsyncIterable<readonly number[]>;
}

const HANDSHAKE_MS = 15_000;
const MIGRATION_MS = 60_000;

export class AgentVm implements EvictTarget {
  readonly pages: number;
  readonly evictor: Evictor;
  /** Serves the guest's page faults (memory/fault-service.ts). */
  readonly faulting: FaultService;
  private readonly runDir: string;
  private readonly log: (line: string) => void;
  private readonly vcpus: VcpuHolds;
  readonly hints: HintChannel;
  private trace?: AccessTrace;
  private lastDrop = 0;

  private constructor(
    readonly vm: Vm,
    readonly ramPath: string,
    /** The RAM file, unlinked: for punching evicted pages out. */
    readonly ramFd: number,
    private readonly listener: UffdListener,
    private readonly pool: BufferPool,
    core: AgentCore,
    o: ResumeOptions,
    memBytes: number,
  ) {
    this.log = o.log;
    this.vcpus = new VcpuHolds({
      execute: (cmd) => vm.qmp.execute(cmd),
      faultInFlight: () => this.faulting.vcpuBlocked(),
      exited: () => Boolean(vm.exitStatus),
      // A vCPU that does not stop while no fault is served may wait on a fault the agent
      // has no record of: woken, it faults again and that fault is served.
      stopSlow: (ms, reasons) => {
        const woke = this.faulting.wakeAll();
        this.log(
          `the guest's vCPUs have not stopped after ${Math.round(ms / 1000)} s (held for ${reasons.join(', ')}) with no vCPU fault being served` +
            (woke ? '; woke every thread waiting on guest RAM' : ''),
        );
      },
    });
    this.runDir = o.runDir;
    this.pages = memBytes / MEM_CHUNK_SIZE;
    this.evictor = new Evictor(core, this, o.policy, o.log);
    this.faulting = new FaultService(core, pool, this.evictor, this.pages, o.log, (page) => this.trace?.fault(page));
    this.dropGuestCache = o.dropGuestCache;
    this.hints = new HintChannel(path.join(o.runDir, 'hint.sock'), o.hints, o.log);
    this.hints.on('report', (r: HintReport) => {
      this.lastReport = { seq: r.seq, sensitiveFrames: r.sensitiveFrames, freeFrames: r.freeFrames, procs: r.procs };
      this.evictor.hintReport(r);
      this.trace?.hint(r);
    });
    this.evictor.onPass = (r) => this.afterPass(r.evicted);
    if (o.traceFile) this.trace = new AccessTrace(o.traceFile, this.pages);
  }

  dropGuestCache: boolean;
  private lastReport?: { seq: number; sensitiveFrames: number; freeFrames: number; procs: number };

  /** The guest driver's last report, in counts. */
  lastHintReport() {
    return this.lastReport ?? null;
  }

  /** Call when the lease brings a policy. */
  setPolicy(p: ManagerPolicy, hints: HintPolicy, dropGuestCache: boolean): void {
    this.evictor.setPolicy(p);
    this.hints.setPolicy(hints);
    this.dropGuestCache = dropGuestCache;
  }

  /** After a pass that evicted, the guest drops its own cached copies of sensitive files (at most once an idle period). */
  private afterPass(evicted: number): void {
    const now = Date.now();
    if (evicted === 0 || !this.dropGuestCache || this.hints.currentPolicy.files.length === 0 || !this.hints.connected) return;
    if (now - this.lastDrop < this.evictor.idleMs) return;
    this.lastDrop = now;
    this.hints.dropCache().catch((e) => this.log(`guest page cache not dropped: ${errorChain(e)}`));
  }

  get faults(): number {
    return this.faulting.faults;
  }

  get zeroFaults(): number {
    return this.faulting.zeroFaults;
  }

  get faultRetries(): number {
    return this.faulting.faultRetries;
  }

  get faultWait(): { ms: number; server: number; serverMs: number } {
    return this.faulting.faultWait;
  }

  /** Re-faults of sensitive pages: how many, and p50/p99 of their wait (ms) lately. */
  sensitiveRefaults() {
    return this.faulting.sensitiveRefaults.summary();
  }

  get installedAhead(): number {
    return this.faulting.installedAhead;
  }

  get firstTouchCount(): number {
    return this.faulting.firstTouchCount;
  }

  /** The pages the guest touched this session, first touch first. */
  firstTouchOrder(): Uint32Array {
    return this.faulting.firstTouchOrder();
  }

  /** When each first touch came, in the guest's own time (FaultService.guestMs); guestMs(): now. */
  firstTouchTimes(): Uint32Array {
    return this.faulting.firstTouchTimes();
  }

  guestMs(): number {
    return this.faulting.guestMs();
  }

  /** Install-ahead of pages whose ciphertext is cached (memory/fault-service.ts). */
  installAhead(pages: Iterable<number>): Promise<number> {
    return this.faulting.installAhead(pages);
  }

  faultInFlight(page: number): boolean {
    return this.faulting.faultInFlight(page);
  }

  /**
   * Keeps the vCPUs stopped until the returned function is called. Holds nest (the
   * lease, an eviction pass, a suspend): the guest runs again when the last goes.
   */
  hold(reason: string): Promise<() => Promise<void>> {
    return this.vcpus.hold(reason);
  }

  /**
   * Saves the device state (CPU and devices, not RAM: x-ignore-shared) into locked
   * memory through a unix socket. Call with the guest held; QEMU is left in
   * 'postmigrate' and must not run again (its pages now belong to the new version).
   */
  async saveState(): Promise<Buffer> {
    const sockPath = path.join(this.runDir, 'state-out.sock');
    const parts: Buffer[] = [];
    let total = 0;
    const server = net.createServer();
    const received = new Promise<void>((resolve, reject) => {
      server.once('connection', (c) => {
        c.on('data', (d: Buffer) => {
          parts.push(d);
          total += d.length;
        });
        c.once('end', () => resolve());
        c.once('error', reject);
      });
    });
    received.catch(() => {}); // awaited below unless the migration fails first
    await new Promise<void>((resolve, reject) => server.listen(sockPath, resolve).once('error', reject));
    const runAs = qemuUser();
    if (runAs) fs.chownSync(sockPath, runAs.uid, runAs.gid);
    try {
      await this.vm.saveState(`unix:${sockPath}`, MIGRATION_MS);
      await withTimeout(received, 5_000, 'the device state did not arrive');
      const out = secureBuffer(total);
      let at = 0;
      for (const p of parts) {
        p.copy(out, at);
        at += p.length;
      }
      return out;
    } finally {
      // The device state is plaintext: what came over the socket is zeroed whatever happened.
      for (const p of parts) p.fill(0);
      server.close();
      fs.rmSync(sockPath, { force: true });
    }
  }

  /** Waits until QEMU reports the vCPUs stopped (a hold returns before when a fault is in flight: VcpuHolds). */
  async whenStopped(timeoutMs = 30_000): Promise<void> {
    const t0 = Date.now();
    for (;;) {
      const st = await this.vm.qmp.execute<{ running: boolean }>('query-status');
      if (!st.running) return;
      if (Date.now() - t0 > timeoutMs) throw new LetheError('VM_FAILED', `the guest did not stop within ${timeoutMs / 1000} s`);
      await new Promise((r) => setTimeout(r, 20));
    }
  }

  /** Why the guest is stopped, if it is. */
  heldFor(): string[] {
    return this.vcpus.reasons();
  }

  /** Resumes the lease's image. Throws (and leaves no QEMU running) if any step fails. */
  static async resume(core: AgentCore, o: ResumeOptions): Promise<AgentVm> {
    const memBytes = core.sizeOf('mem');
    if (memBytes === 0) throw new LetheError('BAD_REQUEST', 'this image has no memory to resume', { hint: 'push one with --memory and --state' });
    const ramPath = path.join(o.shmDir ?? '/dev/shm', `lethe-ram-${randomBytes(6).toString('hex')}`);
    fs.writeFileSync(ramPath, '', { mode: 0o600 });
    fs.truncateSync(ramPath, memBytes);
    const sock = path.join(o.runDir, 'uffd.sock');
    // QEMU opens its files and sockets as the agent, then drops to its own user; later it
    // reaches into the run dir only for the state's FIFO and socket, given to that user.
    const runAs = qemuUser();
    if (runAs) fs.chmodSync(o.runDir, 0o711);
    let gotMapping!: (m: UffdMapping) => void;
    const mapping = new Promise<UffdMapping>((r) => (gotMapping = r));
    const listener = await UffdListener.listen(sock, (m) => gotMapping(m), (e) => o.log(`userfaultfd: ${e.message}`));
    let vm: Vm | undefined;
    try {
      vm = await Vm.start(
        {
          kernel: o.kernel,
          initrd: o.initrd,
          append: o.append,
          memBytes,
          memPath: ramPath,
          accel: o.accel,
          qmpSocket: path.join(o.runDir, 'qmp.sock'),
          nbdDisk: o.nbd,
          // The device layout must match the snapshot's: it had the hint port too.
          hintSocket: path.join(o.runDir, 'hint.sock'),
          incomingDefer: true,
          env: shimEnv(ramPath, sock),
          hideConsole: !o.showConsole,
          runAs,
        },
        o.runDir,
      );
      const m = await withTimeout(mapping, HANDSHAKE_MS, 'the shim did not hand over guest RAM');
      if (m.hello.pid !== vm.pid) throw new LetheError('VM_FAILED', `a RAM mapping arrived from pid ${m.hello.pid}, not QEMU's ${vm.pid}`);
      // Once the guest runs, the file leaves /dev/shm (below); our own fd stays for
      // punching holes. Its pages are freed when QEMU and the agent are gone, even
      // after a kill -9 of either, so no guest RAM outlives the session.
      const ramFd = fs.openSync(ramPath, 'r+');
      const pool = new BufferPool(FAULT_PAGE_BUFFERS, MEM_CHUNK_SIZE);
      const self = new AgentVm(vm, ramPath, ramFd, listener, pool, core, o, memBytes);
      self.faulting.start(m);
      // Which threads are vCPUs: their faults, not the main loop's, hold a VM stop back (VcpuHolds).
      await vm.qmp
        .execute<{ 'thread-id'?: number }[]>('query-cpus-fast')
        .then((cpus) => self.faulting.setVcpuThreads(cpus.flatMap((c) => (c['thread-id'] ? [c['thread-id']] : []))))
        .catch((e) => o.log(`vCPU threads unknown (every fault counts as a vCPU's): ${errorChain(e)}`));
      if (o.installFirst && Symbol.asyncIterator in o.installFirst) {
        for await (const batch of o.installFirst) await self.installAhead(batch);
      } else if (o.installFirst?.length) await self.installAhead(o.installFirst);
      await streamState(core, vm, o.runDir, runAs);
      fs.unlinkSync(ramPath);
      self.evictor.start();
      self.hints.start();
      return self;
    } catch (e) {
      if (vm) {
        const status = await Promise.race([vm.exited, new Promise<undefined>((r) => setTimeout(() => r(undefined), 500))]);
        if (status) {
          await listener.close();
          fs.rmSync(ramPath, { force: true });
          throw new LetheError('VM_FAILED', vm.describe('qemu exited while resuming', status), { cause: e });
        }
      }
      await vm?.kill();
      await listener.close();
      fs.rmSync(ramPath, { force: true });
      throw e;
    }
  }

  async stop(): Promise<void> {
    this.faulting.halt();
    this.evictor.stop();
    this.hints.close();
    await this.vm.kill();
    await this.trace?.close();
    this.evictor.destroy();
    this.faulting.stop();
    await this.listener.close();
    this.pool.destroy();
    fs.closeSync(this.ramFd);
  }
}

/** Feeds the device state to QEMU through a FIFO (no plaintext file), waits for it to load, and runs the guest. */
async function streamState(core: AgentCore, vm: Vm, runDir: string, runAs: QemuUser | undefined): Promise<void> {
  const fifo = path.join(runDir, 'state.fifo');
  execFileSync('mkfifo', ['-m', '600', fifo]);
  if (runAs) fs.chownSync(fifo, runAs.uid, runAs.gid);
  await vm.qmp.execute('migrate-set-capabilities', { capabilities: [{ capability: 'x-ignore-shared', state: true }] });
  await vm.qmp.execute('migrate-incoming', { uri: `exec:cat ${fifo}` });
  const size = core.sizeOf('state');
  const fh = await fs.promises.open(fifo, 'w');
  const buf = secureBuffer(STATE_CHUNK_SIZE);
  try {
    for (let i = 0; i * STATE_CHUNK_SIZE < size; i++) {
      const out = buf.subarray(0, Math.min(STATE_CHUNK_SIZE, size - i * STATE_CHUNK_SIZE));
      await core.readInto('state', i, out);
      await fh.write(out);
      wipe(out);
    }
  } finally {
    wipe(buf);
    await fh.close();
    fs.rmSync(fifo, { force: true });
  }
  const t0 = Date.now();
  for (;;) {
    const st = await vm.qmp.execute<{ status: string }>('query-status');
    if (st.status === 'running') return;
    if (st.status === 'paused' || st.status === 'postmigrate' || st.status === 'prelaunch') {
      await vm.qmp.execute('cont');
      return;
    }
    if (Date.now() - t0 > MIGRATION_MS) throw new LetheError('VM_FAILED', `the device state did not load (QEMU status '${st.status}')`);
    await new Promise((r) => setTimeout(r, 50));
  }
}

function withTimeout<T>(p: Promise<T>, ms: number, what: string): Promise<T> {
  return new Promise((resolve, reject) => {
    const t = setTimeout(() => reject(new LetheError('VM_FAILED', `${what} within ${ms / 1000} s`)), ms);
    p.then(
      (v) => {
        clearTimeout(t);
        resolve(v);
      },
      (e) => {
        clearTimeout(t);
        reject(e);
      },
    );
  });
}
