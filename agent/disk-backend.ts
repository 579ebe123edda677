// The VM disk as a block device over the agent core, for the NBD server.
// Reads decrypt whole 128 KiB chunks; normal-class chunks are kept decrypted
// in a small locked LRU (counted as resident normal plaintext) so that a run
// of small reads does not decrypt the same chunk again and again; sensitive
// chunks are decrypted into transit buffers only, which the NBD server zeroes
// once the reply is on the wire (release()). Writes are read-modify-write per
// chunk, serialized per chunk, and land in the cache as device-encrypted
// dirty chunks; flush() (and FUA) make them durable.
import { DISK_CHUNK_SIZE, DISK_PLAIN_CHUNKS, DISK_TRANSIT_BUFFERS } from '../common/constants.js';
import { secureBuffer, wipe } from '../common/crypto.js';
import type { AgentCore } from './core.js';
import { BufferPool } from './buffer-pool.js';


export class AgentDiskBackend {
  readonly size: number;
  private readonly plain = new Map<number, Buffer>();
  private readonly locks = new Map<number, Promise<void>>();
  /** Transit buffers for sensitive reads and for read-modify-write: concurrent requests each get their own. */
  private readonly transit = new BufferPool(DISK_TRANSIT_BUFFERS, DISK_CHUNK_SIZE);
  /** The LRU's slots, carved from one sodium_malloc slab (one allocation, not one per chunk). */
  private readonly slab: Buffer;
  private readonly freeSlots: Buffer[] = [];

  constructor(
    private readonly core: AgentCore,
    private readonly lruChunks = DISK_PLAIN_CHUNKS,
  ) {
    this.size = core.sizeOf('disk');
    const slots = Math.max(0, Math.min(lruChunks, Math.ceil(this.size / DISK_CHUNK_SIZE)));
    this.slab = secureBuffer(Math.max(1, slots) * DISK_CHUNK_SIZE);
    for (let i = 0; i < slots; i++) this.freeSlots.push(this.slab.subarray(i * DISK_CHUNK_SIZE, (i + 1) * DISK_CHUNK_SIZE));
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

  /** Calls `use` with the plaintext of a chunk; the buffer is only valid during the call. */
  private async withChunk<T>(index: number, use: (plain: Buffer) => T): Promise<T> {
    const hit = this.plain.get(index);
    if (hit) {
      this.plain.delete(index);
      this.plain.set(index, hit);
      return use(hit);
    }
    const e = this.core.entry('disk', index);
    const len = this.chunkLen(index);
    if (e && e.cls === 'normal' && this.lruChunks > 0) {
      if (this.freeSlots.length === 0) {
        const [old, b] = this.plain.entries().next().value as [number, Buffer];
        this.forget(old, b);
      }
      const buf = this.freeSlots.pop()!.subarray(0, len);
      try {
        await this.core.readInto('disk', index, buf, { resident: true });
      } catch (err) {
        this.freeSlots.push(Buffer.from(buf.buffer, buf.byteOffset, DISK_CHUNK_SIZE));
        throw err;
      }
      const raced = this.plain.get(index);
      if (raced) {
        // Another read of the same chunk finished first: keep one copy.
        wipe(buf);
        this.freeSlots.push(Buffer.from(buf.buffer, buf.byteOffset, DISK_CHUNK_SIZE));
        return use(raced);
      }
      this.plain.set(index, buf);
      return use(buf);
    }
    return this.transit.with(len, async (out) => {
      await this.core.readInto('disk', index, out);
      return use(out);
    });
  }

  private forget(index: number, b: Buffer): void {
    this.plain.delete(index);
    wipe(b);
    this.freeSlots.push(Buffer.from(b.buffer, b.byteOffset, DISK_CHUNK_SIZE));
    this.core.evict('disk', index);
  }

  /** Drops every decrypted chunk (lease expiry, wipe, stop). */
  dropPlaintext(): void {
    for (const [i, b] of [...this.plain]) this.forget(i, b);
  }

  /** Reply buffers that carry sensitive plaintext: zeroed by release() once sent. */
  private readonly sensitiveReplies = new WeakSet<Buffer>();

  async read(offset: number, length: number): Promise<Buffer> {
    // Not from Buffer's shared pool: a reply may carry plaintext, and is zeroed on its own.
    const out = Buffer.allocUnsafeSlow(length);
    let pos = offset;
    while (pos < offset + length) {
      const index = Math.floor(pos / DISK_CHUNK_SIZE);
      const within = pos - index * DISK_CHUNK_SIZE;
      const n = Math.min(this.chunkLen(index) - within, offset + length - pos);
      // A read overlapping a write in progress waits for it.
      const busy = this.locks.get(index);
      if (busy) await busy;
      const e = this.core.entry('disk', index);
      if (!e) out.fill(0, pos - offset, pos - offset + n);
      else {
        if (e.cls === 'sensitive') this.sensitiveReplies.add(out);
        await this.withChunk(index, (plain) => plain.copy(out, pos - offset, within, within + n));
      }
      pos += n;
    }
    return out;
  }

  /** Zeroes a reply buffer that carried sensitive plaintext, once it has been sent. */
  release(buf: Buffer): void {
    if (this.sensitiveReplies.has(buf)) wipe(buf);
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
        this.transit.with(len, async (next) => {
          if (n < len) await this.withChunk(index, (plain) => plain.copy(next));
          data.copy(next, within, from, from + n);
          await this.core.write('disk', index, next);
          const cached = this.plain.get(index);
          if (cached) next.copy(cached);
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
    this.dropPlaintext();
    this.transit.destroy();
    wipe(this.slab);
  }
}
