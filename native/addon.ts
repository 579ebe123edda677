// The addon and the facts both sides of the memory path agree on: the shim's hello
// header (native/lethe-uffd.h), where the build puts the addon and the shim, the
// addon's typed interface, loaded on first use (a load failure lists the paths it
// tried), and the argument checks every call makes before it reaches C.
import fs from 'node:fs';
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
export const NEEDED_IOCTLS = (1n << 2n) | (1n << 3n) | (1n << 4n);

// ---- implementation ----
/** How long a shim may take to send its hello after connecting. */
export const HANDSHAKE_TIMEOUT_MS = 5_000;
const ROOT = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '..');
export const BUILD_DIR = path.join(ROOT, 'build', 'native');
export const SHIM_PATH = path.join(BUILD_DIR, 'liblethe-uffd-shim.so');
const ADDON_PATH = path.join(BUILD_DIR, 'lethe_native.node');
export const SETUP_HINT = 'run scripts/setup (it builds native/ with make)';
export const FAULT_KIND = 0;
/** Largest address a JS number holds exactly; user addresses on x86-64 are below 2^47. */
export const MAX_ADDRESS = Number.MAX_SAFE_INTEGER;

// ---- the addon ----

/** The process that connected a unix socket, as the kernel recorded it at connect(). */
export interface PeerCredentials {
  pid: number;
  uid: number;
  gid: number;
}


declare const handleBrand: unique symbol;
export type FaultHandle = { readonly [handleBrand]: true };

export interface FaultStats {
  /** MISSING faults read from the uffd. */
  faults: number;
  copied: number;
  zeroed: number;
  /** Resolutions that found the page already there (EEXIST), woken instead. */
  present: number;
}

/** lethe_native.node as native/addon.cc and the files it adds (fault-server.cc, disk-reads.cc, nbd-proxy.cc, seal-write.cc) define it; errors carry code (EBADF, …), errno, syscall. */
export interface Addon {
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
  startFaultThread(uffd: number, cb: (kind: number, a: number, b: number | string, thread: number) => void, loop: boolean): FaultHandle;
  /** 0 when the page was installed, 1 when it was already present (waiters woken). */
  resolveFault(handle: FaultHandle, address: number, data: Uint8Array | null): 0 | 1;
  wakeRange(handle: FaultHandle, address: number, length: number): void;
  stopFaultThread(handle: FaultHandle): void;
  faultStats(handle: FaultHandle): FaultStats;
  diskReadsOpen(
    fd: number, pieceKey: Uint8Array, keyLabel: Uint8Array, adLabel: Uint8Array, kind: number, cls: number, chunkSize: number, maxChunks: number,
    replyBuffers: number, replyMax: number, copyBytes: number, writeBuffers: number,
  ): DiskReadsHandle;
  diskReadsImage(h: DiskReadsHandle, imageId: Uint8Array): void;
  diskReadsKey(h: DiskReadsHandle, gen: number, key: Uint8Array): boolean;
  diskReadsZeroKeys(h: DiskReadsHandle): void;
  diskReadsPut(h: DiskReadsHandle, index: number, gen: number, at: number, blob: Uint8Array): void;
  diskReadsHas(h: DiskReadsHandle, index: number, gen: number): boolean;
  diskReadsForget(h: DiskReadsHandle, index: number): void;
  diskReadsForgetAll(h: DiskReadsHandle): void;
  diskReadsRead(h: DiskReadsHandle, offset: number, out: Uint8Array, admit: boolean): boolean;
  diskReadsDecrypt(h: DiskReadsHandle, index: number, gen: number, blob: Uint8Array, from: number, out: Uint8Array): boolean;
  diskReadsLies(h: DiskReadsHandle, index: number, gen: number, at: number, blobLen: number): boolean;
  diskReadsAdmit(h: DiskReadsHandle, index: number, gen: number, at: number, blobLen: number, within: number, out: Uint8Array): Promise<boolean>;
  diskReadsWriteBuffers(h: DiskReadsHandle): Buffer[];
  diskReadsStats(h: DiskReadsHandle): DiskReadsStats;
  diskReadsClose(h: DiskReadsHandle): void;
  nbdProxyStart(table: DiskReadsHandle, fd: number, leftover: Uint8Array, structured: boolean, size: number, readers: number): [NbdProxyHandle, number];
  nbdProxyStats(h: NbdProxyHandle): { reads: number; bytes: number };
  nbdProxyGiveWrite(h: NbdProxyHandle, i: number): boolean;
  nbdProxyClose(h: NbdProxyHandle, held: number[]): void;
  sealWrite(fd: number, at: number, key: Uint8Array, nonce: Uint8Array, ad: Uint8Array, plaintext: Uint8Array, blob: Uint8Array): Promise<void>;
  aeadBackend(): 'openssl' | 'libsodium';
  /** op 0 seal, 1 open (null on a bad tag), 2 the XChaCha20 stream from block ic. */
  aeadCipher(op: 0 | 1 | 2 | 3 | 4, key: Uint8Array, nonce: Uint8Array, ad: Uint8Array, ic: number, input: Uint8Array): Buffer | null;
}

