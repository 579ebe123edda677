// The shim and the fault thread (docs/uffd.md): the environment that preloads the
// shim into QEMU, its handshake (UffdListener → UffdMapping), and the thread that
// hands MISSING faults to JavaScript and answers them with UFFDIO_COPY.
import fs from 'node:fs';
import net from 'node:net';
import path from 'node:path';
import { LetheError } from '../common/errors.js';
import { addon, bytesArg, FAULT_KIND, HANDSHAKE_TIMEOUT_MS, HELLO_BYTES, HELLO_MAGIC, HELLO_VERSION, hex, MAX_ADDRESS, NEEDED_IOCTLS, PAGE_SIZE, pageMultiple, SHIM_PATH, show, UFFD_PAGEFAULT_FLAG_WRITE, type FaultHandle, type FaultStats } from './addon.js';

// ---- the shim ----

/** The environment that makes QEMU load the shim for `ramPath` and hand its uffd to `socketPath`. */
export function shimEnv(ramPath: string, socketPath: string): Record<string, string> {
  if (typeof ramPath !== 'string' || !path.isAbsolute(ramPath)) throw new TypeError(`shimEnv: ramPath must be an absolute path (got ${show(ramPath)})`);
  if (typeof socketPath !== 'string' || Buffer.byteLength(socketPath) >= 108) {
    throw new TypeError(`shimEnv: socketPath must be a unix socket path under 108 bytes (got ${show(socketPath)})`);
  }
  return { LD_PRELOAD: SHIM_PATH, LETHE_RAM_PATH: ramPath, LETHE_UFFD_SOCKET: socketPath };
}

export interface UffdHello {
  pid: number;
  pageSize: number;
  /** The mapping's address in the shim's process. */
  base: number;
  length: number;
  /** The file offset mapped at base. */
  offset: number;
  ioctls: bigint;
}

/**
 * Parses and checks the shim's 48-byte hello (docs/uffd.md, "Handshake").
 * @throws LetheError BAD_REQUEST naming the bad field and its value
 */
export function parseHello(data: Buffer): UffdHello {
  const bad = (what: string) => new LetheError('BAD_REQUEST', `bad uffd hello from the shim: ${what}`);
  if (data.length !== HELLO_BYTES) throw bad(`${data.length} bytes, expected ${HELLO_BYTES}`);
  const magic = data.readUInt32LE(0);
  if (magic !== HELLO_MAGIC) throw bad(`magic ${hex(magic)}, expected ${hex(HELLO_MAGIC)}`);
  const version = data.readUInt16LE(4);
  if (version !== HELLO_VERSION) throw bad(`version ${version}, this agent speaks ${HELLO_VERSION}`);
  const headerBytes = data.readUInt16LE(6);
  if (headerBytes !== HELLO_BYTES) throw bad(`header_bytes ${headerBytes}, expected ${HELLO_BYTES}`);
  const h = {
    pid: data.readUInt32LE(8),
    pageSize: data.readUInt32LE(12),
    base: data.readBigUInt64LE(16),
    length: data.readBigUInt64LE(24),
    offset: data.readBigUInt64LE(32),
    ioctls: data.readBigUInt64LE(40),
  };
  if (h.pageSize !== PAGE_SIZE) throw bad(`page size ${h.pageSize}, expected ${PAGE_SIZE}`);
  const page = BigInt(PAGE_SIZE);
  for (const [name, v] of [['base', h.base], ['length', h.length], ['offset', h.offset]] as const) {
    if (v % page !== 0n) throw bad(`${name} ${hex(Number(v))} is not page-aligned`);
  }
  if (h.length === 0n) throw bad('length 0');
  if (h.base + h.length > BigInt(MAX_ADDRESS) || h.offset + h.length > BigInt(MAX_ADDRESS)) throw bad('mapping beyond 2^53');
  if ((h.ioctls & NEEDED_IOCTLS) !== NEEDED_IOCTLS) throw bad(`ioctls 0x${h.ioctls.toString(16)} lack COPY, ZEROPAGE or WAKE`);
  return { ...h, base: Number(h.base), length: Number(h.length), offset: Number(h.offset) };
}

