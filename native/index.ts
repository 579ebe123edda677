// The native layer of the memory path, typed (docs/uffd.md). Every argument is checked
// here before it reaches C (STYLE.md habit 10); the addon is loaded on first use, and a
// load failure lists the paths it tried.
//
//   punchHole, mlock, munlock, memzero     memory primitives
//   shimEnv                                 the environment that preloads the shim into QEMU
//   UffdListener → UffdMapping              the shim's handshake: a uffd and its mapping
//   FaultThread                             MISSING faults to JS, answers with UFFDIO_COPY
//   peerCredentials, socketFd               who is at the other end of a unix socket (SO_PEERCRED)
//
// addon.ts loads the addon and holds the hello header's constants; uffd.ts the shim
// and the fault thread.
import net from 'node:net';
import { LetheError } from '../common/errors.js';
import { addon, bytesArg, fdArg, PAGE_SIZE, pageMultiple, type PeerCredentials } from './addon.js';

export { BUILD_DIR, checkNativeBuilt, HANDSHAKE_TIMEOUT_MS, HELLO_BYTES, HELLO_MAGIC, HELLO_VERSION, PAGE_SIZE, SHIM_PATH, UFFD_PAGEFAULT_FLAG_WRITE, type FaultStats, type PeerCredentials } from './addon.js';
export * from './uffd.js';

// ---- unix socket peers ----

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

/**
 * A guest write's chunk, on a libuv pool thread (native/seal-write.cc): seals
 * `plaintext` under `key` (XChaCha20-Poly1305, `nonce`, associated data `ad`) into
 * blob[25…], whose first 25 bytes (format byte, nonce) the caller has set; writes the
 * blob at `at` in `fd`. The key is copied during the call (wipe yours once it
 * returns). Neither buffer may be touched until the promise settles. Resolves once
 * the blob is written; rejects as node:fs does (code, syscall).
 */
export function sealWrite(fd: number, at: number, key: Uint8Array, nonce: Uint8Array, ad: Uint8Array, plaintext: Uint8Array, blob: Uint8Array): Promise<void> {
  fdArg('sealWrite', 'fd', fd);
  if (!Number.isSafeInteger(at) || at < 0) throw new RangeError(`sealWrite: at must be a file offset, not ${at}`);
  const args = [key, nonce, ad, plaintext, blob].map((b, i) => bytesArg('sealWrite', ['key', 'nonce', 'ad', 'plaintext', 'blob'][i], b));
  return addon().sealWrite(fd, at, args[0], args[1], args[2], args[3], args[4]);
}

/**
 * The chunk cipher sealWrite and the disk's native reads run (native/aead.cc): "openssl"
 * when the OpenSSL that Node carries has the calls it needs and agreed with libsodium in
 * a self-test, "libsodium" otherwise or under LETHE_AEAD=libsodium.
 */
export function aeadBackend(): 'openssl' | 'libsodium' {
  return addon().aeadBackend();
}

/** The native cipher alone, for its tests and bench: XChaCha20-Poly1305 of `plain`, ciphertext ‖ tag. */
export function aeadSeal(key: Uint8Array, nonce: Uint8Array, ad: Uint8Array, plain: Uint8Array): Buffer {
  const args = [key, nonce, ad, plain].map((b, i) => bytesArg('aeadSeal', ['key', 'nonce', 'ad', 'plain'][i], b));
  return addon().aeadCipher(0, args[0], args[1], args[2], 0, args[3]) as Buffer;
}

/** The plaintext of ciphertext ‖ tag, or null when the tag does not match. */
export function aeadOpen(key: Uint8Array, nonce: Uint8Array, ad: Uint8Array, boxed: Uint8Array): Buffer | null {
  const args = [key, nonce, ad, boxed].map((b, i) => bytesArg('aeadOpen', ['key', 'nonce', 'ad', 'boxed'][i], b));
  if (args[3].length < 16) throw new RangeError(`aeadOpen: boxed must hold at least the 16-byte tag, not ${args[3].length} bytes`);
  return addon().aeadCipher(1, args[0], args[1], args[2], 0, args[3]);
}

/** Whether the tag of ciphertext ‖ tag matches, nothing decrypted (how the disk's reads first check a chunk). */
export function aeadVerify(key: Uint8Array, nonce: Uint8Array, ad: Uint8Array, boxed: Uint8Array): boolean {
  const args = [key, nonce, ad, boxed].map((b, i) => bytesArg('aeadVerify', ['key', 'nonce', 'ad', 'boxed'][i], b));
  if (args[3].length < 16) throw new RangeError(`aeadVerify: boxed must hold at least the 16-byte tag, not ${args[3].length} bytes`);
  return addon().aeadCipher(3, args[0], args[1], args[2], 0, args[3]) !== null;
}

/**
 * The 16-byte tag of each 4 KiB piece of `input` (the last may be shorter), as the disk's
 * native reads check a piece: Poly1305 under the first 32 bytes of XChaCha20 block
 * `first + i` for piece i.
 */
export function aeadPieceTags(key: Uint8Array, nonce: Uint8Array, first: number, input: Uint8Array): Buffer {
  if (!Number.isSafeInteger(first) || first < 0) throw new RangeError(`aeadPieceTags: first must be a block number, not ${first}`);
  const args = [key, nonce, input].map((b, i) => bytesArg('aeadPieceTags', ['key', 'nonce', 'input'][i], b));
  return addon().aeadCipher(4, args[0], args[1], new Uint8Array(0), first, args[2]) as Buffer;
}

/** `input` XOR the XChaCha20 keystream from 64-byte block `ic` on. */
export function aeadStream(key: Uint8Array, nonce: Uint8Array, ic: number, input: Uint8Array): Buffer {
  if (!Number.isSafeInteger(ic) || ic < 0) throw new RangeError(`aeadStream: ic must be a block number, not ${ic}`);
  const args = [key, nonce, input].map((b, i) => bytesArg('aeadStream', ['key', 'nonce', 'input'][i], b));
  return addon().aeadCipher(2, args[0], args[1], new Uint8Array(0), ic, args[2]) as Buffer;
}

export * from './disk-reads.js';
