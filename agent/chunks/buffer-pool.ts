// Fixed pools of locked scratch buffers carved from one sodium_malloc slab.
// Plaintext passes through them on the hot paths (NBD reads and writes, page
// faults); one allocation up front instead of one per operation, since each
// sodium_malloc costs four mappings until the collector frees it, and a burst
// of them can exhaust the process's mappings (sodium-native then aborts).
// A pool that only ever holds ciphertext (the seal buffers) is plain memory
// instead, and is not wiped.
import { secureBuffer, wipe } from '../../common/crypto.js';

export class BufferPool {
  private readonly slab: Buffer;
  private readonly free: Buffer[] = [];
  private readonly waiters: ((b: Buffer) => void)[] = [];

  /** Whether give() zeroes what it takes back. */
  private readonly wipes: boolean;

  /**
   * A pool with `ciphertextOnly` never holds plaintext or a key: its slab is plain
   * memory, not locked, and give() does not zero it (a 128 KiB wipe a chunk written).
   */
  constructor(
    readonly count: number,
    readonly size: number,
    opts: { ciphertextOnly?: boolean } = {},
  ) {
    this.wipes = !opts.ciphertextOnly;
    this.slab = opts.ciphertextOnly ? Buffer.alloc(count * size) : secureBuffer(count * size);
    wipe(this.slab); // sodium_malloc fills with 0xdb; give() keeps every free buffer zero from here
    for (let i = 0; i < count; i++) this.free.push(this.slab.subarray(i * size, (i + 1) * size));
  }

  /** A whole buffer of `size` bytes; waits while all are in use. */
  take(): Promise<Buffer> {
    const b = this.free.pop();
    return b ? Promise.resolve(b) : new Promise((r) => this.waiters.push(r));
  }

  /** A whole buffer of `size` bytes if one is free now, or undefined. */
  tryTake(): Buffer | undefined {
    return this.free.pop();
  }

  /** A whole buffer of `size` bytes, or undefined when none came free within `ms`. */
  takeWithin(ms: number): Promise<Buffer | undefined> {
    const b = this.free.pop();
    if (b) return Promise.resolve(b);
    return new Promise((resolve) => {
      const waiter = (got: Buffer) => {
        clearTimeout(timer);
        resolve(got);
      };
      const timer = setTimeout(() => {
        this.waiters.splice(this.waiters.indexOf(waiter), 1);
        resolve(undefined);
      }, ms);
      this.waiters.push(waiter);
    });
  }

  /** True for a buffer from this pool, or a view of one, which give() takes back. */
  owns(b: Buffer): boolean {
    return b.buffer === this.slab.buffer && b.byteOffset >= this.slab.byteOffset && b.byteOffset < this.slab.byteOffset + this.slab.length;
  }

  /**
   * Zeroes a buffer from this pool (unless it holds only ciphertext), or the view of
   * one that was handed out (its whole buffer goes back), and hands it on. Only the
   * view is zeroed: a holder writes within the view it took, and the rest is still zero
   * from the last give() (or from the start). A 4 KiB reply in a 256 KiB buffer costs a
   * 4 KiB wipe, not 256 KiB.
   */
  give(b: Buffer): void {
    const at = b.byteOffset - this.slab.byteOffset;
    const start = at - (at % this.size);
    const whole = start === at && b.length === this.size ? b : this.slab.subarray(start, start + this.size);
    if (this.wipes) wipe(b);
    const w = this.waiters.shift();
    if (w) w(whole);
    else this.free.push(whole);
  }

  /** Runs `fn` with a buffer of `length` bytes (≤ size), returned after (zeroed, unless ciphertext only). */
  async with<T>(length: number, fn: (buf: Buffer) => Promise<T> | T): Promise<T> {
    const b = await this.take();
    try {
      return await fn(b.subarray(0, length));
    } finally {
      this.give(b);
    }
  }

  destroy(): void {
    wipe(this.slab);
  }
}
