// Exact byte counts off a client's socket, with back-pressure, and the two ways a
// read can end: the client broke the protocol, or the connection ended.
import type net from 'node:net';
import * as P from './protocol.js';

/** The client broke the protocol; its connection is closed. */
export class ProtocolError extends Error {}
/** The connection ended (or was told to) while we waited for bytes. */
export class ConnectionEnded extends Error {}

/** Reads exact byte counts from a socket, pausing it while too much is buffered. */
export class ByteReader {
  private chunks: Buffer[] = [];
  private buffered = 0;
  private want = 0;
  private wake: (() => void) | null = null;
  private ended = false;
  private endedByUs = false;

  private readonly listeners = {
    data: (d: Buffer) => this.push(d),
    end: () => this.peerEnded(),
    close: () => this.peerEnded(),
  };

  constructor(private readonly socket: net.Socket) {
    socket.on('data', this.listeners.data);
    socket.on('end', this.listeners.end);
    socket.on('close', this.listeners.close);
  }

  /**
   * Stops reading the socket for good and hands over every byte it received and no
   * read took: what was buffered here and in the socket's stream. The caller zeroes them.
   */
  detach(): Buffer {
    this.socket.off('data', this.listeners.data);
    this.socket.off('end', this.listeners.end);
    this.socket.off('close', this.listeners.close);
    this.socket.pause();
    // libuv stops reading the fd (a paused stream still reads up to its high-water mark).
    // The handle still says it is reading, so read() below takes what the stream holds
    // without starting it again.
    (this.socket as unknown as { _handle?: { readStop?: () => number; reading?: boolean } | null })._handle?.readStop?.();
    const parts = this.chunks;
    for (let c: Buffer | null; (c = this.socket.read() as Buffer | null) !== null; ) parts.push(c);
    const out = Buffer.concat(parts);
    for (const c of parts) c.fill(0);
    this.chunks = [];
    this.buffered = 0;
    this.endedByUs = true;
    this.ended = true;
    this.wakeUp();
    return out;
  }

  /**
   * Reads n bytes. If the stream ends first, throws ConnectionEnded when that
   * is a clean ending (`atBoundary`: n starts a message and none of it came,
   * or we ended it) and ProtocolError when a message was cut short.
   */
  async read(n: number, atBoundary = false): Promise<Buffer> {
    await this.until(n, atBoundary);
    const out = this.take(n);
    if (this.buffered < P.READ_HIGH_WATER) this.socket.resume();
    return out;
  }

  /**
   * Reads dest.length bytes into `dest` and zeroes them where Node read them: a
   * write's payload then exists only in `dest` (the kernel's socket buffer aside).
   */
  async readInto(dest: Buffer): Promise<void> {
    const n = dest.length;
    await this.until(n, false);
    this.buffered -= n;
    for (let off = 0; off < n; ) {
      const c = this.chunks[0];
      const k = Math.min(c.length, n - off);
      c.copy(dest, off, 0, k);
      c.fill(0, 0, k);
      off += k;
      if (k === c.length) this.chunks.shift();
      else this.chunks[0] = c.subarray(k);
    }
    if (this.buffered < P.READ_HIGH_WATER) this.socket.resume();
  }

  /** Waits until n bytes are buffered; throws as read() says when the stream ends first. */
  private async until(n: number, atBoundary: boolean): Promise<void> {
    while (this.buffered < n) {
      if (this.endedByUs || (this.ended && atBoundary && this.buffered === 0)) throw new ConnectionEnded('connection ended');
      if (this.ended) throw new ProtocolError('connection ended inside a message');
      this.want = n;
      this.socket.resume();
      await new Promise<void>((r) => (this.wake = r));
    }
    this.want = 0;
  }

  /** Consumes n bytes (a refused write's payload) without holding more than 64 KiB of them, zeroing them. */
  async skip(n: number): Promise<void> {
    const scratch = Buffer.alloc(Math.min(n, 64 * 1024));
    for (let left = n; left > 0; ) {
      const k = Math.min(left, scratch.length);
      await this.readInto(scratch.subarray(0, k));
      left -= k;
    }
    scratch.fill(0);
  }

  /**
   * Stops delivering bytes: a pending or later read throws ConnectionEnded.
   * The socket keeps flowing (bytes zeroed and dropped) so the client's close is
   * seen. What was buffered is zeroed: it may be part of a write's payload.
   */
  end(): void {
    this.endedByUs = true;
    this.ended = true;
    for (const c of this.chunks) c.fill(0);
    this.chunks = [];
    this.buffered = 0;
    this.socket.resume();
    this.wakeUp();
  }

  /** The client closed or the socket failed: bytes already here may still be read. */
  peerEnded(): void {
    this.ended = true;
    this.wakeUp();
  }

  private push(d: Buffer): void {
    if (this.endedByUs) return void d.fill(0);
    this.chunks.push(d);
    this.buffered += d.length;
    if (this.buffered >= this.want) this.wakeUp();
    if (this.buffered >= P.READ_HIGH_WATER && this.buffered >= this.want) this.socket.pause();
  }

  private wakeUp(): void {
    const w = this.wake;
    this.wake = null;
    w?.();
  }

  private take(n: number): Buffer {
    this.buffered -= n;
    const first = this.chunks[0];
    if (n === 0) return Buffer.alloc(0);
    if (first.length >= n) {
      if (first.length === n) this.chunks.shift();
      else this.chunks[0] = first.subarray(n);
      return first.subarray(0, n);
    }
    const out = Buffer.allocUnsafe(n);
    for (let off = 0; off < n; ) {
      const c = this.chunks[0];
      const k = Math.min(c.length, n - off);
      c.copy(out, off, 0, k);
      off += k;
      if (k === c.length) this.chunks.shift();
      else this.chunks[0] = c.subarray(k);
    }
    return out;
  }
}

