// The native layer of the memory path, typed (docs/uffd.md). Every argument is checked
// here before it reaches C (STYLE.md habit 10); the addon is loaded on first use, and a
// load failure lists the paths it tried.
//
//   punchHole, mlock, munlock, memzero     memory primitives
//   shimEnv                                 the environment that preloads the shim into QEMU
//   UffdListener → UffdMapping              the shim's handshake: a uffd and its mapping
//   FaultThread                             MISSING faults to JS, answers with UFFDIO_COPY
//   peerCredentials, socketFd               who is at the other end of a unix socket (SO_PEERCRED)
import fs from 'node:fs';
import net from 'node:net';
import path from 'node:path';
import { createRequire } from 'node:module';
import { fileURLToPath } from 'node:url';
import { LetheError } from '../common/errors.js';

// ---- specification: the shim's hello header (native/lethe-uffd.h) ----
export const HELLO_MAGIC = 0x4446554c; // "LUFD"
export const HELLO_VERSION = 1;
export const HELLO_BYTES = 48;
/** The guest page size the memory path serves (x86-64); one mem chunk. */
export const PAGE_SIZE = 4096;
/** uffd_msg.arg.pagefault.flags */
export const UFFD_PAGEFAULT_FLAG_WRITE = 1;
/** Bits of UFFDIO_REGISTER's ioctls mask (_UFFDIO_WAKE, _UFFDIO_COPY, _UFFDIO_ZEROPAGE). */
const NEEDED_IOCTLS = (1n << 2n) | (1n << 3n) | (1n << 4n);

// ---- implementation ----
/** How long a shim may take to send its hello after connecting. */
export const HANDSHAKE_TIMEOUT_MS = 5_000;
const ROOT = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '..');
export const BUILD_DIR = path.join(ROOT, 'build', 'native');
export const SHIM_PATH = path.join(BUILD_DIR, 'liblethe-uffd-shim.so');
const ADDON_PATH = path.join(BUILD_DIR, 'lethe_native.node');
const SETUP_HINT = 'run scripts/setup (it builds native/ with make)';
const FAULT_KIND = 0;
/** Largest address a JS number holds exactly; user addresses on x86-64 are below 2^47. */
const MAX_ADDRESS = Number.MAX_SAFE_INTEGER;

// ---- the addon ----

declare const handleBrand: unique symbol;
type FaultHandle = { readonly [handleBrand]: true };

export interface FaultStats {
  /** MISSING faults read from the uffd. */
  faults: number;
  copied: number;
  zeroed: number;
  /** Resolutions that found the page already there (EEXIST), woken instead. */
  present: number;
}

/** lethe_native.node as native/addon.cc defines it; errors carry code (EBADF, …), errno, syscall. */
interface Addon {
  punchHole(fd: number, offset: number, length: number): void;
  mlock(bytes: Uint8Array): void;
  munlock(bytes: Uint8Array): void;
  memzero(bytes: Uint8Array): void;
  recvFd(socketFd: number, bytes: number, timeoutMs: number): Promise<{ fd: number; data: Buffer; peerPid: number }>;
  peerCredentials(socketFd: number): PeerCredentials;
  /**
   * cb(0, address, flags) for a fault; cb(1, errno or event, what) for a failure. `loop`
   * polls the uffd on the main libuv loop instead of a native thread.
   */
  startFaultThread(uffd: number, cb: (kind: number, a: number, b: number | string) => void, loop: boolean): FaultHandle;
  /** 0 when the page was installed, 1 when it was already present (waiters woken). */
  resolveFault(handle: FaultHandle, address: number, data: Uint8Array | null): 0 | 1;
  wakeRange(handle: FaultHandle, address: number, length: number): void;
  stopFaultThread(handle: FaultHandle): void;
  faultStats(handle: FaultHandle): FaultStats;
}

let loaded: Addon | undefined;

