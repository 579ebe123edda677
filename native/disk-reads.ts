// The disk's warm-read table in native code (native/disk-reads.cc, docs/nbd.md "Reads
// in native code"), typed and with every argument checked before it reaches C.
// Normal-class disk chunks whose tag the agent checked are put in with the slot their
// ciphertext lies in; a read of them then preads, checks and decrypts only the 4 KiB
// pieces it covers, in one call. A read it cannot serve answers false, and the caller
// reads through the chunk core as before: this table only ever refuses.
import { LetheError } from '../common/errors.js';
import { addon, bytesArg, fdArg, show, type DiskReadsHandle, type DiskReadsStats } from './addon.js';

export type { DiskReadsStats } from './addon.js';

const KEY_BYTES = 32;
const IMAGE_ID_BYTES = 16;
const MAX_LABEL_BYTES = 64;

function u32(fn: string, name: string, v: unknown): number {
  if (!Number.isInteger(v) || (v as number) < 0 || (v as number) > 0xffffffff) throw new TypeError(`${fn}: ${name} must be an unsigned 32-bit integer (got ${show(v)})`);
  return v as number;
}

function exactly(fn: string, name: string, v: unknown, bytes: number): Uint8Array {
  const u8 = bytesArg(fn, name, v);
  if (u8.byteLength !== bytes) throw new RangeError(`${fn}: ${name} must be ${bytes} bytes (got ${u8.byteLength})`);
  return u8;
}

export class NativeDiskReads {
  private h: DiskReadsHandle | null;

  /**
   * A table over the disk slot file `fd` (duplicated: the caller keeps its own).
   * `digestKey` keys the piece digests; `label` and `kind` are the chunk-key derivation's
   * (common/chunk.ts chunkKeyInto); at most `maxChunks` chunks are kept.
   */
  constructor(fd: number, opts: { digestKey: Uint8Array; label: Uint8Array; kind: number; chunkSize: number; maxChunks: number }) {
    const fn = 'NativeDiskReads';
    fdArg(fn, 'fd', fd);
    const digestKey = exactly(fn, 'digestKey', opts.digestKey, KEY_BYTES);
    const label = bytesArg(fn, 'label', opts.label);
    if (label.byteLength > MAX_LABEL_BYTES) throw new RangeError(`${fn}: label must be at most ${MAX_LABEL_BYTES} bytes`);
    if (!Number.isInteger(opts.kind) || opts.kind < 0 || opts.kind > 255) throw new RangeError(`${fn}: kind must be a byte (got ${show(opts.kind)})`);
    if (u32(fn, 'chunkSize', opts.chunkSize) === 0 || opts.chunkSize % 4096 !== 0) throw new RangeError(`${fn}: chunkSize must be a positive multiple of 4096`);
    u32(fn, 'maxChunks', opts.maxChunks);
    try {
      this.h = addon().diskReadsOpen(fd, digestKey, label, opts.kind, opts.chunkSize, opts.maxChunks);
    } catch (e) {
      throw new LetheError('INTERNAL', `cannot open the native disk-read table on fd ${fd}`, { cause: e });
    }
  }

  private handle(): DiskReadsHandle {
    if (!this.h) throw new LetheError('INTERNAL', 'the native disk-read table is closed');
    return this.h;
  }

  /** A new manifest (image id): every chunk is forgotten. */
  image(imageId: Uint8Array): void {
    addon().diskReadsImage(this.handle(), exactly('image', 'imageId', imageId, IMAGE_ID_BYTES));
  }

  /** Copies the class key of `gen` into the table's locked memory; false when it holds as many generations as it can. */
  key(gen: number, key: Uint8Array): boolean {
    return addon().diskReadsKey(this.handle(), u32('key', 'gen', gen), exactly('key', 'key', key, KEY_BYTES));
  }

  /** Zeroes every class key (the lease ended): no read is served until a key comes again. */
  zeroKeys(): void {
    if (this.h) addon().diskReadsZeroKeys(this.h);
  }

  /** A chunk whose blob (format byte, nonce, ciphertext, tag) was checked, lying at byte `at` of the file. */
  put(index: number, gen: number, at: number, blob: Uint8Array): void {
    if (!Number.isSafeInteger(at) || at < 0) throw new RangeError(`put: at must be a file offset (got ${show(at)})`);
    addon().diskReadsPut(this.handle(), u32('put', 'index', index), u32('put', 'gen', gen), at, bytesArg('put', 'blob', blob));
  }

  forget(index: number): void {
    if (this.h) addon().diskReadsForget(this.h, u32('forget', 'index', index));
  }

  forgetAll(): void {
    if (this.h) addon().diskReadsForgetAll(this.h);
  }

  /** Plaintext of disk bytes [offset, offset + out.length) into `out`; false (out's bytes undefined) when it cannot serve all of them. */
  read(offset: number, out: Uint8Array): boolean {
    if (!Number.isSafeInteger(offset) || offset < 0) throw new RangeError(`read: offset must be a non-negative integer (got ${show(offset)})`);
    return addon().diskReadsRead(this.handle(), offset, bytesArg('read', 'out', out));
  }

  /**
   * Plaintext bytes [from, from + out.length) of chunk `index` of `gen` from its blob, which
   * the caller checked and keeps (the memory of checked blobs), under the table's class key
   * for `gen`: false when it holds none (then the key ring's).
   */
  decrypt(index: number, gen: number, blob: Uint8Array, from: number, out: Uint8Array): boolean {
    if (!Number.isSafeInteger(from) || from < 0) throw new RangeError(`decrypt: from must be a non-negative integer (got ${show(from)})`);
    return addon().diskReadsDecrypt(this.handle(), u32('decrypt', 'index', index), u32('decrypt', 'gen', gen), bytesArg('decrypt', 'blob', blob), from, bytesArg('decrypt', 'out', out));
  }

  stats(): DiskReadsStats {
    return this.h ? addon().diskReadsStats(this.h) : { chunks: 0, keys: 0, reads: 0, fallbacks: 0, mismatches: 0 };
  }

  /** Zeroes the keys and closes the table's file; later calls other than stats() throw. */
  close(): void {
    if (this.h) addon().diskReadsClose(this.h);
    this.h = null;
  }
}
