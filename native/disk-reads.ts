// The disk's warm-read table in native code (native/disk-reads.cc, docs/nbd.md "Reads
// in native code"), typed and with every argument checked before it reaches C.
// Normal-class disk chunks whose tag the agent checked are put in with the slot their
// ciphertext lies in; a read of them then preads, checks and decrypts only the 4 KiB
// pieces it covers, in one call. A read it cannot serve answers false, and the caller
// reads through the chunk core as before: this table only ever refuses.
import { randomBytes } from 'node:crypto';
import { AD_CHUNK, CLASS_CODE, DISK_CHUNK_SIZE, KDF_CHUNK_NORMAL, KIND_CODE, NBD_PROXY_READERS } from '../common/constants.js';
import { LetheError } from '../common/errors.js';
import { addon, bytesArg, fdArg, show, type DiskReadsHandle, type DiskReadsStats, type NbdProxyHandle } from './addon.js';

export type { DiskReadsStats } from './addon.js';

/**
 * The magic of a LENT message from the NBD read proxy (nbd-proxy.cc names the same): in
 * place of a write request's magic, followed by the index (32 bits) of the write buffer
 * that holds its payload (NbdReadProxy.lentPayload).
 */
export const NBD_PROXY_WRITE_MAGIC = 0x4c455457;
/** The index after a LENT message's request header. */
export const NBD_PROXY_LENT_INDEX_BYTES = 4;

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

/** The NBD read proxies' locked buffers (NativeDiskReads' constructor says what each is). */
export type ProxyBuffers = { replies: number; maxRead: number; copyBytes: number; writes: number };

export class NativeDiskReads {
  private h: DiskReadsHandle | null;
  /** Views of the write buffers, made once: each keeps the table's memory alive while it lives. */
  private writeViews?: Buffer[];

  /**
   * A table over the disk slot file `fd` (duplicated: the caller keeps its own).
   * `pieceKey` keys the tags of the chunks' 4 KiB pieces; `keyLabel` and `kind` are the chunk-key
   * derivation's (common/chunk.ts chunkKeyInto), `adLabel`, `kind` and `cls` the chunk
   * AEAD's associated data (chunkAd); at most `maxChunks` chunks are kept. The NBD read
   * proxies (proxy()) share `proxy.replies` locked reply buffers of `proxy.maxRead`
   * bytes, and `proxy.writes` locked buffers of as many bytes for writes' payloads, which
   * they lend to JavaScript; each of their threads passes other payloads through
   * `proxy.copyBytes` of its own.
   */
  constructor(
    fd: number,
    opts: {
      pieceKey: Uint8Array;
      keyLabel: Uint8Array;
      adLabel: Uint8Array;
      kind: number;
      cls: number;
      chunkSize: number;
      maxChunks: number;
      proxy?: ProxyBuffers;
    },
  ) {
    const fn = 'NativeDiskReads';
    fdArg(fn, 'fd', fd);
    const pieceKey = exactly(fn, 'pieceKey', opts.pieceKey, KEY_BYTES);
    const keyLabel = bytesArg(fn, 'keyLabel', opts.keyLabel);
    const adLabel = bytesArg(fn, 'adLabel', opts.adLabel);
    if (keyLabel.byteLength > MAX_LABEL_BYTES || adLabel.byteLength > MAX_LABEL_BYTES) throw new RangeError(`${fn}: labels must be at most ${MAX_LABEL_BYTES} bytes`);
    for (const [name, v] of [['kind', opts.kind], ['cls', opts.cls]] as const) {
      if (!Number.isInteger(v) || v < 0 || v > 255) throw new RangeError(`${fn}: ${name} must be a byte (got ${show(v)})`);
    }
    if (u32(fn, 'chunkSize', opts.chunkSize) === 0 || opts.chunkSize % 4096 !== 0) throw new RangeError(`${fn}: chunkSize must be a positive multiple of 4096`);
    u32(fn, 'maxChunks', opts.maxChunks);
    const px = opts.proxy ?? { replies: 0, maxRead: 0, copyBytes: 4096, writes: 0 };
    if (!Number.isInteger(px.replies) || px.replies < 0 || px.replies > 64) throw new RangeError(`${fn}: proxy.replies must be 0 to 64 (got ${show(px.replies)})`);
    if (!Number.isInteger(px.writes) || px.writes < 0 || px.writes > 64) throw new RangeError(`${fn}: proxy.writes must be 0 to 64 (got ${show(px.writes)})`);
    if (px.writes > 0 && px.maxRead === 0) throw new RangeError(`${fn}: proxy.writes needs proxy.maxRead, their size`);
    if (!Number.isInteger(px.maxRead) || px.maxRead < 0 || px.maxRead > 1 << 24) throw new RangeError(`${fn}: proxy.maxRead must be 0 to 16 MiB (got ${show(px.maxRead)})`);
    if (!Number.isInteger(px.copyBytes) || px.copyBytes <= 0 || px.copyBytes > 1 << 20) throw new RangeError(`${fn}: proxy.copyBytes must be 1 byte to 1 MiB (got ${show(px.copyBytes)})`);
    try {
      this.h = addon().diskReadsOpen(fd, pieceKey, keyLabel, adLabel, opts.kind, opts.cls, opts.chunkSize, opts.maxChunks, px.replies, px.maxRead, px.copyBytes, px.writes);
    } catch (e) {
      throw new LetheError('INTERNAL', `cannot open the native disk-read table on fd ${fd}`, { cause: e });
    }
  }