/** The addon, loaded once; LETHE_NATIVE_ADDON overrides its path. @throws LetheError CONFIG */
function addon(): Addon {
  if (loaded) return loaded;
  const require = createRequire(import.meta.url);
  const tried = [process.env.LETHE_NATIVE_ADDON, ADDON_PATH].filter((p): p is string => !!p);
  const failures: string[] = [];
  for (const p of tried) {
    try {
      loaded = require(p) as Addon;
      return loaded;
    } catch (e) {
      failures.push(`  ${p}: ${(e as Error).message.split('\n')[0]}`);
    }
  }
  throw new LetheError('CONFIG', `cannot load the native addon lethe_native.node; tried:\n${failures.join('\n')}`, { hint: SETUP_HINT });
}

/**
 * Checks that the addon loads and the shim is built, so a missing build is reported
 * before QEMU starts. @throws LetheError CONFIG naming what is missing
 */
export function checkNativeBuilt(): void {
  addon();
  if (!fs.existsSync(SHIM_PATH)) throw new LetheError('CONFIG', `the QEMU preload shim is not built; tried ${SHIM_PATH}`, { hint: SETUP_HINT });
}

// ---- argument checks ----

function show(v: unknown): string {
  if (typeof v === 'string') return JSON.stringify(v);
  if (v === null || typeof v !== 'object') return String(v);
  return ArrayBuffer.isView(v) ? `${v.constructor.name} of ${v.byteLength} bytes` : (v.constructor?.name ?? 'object');
}

function fdArg(fn: string, name: string, v: unknown): number {
  if (!Number.isInteger(v) || (v as number) < 0 || (v as number) > 0x7fffffff) {
    throw new TypeError(`${fn}: ${name} must be a file descriptor, a non-negative integer (got ${show(v)})`);
  }
  return v as number;
}

function bytesArg(fn: string, name: string, v: unknown): Uint8Array {
  if (!ArrayBuffer.isView(v)) throw new TypeError(`${fn}: ${name} must be a Buffer or typed array (got ${show(v)})`);
  return v instanceof Uint8Array ? v : new Uint8Array(v.buffer, v.byteOffset, v.byteLength);
}

/** A safe integer ≥ min that is a multiple of PAGE_SIZE. */
function pageMultiple(fn: string, name: string, v: unknown, min: number): number {
  if (typeof v !== 'number') throw new TypeError(`${fn}: ${name} must be a number (got ${show(v)})`);
  if (!Number.isSafeInteger(v) || v < min) throw new RangeError(`${fn}: ${name} must be an integer ≥ ${min} (got ${show(v)})`);
  if (v % PAGE_SIZE !== 0) throw new RangeError(`${fn}: ${name} must be a multiple of ${PAGE_SIZE} (got ${v})`);
  return v;
}

function hex(n: number): string {
  return `0x${n.toString(16)}`;
}

// ---- unix socket peers ----

/** The process that connected a unix socket, as the kernel recorded it at connect(). */
export interface PeerCredentials {
  pid: number;
  uid: number;
  gid: number;
}

/**
 * The peer of a connected unix socket (getsockopt SO_PEERCRED): the pid, uid and gid
 * of the process that called connect(), fixed then (a peer that passes its socket on
 * keeps its own credentials on it). On a TCP socket the kernel reports pid 0.
 * @throws TypeError for a bad fd, LetheError INTERNAL when getsockopt fails (EBADF, ENOTSOCK)
 */
export function peerCredentials(fd: number): PeerCredentials {
  fdArg('peerCredentials', 'fd', fd);
  try {
    return addon().peerCredentials(fd);
  } catch (e) {
    if (e instanceof LetheError) throw e;
    throw new LetheError('INTERNAL', `cannot read the peer credentials of fd ${fd}`, { cause: e });
  }
}

/** The file descriptor under an accepted or connected net.Socket (its libuv handle's), or null when it has none (yet, or any more). */
export function socketFd(socket: net.Socket): number | null {
  const fd = (socket as unknown as { _handle?: { fd?: unknown } | null })._handle?.fd;
  return typeof fd === 'number' && Number.isInteger(fd) && fd >= 0 ? fd : null;
}

// ---- memory primitives ----

