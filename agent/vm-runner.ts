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
import path from 'node:path';
import { MEM_CHUNK_SIZE, STATE_CHUNK_SIZE } from '../common/constants.js';
import { secureBuffer, wipe } from '../common/crypto.js';
import { LetheError, errorChain } from '../common/errors.js';
import { FaultThread, UffdListener, shimEnv, type UffdMapping } from '../native/index.js';
import type { AgentCore } from './core.js';
import { BufferPool } from './buffer-pool.js';
import { Vm, type Accel } from './qemu.js';

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
}

const HANDSHAKE_MS = 15_000;
const MIGRATION_MS = 60_000;
const PAGE_POOL = 32;

export class AgentVm {
  faults = 0;
  zeroFaults = 0;
  private constructor(
    readonly vm: Vm,
    readonly ramPath: string,
    /** The RAM file, unlinked: for punching evicted pages out. */
    readonly ramFd: number,
    private readonly listener: UffdListener,
    private readonly thread: FaultThread,
    private readonly pool: BufferPool,
  ) {}

  /** Resumes the lease's image. Throws (and leaves no QEMU running) if any step fails. */
  static async resume(core: AgentCore, o: ResumeOptions): Promise<AgentVm> {
    const memBytes = core.sizeOf('mem');
    if (memBytes === 0) throw new LetheError('BAD_REQUEST', 'this image has no memory to resume', { hint: 'push one with --memory and --state' });
    const ramPath = path.join(o.shmDir ?? '/dev/shm', `lethe-ram-${randomBytes(6).toString('hex')}`);
    fs.writeFileSync(ramPath, '', { mode: 0o600 });
    fs.truncateSync(ramPath, memBytes);
    const sock = path.join(o.runDir, 'uffd.sock');
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
        },
        o.runDir,
      );
      const m = await withTimeout(mapping, HANDSHAKE_MS, 'the shim did not hand over guest RAM');
      if (m.hello.pid !== vm.pid) throw new LetheError('INTERNAL', `a RAM mapping arrived from pid ${m.hello.pid}, not QEMU's ${vm.pid}`);
      // Once the guest runs, the file leaves /dev/shm (below); our own fd stays for
      // punching holes. Its pages are freed when QEMU and the agent are gone, even
      // after a kill -9 of either, so no guest RAM outlives the session.
      const ramFd = fs.openSync(ramPath, 'r+');
      const pool = new BufferPool(PAGE_POOL, MEM_CHUNK_SIZE);
      let self: AgentVm | undefined;
      const thread = FaultThread.start(m, {
        onFault: (f, t) =>
          pool.with(MEM_CHUNK_SIZE, async (buf) => {
            const src = await core.readInto('mem', f.offset / MEM_CHUNK_SIZE, buf, { resident: true });
            t.resolve(f.pageAddress, src === 'zero' ? null : buf);
            if (self) {
              self.faults++;
              if (src === 'zero') self.zeroFaults++;
            }
          }),
        // A fault that cannot be served stays unanswered: the guest waits, it never runs on zeros.
        onError: (e) => o.log(`page fault not served: ${errorChain(e)}`),
      });
      self = new AgentVm(vm, ramPath, ramFd, listener, thread, pool);
      await streamState(core, vm, o.runDir);
      fs.unlinkSync(ramPath);
      return self;
    } catch (e) {
      if (vm) {
        const status = await Promise.race([vm.exited, new Promise<undefined>((r) => setTimeout(() => r(undefined), 500))]);
        if (status) {
          await listener.close();
          fs.rmSync(ramPath, { force: true });
          throw new LetheError('INTERNAL', vm.describe('qemu exited while resuming', status), { cause: e });
        }
      }
      await vm?.kill();
      await listener.close();
      fs.rmSync(ramPath, { force: true });
      throw e;
    }
  }

  async stop(): Promise<void> {
    await this.vm.kill();
    this.thread.stop();
    await this.listener.close();
    this.pool.destroy();
    fs.closeSync(this.ramFd);
  }
}

/** Feeds the device state to QEMU through a FIFO (no plaintext file), waits for it to load, and runs the guest. */
async function streamState(core: AgentCore, vm: Vm, runDir: string): Promise<void> {
  const fifo = path.join(runDir, 'state.fifo');
  execFileSync('mkfifo', ['-m', '600', fifo]);
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
    if (Date.now() - t0 > MIGRATION_MS) throw new LetheError('INTERNAL', `the device state did not load (QEMU status '${st.status}')`);
    await new Promise((r) => setTimeout(r, 50));
  }
}

function withTimeout<T>(p: Promise<T>, ms: number, what: string): Promise<T> {
  return new Promise((resolve, reject) => {
    const t = setTimeout(() => reject(new LetheError('INTERNAL', `${what} within ${ms / 1000} s`)), ms);
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
