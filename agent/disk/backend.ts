// The VM disk as a block device over the agent core, for the NBD server.
// A read decrypts exactly the bytes asked for (AgentCore.readRange: a chunk's
// tag is checked once, and the checked ciphertext is kept in memory), into a
// locked reply buffer that the NBD server hands back through release() once
// the reply is on the wire; release() zeroes it. No disk plaintext outlives
// its reply, of either class. A write's payload arrives in a buffer of the
// same pool (payload()), zeroed once the write is done. Writes are
// read-modify-write per chunk, serialized per chunk, and land in the cache as
// device-encrypted dirty chunks; flush() (and FUA) make them durable.
import { DISK_CHUNK_SIZE, DISK_LARGE_BUFFER_BYTES, DISK_REPLY_BUFFER_BYTES, DISK_REPLY_BUFFERS, DISK_TRANSIT_BUFFERS } from '../../common/constants.js';
import type { AgentCore } from '../chunks/core.js';
import { BufferPool } from '../chunks/buffer-pool.js';
import type { NativeDiskReads } from '../../native/disk-reads.js';

/** How long a request waits for a pooled buffer before it waits for the large one instead. */
const REPLY_WAIT_MS = 100;

export class AgentDiskBackend {
  readonly size: number;
  private readonly locks = new Map<number, Promise<void>>();
  /** Transit buffers for read-modify-write: concurrent writes each get their own. */
  private readonly transit = new BufferPool(DISK_TRANSIT_BUFFERS, DISK_CHUNK_SIZE);
  /**
   * Reply buffers for reads, and buffers for write payloads. A longer request, or one
   * that finds none free within REPLY_WAIT_MS, waits for the one large buffer instead.
   */
  private readonly replies = new BufferPool(DISK_REPLY_BUFFERS, DISK_REPLY_BUFFER_BYTES);
  /** One locked buffer of the largest NBD payload, made the first time it is needed. */
  private large?: BufferPool;

  constructor(private readonly core: AgentCore) {
    this.size = core.sizeOf('disk');
  }

  private chunkLen(index: number): number {
    return Math.min(DISK_CHUNK_SIZE, this.size - index * DISK_CHUNK_SIZE);
  }

  /** Runs `fn` with chunk `index` locked against concurrent read-modify-write. */
  private async locked<T>(index: number, fn: () => Promise<T>): Promise<T> {
    const prev = this.locks.get(index) ?? Promise.resolve();
    let release!: () => void;
    const mine = new Promise<void>((r) => (release = r));
    const chained = prev.then(() => mine);
    this.locks.set(index, chained);
    await prev;
    try {
      return await fn();
    } finally {
      release();
      if (this.locks.get(index) === chained) this.locks.delete(index);
    }
  }

  /** The chunks bytes [offset, offset + length) lie in: each one's index, where in it, how many bytes, and where in the range. */
  private *parts(offset: number, length: number): Generator<{ index: number; within: number; n: number; at: number }> {
    for (let pos = offset; pos < offset + length; ) {
      const index = Math.floor(pos / DISK_CHUNK_SIZE);
      const within = pos - index * DISK_CHUNK_SIZE;
      const n = Math.min(this.chunkLen(index) - within, offset + length - pos);
      yield { index, within, n, at: pos - offset };
      pos += n;
    }
  }

  /** Plaintext of bytes [offset, offset + length), in a buffer to hand back through release(). */
  async read(offset: number, length: number): Promise<Buffer> {
    // The NBD server checks ranges first; this keeps any other caller from looping.
    if (offset < 0 || length < 0 || offset + length > this.size) throw new RangeError(`read of ${length} bytes at ${offset} is outside the ${this.size}-byte disk`);
    const out = await this.buffer(length);
    const parts: Promise<unknown>[] = [];
    for (const { index, within, n, at } of this.parts(offset, length)) {
      const into = out.subarray(at, at + n);
      // A read overlapping a write in progress waits for it.
      const busy = this.locks.get(index);
      parts.push(busy ? busy.then(() => this.core.readRange('disk', index, within, into)) : this.core.readRange('disk', index, within, into));
    }
    try {
      await Promise.all(parts);
    } catch (e) {
      await Promise.allSettled(parts);
      this.release(out);
      throw e;
    }
    return out;
  }

