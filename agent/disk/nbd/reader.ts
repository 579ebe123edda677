// Exact byte counts off a client's socket, with back-pressure, and the two ways a
// read can end: the client broke the protocol, or the connection ended.
//
// A read into a buffer (a write's payload) takes bytes straight into it as they
// arrive; bytes no read waits for yet are held in between. On a socket made with
// onread() (Node's `onread` option: every read lands in one buffer of ours), the
// bytes held in between go into buffers this reader reuses, so a stream of writes
// allocates nothing per socket read: a fresh 64 KiB buffer for each read was a
// sixth of the agent's time, in the garbage collector, during sequential writes.
import type net from 'node:net';
import * as P from './protocol.js';

/** The client broke the protocol; its connection is closed. */
export class ProtocolError extends Error {}
/** The connection ended (or was told to) while we waited for bytes. */
export class ConnectionEnded extends Error {}

/** Bytes of the buffer an onread socket reads into, and of each buffer bytes are held in. */
const READ_BUFFER_BYTES = 64 * 1024;

/** Bytes received and not yet read: buf[start, end), in one of the reader's reused buffers or in the socket's own. */
interface Held {
  buf: Buffer;
  start: number;
  end: number;
  reused: boolean;
}

const held = (h: Held) => h.buf.subarray(h.start, h.end);

/** Reads exact byte counts from a socket, pausing it while too much is buffered. */
export class ByteReader {
  private chunks: Held[] = [];
  private buffered = 0;
  private want = 0;
  private wake: (() => void) | null = null;
  private ended = false;
  private endedByUs = false;
  /** A readInto() waiting for more bytes: arriving bytes go straight into `dest` at `off`. */
  private target: { dest: Buffer; off: number } | null = null;
  /** Reused buffers for bytes held between reads (onread sockets only); zeroed when handed back. */
  private readonly spare: Buffer[] = [];

  private readonly listeners = {
    data: (d: Buffer) => this.push(d, false),
    end: () => this.peerEnded(),
    close: () => this.peerEnded(),
  };

  /**
   * `onread`, the option for `new net.Socket()` that makes the socket read into one
   * buffer, and `reader`, which makes the reader of that socket (its reads before
   * then are refused: zeroed, and the socket paused).
   */
  static onread(): { reader: (socket: net.Socket) => ByteReader; onread: { buffer: Buffer; callback: (n: number, b: Buffer) => boolean } } {
    const buffer = Buffer.alloc(READ_BUFFER_BYTES);
    let r: ByteReader | null = null;
    return {
      reader: (socket) => (r = new ByteReader(socket, buffer)),
      onread: {
        buffer,
        // Called for every read; false pauses the socket (too much is held).
        callback: (n, b) => (r ? r.push(b.subarray(0, n), true) : (b.fill(0, 0, n), false)),
      },
    };
  }

  /** @param readBuffer the buffer the socket was made to read into (onread; its bytes come through push()), if it was */
  constructor(
    private readonly socket: net.Socket,
    readBuffer?: Buffer,
  ) {
    if (!readBuffer) socket.on('data', this.listeners.data);
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
    const parts = this.chunks.map(held);
    for (let c: Buffer | null; (c = this.socket.read() as Buffer | null) !== null; ) parts.push(c);
    const out = Buffer.concat(parts);
    for (const c of parts) c.fill(0);
    this.dropHeld();
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
   * Reads dest.length bytes into `dest` and zeroes them where they were held: a
   * write's payload then exists only in `dest` (the kernel's socket buffer aside).
   */
  async readInto(dest: Buffer): Promise<void> {
    const n = dest.length;
    let off = this.drainInto(dest, 0);
    if (off < n) {
      // The rest goes straight into dest as it arrives (push()).
      const t = { dest, off };
      this.target = t;
      try {
        while (t.off < n) {
          if (this.endedByUs) throw new ConnectionEnded('connection ended');
          if (this.ended) throw new ProtocolError('connection ended inside a message');
          this.socket.resume();
          await new Promise<void>((r) => (this.wake = r));
        }
      } finally {
        this.target = null;
      }
      off = t.off;
    }
    if (this.buffered < P.READ_HIGH_WATER) this.socket.resume();
  }