/**
 * One registered mapping of the RAM file in QEMU: the uffd for it and the shim's
 * socket. Closing the socket is what kills QEMU (the shim's watchdog), so it stays
 * open exactly as long as this agent serves the mapping.
 */
export class UffdMapping {
  readonly uffd: number;
  readonly hello: UffdHello;
  /** Resolves when the shim's process is gone (its socket closed) or close() was called. */
  readonly closed: Promise<void>;
  private readonly socket: net.Socket;
  private thread?: FaultThread;
  private isOpen = true;

  constructor(uffd: number, hello: UffdHello, socket: net.Socket) {
    this.uffd = uffd;
    this.hello = hello;
    this.socket = socket;
    this.closed = new Promise((resolve) => socket.once('close', () => resolve(this.close())));
    socket.on('error', () => {}); // 'close' follows
    socket.on('data', () => {}); // the shim sends nothing after its hello
    socket.resume();
  }

  get open(): boolean {
    return this.isOpen;
  }

  /** The file offset of a page address in this mapping. @throws RangeError outside it */
  offsetOf(address: number): number {
    this.checkRange('offsetOf', address, 1);
    return this.hello.offset + (address - this.hello.base);
  }

  /** The address at which this mapping holds a file offset. @throws RangeError outside it */
  addressOf(fileOffset: number): number {
    const address = this.hello.base + (fileOffset - this.hello.offset);
    if (!Number.isSafeInteger(fileOffset) || fileOffset < this.hello.offset || fileOffset >= this.hello.offset + this.hello.length) {
      throw new RangeError(`addressOf: file offset ${show(fileOffset)} is outside the mapping (offsets ${this.hello.offset}..${this.hello.offset + this.hello.length})`);
    }
    return address;
  }

  /** @throws RangeError unless [address, address+length) lies in this mapping */
  checkRange(fn: string, address: number, length: number): void {
    const { base, length: size } = this.hello;
    if (!Number.isSafeInteger(address) || address < base || address + length > base + size) {
      throw new RangeError(`${fn}: address ${typeof address === 'number' ? hex(address) : show(address)} is outside the mapping ${hex(base)}..${hex(base + size)}`);
    }
  }

  /** Whether a running FaultThread serves this mapping. */
  get served(): boolean {
    return this.thread?.running ?? false;
  }

  /** Call when a fault thread starts on this mapping; close() stops it before closing the uffd. */
  attach(thread: FaultThread): void {
    this.thread = thread;
  }

  /**
   * Stops serving: closes the socket (the shim then kills QEMU), stops the fault thread
   * and closes the uffd. Idempotent.
   */
  close(): void {
    if (!this.isOpen) return;
    this.isOpen = false;
    this.socket.destroy();
    this.thread?.stop();
    fs.closeSync(this.uffd);
  }
}

/** A unix socket that QEMU's shims connect to, one connection per mapping of the RAM file. */
export class UffdListener {
  private readonly server: net.Server;
  private readonly mappings = new Set<UffdMapping>();

  private constructor(server: net.Server) {
    this.server = server;
  }

  /**
   * Listens on `socketPath`; `onMapping` gets each mapping once its handshake checks out.
   * A failed handshake closes that connection (so the shim kills its process) and goes to
   * `onError`.
   */
  static async listen(socketPath: string, onMapping: (m: UffdMapping) => void, onError: (e: Error) => void): Promise<UffdListener> {
    addon(); // fail before QEMU starts, not at its first mmap
    const server = net.createServer({ pauseOnConnect: true });
    const listener = new UffdListener(server);
    server.on('connection', (sock) => {
      listener.accept(sock, onMapping).catch((e) => {
        sock.destroy();
        onError(new LetheError('BAD_REQUEST', `a shim connection on ${socketPath} failed its handshake`, { cause: e }));
      });
    });
    await new Promise<void>((resolve, reject) => {
      server.once('error', reject);
      server.listen(socketPath, () => {
        server.off('error', reject);
        resolve();
      });
    });
    return listener;
  }