  /**
   * A table for normal-class disk chunks as common/chunk.ts makes them (its key
   * derivation, associated data and chunk size), its piece tags keyed by a key drawn
   * now, copied into the table and zeroed here.
   */
  static forDiskChunks(fd: number, opts: { maxChunks: number; proxy?: ProxyBuffers }): NativeDiskReads {
    const pieceKey = randomBytes(KEY_BYTES);
    try {
      return new NativeDiskReads(fd, {
        pieceKey,
        keyLabel: Buffer.from(KDF_CHUNK_NORMAL, 'utf8'),
        adLabel: Buffer.from(AD_CHUNK, 'utf8'),
        kind: KIND_CODE.disk,
        cls: CLASS_CODE.normal,
        chunkSize: DISK_CHUNK_SIZE,
        ...opts,
      });
    } finally {
      pieceKey.fill(0);
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

  /** Whether chunk `index` of generation `gen` is in the table. */
  has(index: number, gen: number): boolean {
    return this.h !== null && addon().diskReadsHas(this.h, u32('has', 'index', index), u32('has', 'gen', gen));
  }

  forget(index: number): void {
    if (this.h) addon().diskReadsForget(this.h, u32('forget', 'index', index));
  }

  forgetAll(): void {
    if (this.h) addon().diskReadsForgetAll(this.h);
  }

  /**
   * Plaintext of disk bytes [offset, offset + out.length) into `out`; false (out's bytes
   * undefined) when it cannot serve all of them. With `admit`, a chunk whose place the
   * table was told (lies()) is admitted first on this thread, as the NBD read proxy's
   * threads do: not for the event loop, which admits with admit().
   */
  read(offset: number, out: Uint8Array, opts: { admit?: boolean } = {}): boolean {
    if (!Number.isSafeInteger(offset) || offset < 0) throw new RangeError(`read: offset must be a non-negative integer (got ${show(offset)})`);
    return addon().diskReadsRead(this.handle(), offset, bytesArg('read', 'out', out), opts.admit === true);
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

  /**
   * A chunk's first read, off the event loop: on a pool thread the table reads the blob of
   * chunk `index` of `gen` (blobLen bytes) lying at byte `at` of the file, checks its tag
   * under its class key, puts the chunk in, and decrypts plaintext bytes [from, from +
   * out.length) into `out` (which the caller must leave alone until this settles). False
   * (nothing put in, out's bytes undefined) when it cannot: no class key, a short file, a
   * blob that fails its check, or the chunk forgotten meanwhile; the caller then reads the
   * chunk itself, which drops a damaged blob and fetches it again.
   */
  admit(index: number, gen: number, at: number, blobLen: number, from: number, out: Uint8Array): Promise<boolean> {
    if (!Number.isSafeInteger(at) || at < 0) throw new RangeError(`admit: at must be a file offset (got ${show(at)})`);
    return addon().diskReadsAdmit(this.handle(), u32('admit', 'index', index), u32('admit', 'gen', gen), at, u32('admit', 'blobLen', blobLen), u32('admit', 'from', from), bytesArg('admit', 'out', out));
  }

  /**
   * Where the blob of chunk `index` of `gen` lies (blobLen bytes at byte `at` of the file),
   * a chunk the caller would put in once it checked it: the NBD read proxy admits it at its
   * first read on its own thread, as admit() does, with no call into JavaScript. The place
   * is dropped with the chunk (forget(), a new image) and when its admission is refused.
   * False when the table knows the place of as many chunks as it may (4 × maxChunks).
   */
  lies(index: number, gen: number, at: number, blobLen: number): boolean {
    if (!Number.isSafeInteger(at) || at < 0) throw new RangeError(`lies: at must be a file offset (got ${show(at)})`);
    if (!this.h) return false;
    return addon().diskReadsLies(this.h, u32('lies', 'index', index), u32('lies', 'gen', gen), at, u32('lies', 'blobLen', blobLen));
  }

  stats(): DiskReadsStats {
    return this.h ? addon().diskReadsStats(this.h) : { chunks: 0, keys: 0, reads: 0, fallbacks: 0, mismatches: 0, admits: 0, refused: 0, placed: 0, writesOut: 0 };
  }

  /**
   * Starts the NBD read proxy on a connection whose handshake is done (native/nbd-proxy.cc):
   * reads this table can serve are answered on the client's socket `fd` (duplicated) by a
   * native thread; everything else comes out of the returned socket-pair fd, byte for byte,
   * and replies written to it go to the client whole. `leftover` is what the handshake read
   * past its end. Reads are served only when in [0, size), at most the table's
   * `proxy.maxRead` bytes long, and while one of its reply buffers is free. A write's
   * payload comes in one of the table's write buffers when one is free (a LENT message).
   */
  proxy(fd: number, leftover: Uint8Array, opts: { structured: boolean; size: number }): NbdReadProxy {
    fdArg('proxy', 'fd', fd);
    if (!Number.isSafeInteger(opts.size) || opts.size < 0) throw new RangeError(`proxy: size must be a byte count (got ${show(opts.size)})`);
    try {
      const h0 = this.handle();
      this.writeViews ??= addon().diskReadsWriteBuffers(h0);
      const [h, inner] = addon().nbdProxyStart(h0, fd, bytesArg('proxy', 'leftover', leftover), opts.structured === true, opts.size, NBD_PROXY_READERS);
      return new NbdReadProxy(h, inner, this.writeViews);
    } catch (e) {
      if (e instanceof LetheError) throw e;
      throw new LetheError('INTERNAL', `cannot start the NBD read proxy on fd ${fd}`, { cause: e });
    }
  }

  /** Zeroes the keys and closes the table's file; later calls other than stats() throw. */
  close(): void {
    if (this.h) addon().diskReadsClose(this.h);
    this.h = null;
  }
}

/**
 * A connection's native read proxy: its socket-pair end for JavaScript, the write buffers
 * it lends, what it served, and how to stop it.
 */
export class NbdReadProxy {
  private readonly h: NbdProxyHandle;

  constructor(
    h: NbdProxyHandle,
    /** JavaScript's end of the socket pair (its to own: wrap it in a net.Socket). */
    readonly fd: number,
    private readonly writeViews: readonly Buffer[],
  ) {
    this.h = h;
  }

  /**
   * The payload of a LENT message: `length` bytes of write buffer `i`, JavaScript's until
   * giveWrite(i). Throws for an index or a length no write buffer has.
   */
  lentPayload(i: number, length: number): Buffer {
    const b = this.writeViews[i];
    if (!b || !Number.isInteger(length) || length <= 0 || length > b.length) {
      throw new LetheError('INTERNAL', `the NBD read proxy lent write buffer ${show(i)} of ${show(length)} bytes, which it does not have`);
    }
    return b.subarray(0, length);
  }

  /** Write buffer i back to the proxy, which zeroes it; false (nothing done) if this proxy did not lend it, or it came back already. */
  giveWrite(i: number): boolean {
    return addon().nbdProxyGiveWrite(this.h, i);
  }

  /** Reads answered by the proxy, and their bytes. */
  stats(): { reads: number; bytes: number } {
    return addon().nbdProxyStats(this.h);
  }

  /**
   * Shuts both of its sockets: its threads end, and the client sees the connection end.
   * Buffers it lent that are not in `held` (those JavaScript still writes from, to give
   * back later) are zeroed and freed: their LENT messages were never read.
   */
  close(held: Iterable<number> = []): void {
    addon().nbdProxyClose(this.h, [...held]);
  }
}