/**
 * Frees whole pages of a file (fallocate PUNCH_HOLE | KEEP_SIZE): the eviction of guest
 * RAM. Every mapping of them, QEMU's and KVM's, sees a hole: the next touch faults
 * through the userfaultfd again. Only whole pages: a partial punch would zero bytes of a
 * page that stays resident, silently.
 * @throws TypeError/RangeError for a bad argument, LetheError INTERNAL when fallocate fails
 */
export function punchHole(fd: number, offset: number, length: number): void {
  fdArg('punchHole', 'fd', fd);
  pageMultiple('punchHole', 'offset', offset, 0);
  pageMultiple('punchHole', 'length', length, PAGE_SIZE);
  try {
    addon().punchHole(fd, offset, length);
  } catch (e) {
    if (e instanceof LetheError) throw e;
    throw new LetheError('VM_FAILED', `cannot punch a hole of ${length} bytes at offset ${offset} of fd ${fd}`, { cause: e });
  }
}

/** Locks the pages holding `bytes` in RAM (never swapped out). @throws LetheError INTERNAL (e.g. RLIMIT_MEMLOCK) */
export function mlock(bytes: ArrayBufferView): void {
  lockOp('mlock', bytes);
}

/** Undoes mlock. */
export function munlock(bytes: ArrayBufferView): void {
  lockOp('munlock', bytes);
}

function lockOp(fn: 'mlock' | 'munlock', bytes: ArrayBufferView): void {
  const u8 = bytesArg(fn, 'bytes', bytes);
  try {
    addon()[fn](u8);
  } catch (e) {
    if (e instanceof LetheError) throw e;
    throw new LetheError('INTERNAL', `cannot ${fn} ${u8.byteLength} bytes`, { cause: e });
  }
}

/** Zeroes `bytes` with explicit_bzero, which the compiler may not optimize away. */
export function memzero(bytes: ArrayBufferView): void {
  addon().memzero(bytesArg('memzero', 'bytes', bytes));
}

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
    if (typeof fd !== 'number' || fd < 0) throw new Error('cannot get the fd of the connection');
    const got = await addon().recvFd(fd, HELLO_BYTES, HANDSHAKE_TIMEOUT_MS);
    let mapping: UffdMapping | undefined;
    try {
      const kind = fs.readlinkSync(`/proc/self/fd/${got.fd}`);
      if (kind !== 'anon_inode:[userfaultfd]') throw new Error(`the fd sent is ${kind}, not a userfaultfd`);
      const hello = parseHello(got.data);
      if (got.peerPid && hello.pid !== got.peerPid) throw new Error(`the hello names pid ${hello.pid}, but the peer is pid ${got.peerPid}`);
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
    this.handle = addon().startFaultThread(mapping.uffd, (kind, a, b) => this.event(kind, a, b), mode === 'loop');
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

  private event(kind: number, a: number, b: number | string): void {
    if (kind !== FAULT_KIND) {
      const cause = Object.assign(new Error(`${b}: ${a}`), { errno: a });
      this.report(new LetheError('VM_FAILED', `the fault thread of the mapping at ${hex(this.mapping.hello.base)} reported a failure`, { cause }));
      return;
    }
    const pageAddress = a - (a % PAGE_SIZE);
    let fault: Fault | undefined;
    try {
      fault = { pageAddress, offset: this.mapping.offsetOf(pageAddress), write: ((b as number) & UFFD_PAGEFAULT_FLAG_WRITE) !== 0 };
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
    if (!this.mapping.open) throw new Error(`${fn}: the mapping at ${hex(this.mapping.hello.base)} is closed (its QEMU is gone)`);
    if (typeof address !== 'number') throw new TypeError(`${fn}: address must be a number (got ${show(address)})`);
    this.mapping.checkRange(fn, address, PAGE_SIZE);
    if (address % PAGE_SIZE !== 0) throw new RangeError(`${fn}: address ${hex(address)} is not page-aligned`);
  }
}

function faultError(f: Fault, cause: unknown): LetheError {
  return new LetheError('VM_FAILED', `cannot handle the ${f.write ? 'write' : 'read'} fault at file offset ${f.offset}`, { cause });
}