declare const nbdProxyBrand: unique symbol;
export type NbdProxyHandle = { readonly [nbdProxyBrand]: true };

declare const diskReadsBrand: unique symbol;
export type DiskReadsHandle = { readonly [diskReadsBrand]: true };

export interface DiskReadsStats {
  /** Chunks in the table. */
  chunks: number;
  /** Class keys held. */
  keys: number;
  /** Reads served whole. */
  reads: number;
  /** Reads refused (a chunk not in the table, no key, a piece that did not match): JavaScript read them. */
  fallbacks: number;
  /** Reads whose pieces or whole blob did not match their tags (damage to the cache file); the chunk was forgotten. */
  mismatches: number;
  /** Chunks put in by an admission (their first read, checked in native code). */
  admits: number;
  /** Admissions refused because the blob in the file failed its check (wrong format byte or tag): JavaScript read them. */
  refused: number;
  /** Chunks whose blob's place the table was told (NativeDiskReads.lies) and has not admitted yet, for the read proxy to admit. */
  placed: number;
  /** Write buffers out of the NBD read proxies' hands: being filled, or lent to JavaScript. */
  writesOut: number;
}

let loaded: Addon | undefined;

/** The addon, loaded once; LETHE_NATIVE_ADDON overrides its path. @throws LetheError CONFIG */
export function addon(): Addon {
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

export function show(v: unknown): string {
  if (typeof v === 'string') return JSON.stringify(v);
  if (v === null || typeof v !== 'object') return String(v);
  return ArrayBuffer.isView(v) ? `${v.constructor.name} of ${v.byteLength} bytes` : (v.constructor?.name ?? 'object');
}

export function fdArg(fn: string, name: string, v: unknown): number {
  if (!Number.isInteger(v) || (v as number) < 0 || (v as number) > 0x7fffffff) {
    throw new TypeError(`${fn}: ${name} must be a file descriptor, a non-negative integer (got ${show(v)})`);
  }
  return v as number;
}

export function bytesArg(fn: string, name: string, v: unknown): Uint8Array {
  if (!ArrayBuffer.isView(v)) throw new TypeError(`${fn}: ${name} must be a Buffer or typed array (got ${show(v)})`);
  return v instanceof Uint8Array ? v : new Uint8Array(v.buffer, v.byteOffset, v.byteLength);
}

/** A safe integer ≥ min that is a multiple of PAGE_SIZE. */
export function pageMultiple(fn: string, name: string, v: unknown, min: number): number {
  if (typeof v !== 'number') throw new TypeError(`${fn}: ${name} must be a number (got ${show(v)})`);
  if (!Number.isSafeInteger(v) || v < min) throw new RangeError(`${fn}: ${name} must be an integer ≥ ${min} (got ${show(v)})`);
  if (v % PAGE_SIZE !== 0) throw new RangeError(`${fn}: ${name} must be a multiple of ${PAGE_SIZE} (got ${v})`);
  return v;
}

export function hex(n: number): string {
  return `0x${n.toString(16)}`;
}