  /** Copies held bytes into dest from `off` (zeroing them where they were held); the new offset. */
  private drainInto(dest: Buffer, off: number): number {
    while (off < dest.length && this.chunks.length > 0) off += this.takeInto(dest, off, dest.length - off, true);
    return off;
  }

  /** Up to n held bytes of the oldest part into dest at `off` (zeroed where they were, with `wipe`); how many. */
  private takeInto(dest: Buffer, off: number, n: number, wipe: boolean): number {
    const c = this.chunks[0];
    const k = Math.min(c.end - c.start, n);
    c.buf.copy(dest, off, c.start, c.start + k);
    if (wipe || c.reused) c.buf.fill(0, c.start, c.start + k);
    c.start += k;
    this.buffered -= k;
    if (c.start === c.end) this.release(this.chunks.shift()!);
    return k;
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
    this.dropHeld();
    this.socket.resume();
    this.wakeUp();
  }

  /** The client closed or the socket failed: bytes already here may still be read. */
  peerEnded(): void {
    this.ended = true;
    this.wakeUp();
  }

  /** Zeroes and forgets every held byte. */
  private dropHeld(): void {
    for (const c of this.chunks) {
      c.buf.fill(0, c.start, c.end);
      this.release(c);
    }
    this.chunks = [];
    this.buffered = 0;
  }

  /** A held part fully read: its reused buffer goes back, zeroed. */
  private release(c: Held): void {
    if (!c.reused) return;
    c.buf.fill(0);
    this.spare.push(c.buf);
  }

  /**
   * Bytes off the socket: into a waiting readInto's buffer first, the rest held. With
   * `borrowed` (the onread buffer, read into again next time) they are copied out and
   * zeroed there. Returns whether the socket may go on reading.
   */
  private push(d: Buffer, borrowed: boolean): boolean {
    if (this.endedByUs) {
      d.fill(0);
      return true;
    }
    let at = 0;
    const t = this.target;
    if (t && this.buffered === 0) {
      at = Math.min(d.length, t.dest.length - t.off);
      d.copy(t.dest, t.off, 0, at);
      if (!borrowed) d.fill(0, 0, at);
      t.off += at;
      if (t.off === t.dest.length) this.wakeUp();
    }
    if (!borrowed && at < d.length) {
      this.chunks.push({ buf: d, start: at, end: d.length, reused: false });
      this.buffered += d.length - at;
    }
    while (borrowed && at < d.length) {
      // Onto the newest reused buffer while it has room, else into another.
      let last = this.chunks.at(-1);
      if (!last?.reused || last.end === last.buf.length) {
        last = { buf: this.spare.pop() ?? Buffer.alloc(READ_BUFFER_BYTES), start: 0, end: 0, reused: true };
        this.chunks.push(last);
      }
      const k = Math.min(last.buf.length - last.end, d.length - at);
      d.copy(last.buf, last.end, at, at + k);
      last.end += k;
      at += k;
      this.buffered += k;
    }
    if (borrowed) d.fill(0);
    if (this.buffered >= this.want && this.want > 0) this.wakeUp();
    if (this.buffered >= P.READ_HIGH_WATER && this.buffered >= this.want) {
      if (!borrowed) this.socket.pause();
      return false;
    }
    return true;
  }

  private wakeUp(): void {
    const w = this.wake;
    this.wake = null;
    w?.();
  }

  private take(n: number): Buffer {
    if (n === 0) return Buffer.alloc(0);
    const first = this.chunks[0];
    // A part in a buffer of the socket's own (not reused) can be handed out as it is.
    if (!first.reused && first.end - first.start >= n) {
      const out = first.buf.subarray(first.start, first.start + n);
      first.start += n;
      this.buffered -= n;
      if (first.start === first.end) this.chunks.shift();
      return out;
    }
    const out = Buffer.allocUnsafe(n);
    for (let off = 0; off < n; ) off += this.takeInto(out, off, n - off, false);
    return out;
  }
}