  /**
   * read() without waiting for anything (AgentCore.readRangeNow: a kept blob, or the
   * native table), when no write to those chunks is in progress and a reply buffer is
   * free: the bytes, or undefined.
   */
  readNow(offset: number, length: number): Buffer | undefined {
    if (length === 0 || length > DISK_REPLY_BUFFER_BYTES || offset < 0 || offset + length > this.size) return undefined;
    const slot = this.replies.tryTake();
    if (!slot) return undefined;
    const out = slot.subarray(0, length);
    for (const { index, within, n, at } of this.parts(offset, length)) {
      if (this.locks.has(index) || !this.core.readRangeNow(index, within, out.subarray(at, at + n))) {
        this.replies.give(out);
        return undefined;
      }
    }
    return out;
  }

  /** The core's native disk-read table, for the NBD read proxy. */
  readTable(): NativeDiskReads {
    return this.core.readTable;
  }

  /**
   * A locked buffer for a write's payload, which the NBD server reads off the socket;
   * it comes back through release() once the write is done. Taken as read() takes
   * its reply buffer: the same plaintext, the same short life.
   */
  payload(length: number): Promise<Buffer> {
    return this.buffer(length);
  }

  /**
   * A locked buffer of `length` bytes: a pooled one, or the large one. Locked memory
   * stays bounded: libsodium unlocks a freed buffer only when the collector runs, so
   * none is made per request. A client that does not take its replies can hold the
   * pool, but not every other request: they go through the large buffer in turn.
   */
  private async buffer(length: number): Promise<Buffer> {
    const slot = length <= DISK_REPLY_BUFFER_BYTES ? await this.replies.takeWithin(REPLY_WAIT_MS) : undefined;
    if (slot) return slot.subarray(0, length);
    this.large ??= new BufferPool(1, DISK_LARGE_BUFFER_BYTES);
    return (await this.large.take()).subarray(0, length);
  }

  /** Zeroes a buffer read() or payload() returned, once its reply has been sent (or has failed), and hands it on. */
  release(buf: Buffer): void {
    if (this.replies.owns(buf)) this.replies.give(buf);
    else if (this.large?.owns(buf)) this.large.give(buf);
    else throw new Error('release() of a buffer this backend did not hand out');
  }

  async write(offset: number, data: Buffer, fua: boolean): Promise<void> {
    let pos = offset;
    while (pos < offset + data.length) {
      const index = Math.floor(pos / DISK_CHUNK_SIZE);
      const within = pos - index * DISK_CHUNK_SIZE;
      const len = this.chunkLen(index);
      const n = Math.min(len - within, offset + data.length - pos);
      const from = pos - offset;
      await this.locked(index, () =>
        n === len
          ? // A whole chunk is written from the payload itself (locked, and zeroed on release).
            this.core.write('disk', index, data.subarray(from, from + n))
          : this.transit.with(len, async (next) => {
              await this.core.readRange('disk', index, 0, next);
              data.copy(next, within, from, from + n);
              await this.core.write('disk', index, next);
            }),
      );
      pos += n;
    }
    if (fua) this.core.flush();
  }

  async flush(): Promise<void> {
    await Promise.all([...this.locks.values()]);
    this.core.flush();
  }

  async writeZeroes(offset: number, length: number, fua: boolean): Promise<void> {
    const step = 4 * DISK_CHUNK_SIZE;
    for (let pos = offset; pos < offset + length; pos += step) {
      await this.write(pos, Buffer.alloc(Math.min(step, offset + length - pos)), false);
    }
    if (fua) this.core.flush();
  }

  /** Trimmed ranges read back as zeros (the chunk is written as zeros). */
  async trim(offset: number, length: number): Promise<void> {
    await this.writeZeroes(offset, length, false);
  }

  close(): void {
    this.transit.destroy();
    this.replies.destroy();
    this.large?.destroy();
  }
}