  private async accept(sock: net.Socket, onMapping: (m: UffdMapping) => void): Promise<void> {
    // net.Socket keeps its fd on the libuv handle; paused (pauseOnConnect), Node never reads
    // it, so the SCM_RIGHTS message waits for recvFd.
    const fd = (sock as unknown as { _handle?: { fd?: number } })._handle?.fd;
    if (typeof fd !== 'number' || fd < 0) throw new LetheError('VM_FAILED', 'cannot get the fd of the shim connection');
    const got = await addon().recvFd(fd, HELLO_BYTES, HANDSHAKE_TIMEOUT_MS);
    let mapping: UffdMapping | undefined;
    try {
      const kind = fs.readlinkSync(`/proc/self/fd/${got.fd}`);
      if (kind !== 'anon_inode:[userfaultfd]') throw new LetheError('VM_FAILED', `the fd the shim sent is ${kind}, not a userfaultfd`);
      const hello = parseHello(got.data);
      if (got.peerPid && hello.pid !== got.peerPid) throw new LetheError('VM_FAILED', `the shim's hello names pid ${hello.pid}, but the peer is pid ${got.peerPid}`);
      mapping = new UffdMapping(got.fd, hello, sock);
    } finally {
      if (!mapping) fs.closeSync(got.fd);
    }
    this.mappings.add(mapping);
    void mapping.closed.then(() => this.mappings.delete(mapping));
    onMapping(mapping);
  }

  /** Stops listening and closes every mapping (so every shim's process is killed). */
  async close(): Promise<void> {
    for (const m of this.mappings) m.close();
    await new Promise<void>((resolve) => this.server.close(() => resolve()));
  }
}

// ---- the fault thread ----

export interface Fault {
  /** The page's address in QEMU. */
  pageAddress: number;
  /** The page's offset in the RAM file (= guest-physical address). */
  offset: number;
  write: boolean;
  /** The faulting thread's id in QEMU's process (a vCPU's, or another's); 0 when the kernel did not say. */
  thread: number;
}

export type FaultResult = 'copied' | 'zeroed' | 'present';

/**
 * How faults reach JS (docs/uffd.md, "Fault service"):
 *   'loop'    the main libuv loop polls the uffd and calls onFault directly: one wakeup a fault;
 *   'thread'  a native thread polls it and posts each fault to the main thread: two wakeups.
 * onFault runs on the main thread either way, so a busy event loop delays both alike.
 */
export type FaultMode = 'loop' | 'thread';
export const DEFAULT_FAULT_MODE: FaultMode = 'loop';

export interface FaultHandlers {
  /**
   * Called on the main thread for each MISSING fault; answer with thread.resolve(),
   * now or later. A throw or a rejected promise goes to onError.
   */
  onFault(fault: Fault, thread: FaultThread): void | Promise<void>;
  /**
   * A fault that could not be handled, or the native thread failing. Without onError
   * the error is thrown from the callback and crashes the agent (and so QEMU): a
   * fault is never left unanswered silently.
   */
  onError?(error: Error): void;
}

/** Reads one mapping's uffd (on the main loop or a native thread) and hands its faults to JS. */
export class FaultThread {
  readonly mapping: UffdMapping;
  readonly mode: FaultMode;
  private readonly handle: FaultHandle;
  private readonly handlers: FaultHandlers;
  private isRunning = true;

  private constructor(mapping: UffdMapping, handlers: FaultHandlers, mode: FaultMode) {
    this.mapping = mapping;
    this.handlers = handlers;
    this.mode = mode;
    this.handle = addon().startFaultThread(mapping.uffd, (kind, a, b, thread) => this.event(kind, a, b, thread), mode === 'loop');
  }

  /** Starts serving `mapping`. @throws Error if the mapping is closed or already served */
  static start(mapping: UffdMapping, handlers: FaultHandlers, opts: { mode?: FaultMode } = {}): FaultThread {
    if (!(mapping instanceof UffdMapping) || !mapping.open) throw new TypeError('FaultThread.start: the mapping is closed');
    if (typeof handlers?.onFault !== 'function') throw new TypeError('FaultThread.start: handlers.onFault must be a function');
    if (mapping.served) throw new Error(`FaultThread.start: a fault thread already serves the mapping at ${hex(mapping.hello.base)}`);
    const mode = opts.mode ?? DEFAULT_FAULT_MODE;
    if (mode !== 'loop' && mode !== 'thread') throw new TypeError(`FaultThread.start: mode must be "loop" or "thread" (got ${show(mode)})`);
    const t = new FaultThread(mapping, handlers, mode);
    mapping.attach(t);
    return t;
  }

  get running(): boolean {
    return this.isRunning;
  }

  private event(kind: number, a: number, b: number | string, thread: number): void {
    if (kind !== FAULT_KIND) {
      const cause = Object.assign(new Error(`${b}: ${a}`), { errno: a });
      this.report(new LetheError('VM_FAILED', `the fault thread of the mapping at ${hex(this.mapping.hello.base)} reported a failure`, { cause }));
      return;
    }
    const pageAddress = a - (a % PAGE_SIZE);
    let fault: Fault | undefined;
    try {
      fault = { pageAddress, offset: this.mapping.offsetOf(pageAddress), write: ((b as number) & UFFD_PAGEFAULT_FLAG_WRITE) !== 0, thread };
      const r = this.handlers.onFault(fault, this);
      if (r instanceof Promise) r.catch((e) => this.report(faultError(fault!, e)));
    } catch (e) {
      this.report(fault ? faultError(fault, e) : e);
    }
  }

  private report(e: unknown): void {
    if (!this.handlers.onError) throw e;
    this.handlers.onError(e instanceof Error ? e : new Error(String(e)));
  }

  /**
   * Installs a page: a copy of `data` (PAGE_SIZE bytes), or a zero page for null; wakes
   * whoever faulted on it. A page that is already present is left as it is ('present').
   * Also the prefetch path: a page may be resolved before it faults.
   * @throws TypeError/RangeError for bad arguments or a closed mapping, LetheError
   * INTERNAL when the ioctl fails (cause.code ESRCH: QEMU is gone)
   */
  resolve(pageAddress: number, data: Uint8Array | null): FaultResult {
    this.checkPage('resolve', pageAddress);
    const bytes = data === null ? null : bytesArg('resolve', 'data', data);
    if (bytes && bytes.byteLength !== PAGE_SIZE) throw new RangeError(`resolve: data must be ${PAGE_SIZE} bytes (got ${bytes.byteLength})`);
    try {
      if (addon().resolveFault(this.handle, pageAddress, bytes) === 1) return 'present';
      return bytes ? 'copied' : 'zeroed';
    } catch (e) {
      throw new LetheError('VM_FAILED', `cannot serve page ${hex(pageAddress)} (file offset ${this.mapping.offsetOf(pageAddress)})`, { cause: e });
    }
  }

  /** resolve() by file offset. */
  resolveOffset(fileOffset: number, data: Uint8Array | null): FaultResult {
    return this.resolve(this.mapping.addressOf(fileOffset), data);
  }

  /** Wakes threads waiting on faults in a range whose pages are present. */
  wake(address: number, length: number): void {
    this.checkPage('wake', address);
    pageMultiple('wake', 'length', length, PAGE_SIZE);
    this.mapping.checkRange('wake', address, length);
    addon().wakeRange(this.handle, address, length);
  }

  stats(): FaultStats {
    return addon().faultStats(this.handle);
  }

  /** Stops polling (and joins the thread); no callback runs after this returns. Idempotent. */
  stop(): void {
    if (!this.isRunning) return;
    this.isRunning = false;
    addon().stopFaultThread(this.handle);
  }

  private checkPage(fn: string, address: number): void {
    // The uffd number may already belong to another file once the mapping is closed.
    if (!this.mapping.open) throw new LetheError('VM_FAILED', `${fn}: the mapping at ${hex(this.mapping.hello.base)} is closed (its QEMU is gone)`);
    if (typeof address !== 'number') throw new TypeError(`${fn}: address must be a number (got ${show(address)})`);
    this.mapping.checkRange(fn, address, PAGE_SIZE);
    if (address % PAGE_SIZE !== 0) throw new RangeError(`${fn}: address ${hex(address)} is not page-aligned`);
  }
}

function faultError(f: Fault, cause: unknown): LetheError {
  return new LetheError('VM_FAILED', `cannot handle the ${f.write ? 'write' : 'read'} fault at file offset ${f.offset}`, { cause });
}

