// One client's connection, from greeting to close: the handshake (handshake.ts),
// then transmission: requests read, checked against proto.md, run on the export's
// backend with many in flight, and answered whole, in simple or structured replies.
import net from 'node:net';
import { NBD_PROXY_LENT_INDEX_BYTES, NBD_PROXY_WRITE_MAGIC, socketFd, type NbdReadProxy } from '../../../native/index.js';
import { errorChain } from '../../../common/errors.js';
import { Handshake } from './handshake.js';
import { ALLOWED_FLAGS, ERROR_NAMES, messageBytes, nbdError, parseRequest, simpleReply, structuredHeader } from './messages.js';
import { ByteReader, ConnectionEnded, ProtocolError } from './reader.js';
import type { BlockBackend, Export, Problem, Request, ServerSide } from './types.js';
import * as P from './protocol.js';

let nextConnectionId = 1;

/** One client, from greeting to close. */
export class Connection {
  readonly id = nextConnectionId++;
  private reader: ByteReader;
  /** The client's socket; once the read proxy runs, the socket pair to it (and the client's is `outer`). */
  private socket: net.Socket;
  private outer: net.Socket | null = null;
  private proxy: NbdReadProxy | null = null;
  /**
   * The proxy whose write buffers this connection writes from: still there once it has
   * closed (`proxy` is then null), for the writes in flight to give theirs back.
   * `lentHeld`: the buffers this connection took (from LENT messages) and has not given back.
   */
  private lender: NbdReadProxy | null = null;
  private readonly lentHeld = new Set<number>();
  private structured = false;
  private export: Export | null = null;
  private readonly handlers = new Set<Promise<void>>();
  /** Resolvers of replies not yet flushed; all resolved when the socket closes. */
  private readonly unsent = new Set<() => void>();
  private inFlightBytes = 0;
  private slotFreed: (() => void) | null = null;
  private shuttingDown = false;

  constructor(
    socket: net.Socket,
    private readonly srv: ServerSide,
  ) {
    this.socket = socket;
    this.reader = this.attach(socket);
    socket.setNoDelay(true);
  }

  /** Reads and answers requests on `socket` from here on (with `reader`, if it was made with the socket). */
  private attach(socket: net.Socket, reader = new ByteReader(socket)): ByteReader {
    socket.on('error', () => reader.peerEnded());
    socket.on('close', () => {
      for (const r of this.unsent) r();
      this.unsent.clear();
    });
    return reader;
  }

  /** Reads the proxy has answered (native) and not yet added to the server's counters, and their bytes. */
  proxied(): { reads: number; bytes: number } {
    return this.proxy?.stats() ?? { reads: 0, bytes: 0 };
  }

  /**
   * Hands the client's socket to the native read proxy (native/nbd-proxy.cc) when the
   * export's backend has a disk-read table: reads the table can serve are answered
   * there and never reach JavaScript; every other request comes here as before, through
   * a socket pair, and the replies written to it go to the client whole.
   */
  private startProxy(): void {
    const table = this.export!.backend.readTable?.();
    const fd = table ? socketFd(this.socket) : null;
    if (!table || fd === null) return;
    const outer = this.socket;
    const leftover = this.reader.detach();
    try {
      this.proxy = table.proxy(fd, leftover, { structured: this.structured, size: this.export!.backend.size });
    } finally {
      leftover.fill(0);
    }
    // Writes' payloads come this way: read into one buffer, not a new one a read.
    const { reader, onread } = ByteReader.onread();
    const inner = new net.Socket({ fd: this.proxy.fd, readable: true, writable: true, onread } as net.SocketConstructorOpts);
    this.outer = outer;
    this.lender = this.proxy;
    this.socket = inner;
    this.reader = this.attach(inner, reader(inner));
    // JavaScript's side is done (or failed): the proxy stops, and so does the client's socket.
    inner.on('close', () => {
      const proxy = this.proxy!;
      // Buffers lent in messages never read are taken back now; a message read later is refused.
      proxy.close(this.lentHeld);
      this.proxy = null;
      const { reads, bytes } = proxy.stats();
      const c = this.srv.counters;
      if (reads > 0) c.requests.read = (c.requests.read ?? 0) + reads;
      c.bytesRead += bytes;
      c.proxied.reads += reads;
      c.proxied.bytes += bytes;
      outer.destroy();
    });
  }

  /** Runs the connection to its end; never throws. */
  async run(): Promise<void> {
    const timer = setTimeout(() => this.handshakeExpired(), this.srv.opts.handshakeTimeoutMs);
    try {
      const hs = new Handshake(this.socket, this.reader, this.srv, (parts) => this.writeWhole(parts));
      const go = await hs.run();
      this.structured = hs.structured;
      this.export = hs.export;
      clearTimeout(timer);
      if (go) this.startProxy();
      if (go) await this.transmission();
      await this.drain();
      this.endSocket();
    } catch (e) {
      this.failed(e);
    } finally {
      clearTimeout(timer);
      this.reader.end(); // however the connection ended, nothing it sent stays buffered
    }
  }

  /** Stops taking requests; in-flight ones finish, then the socket ends. */
  shutdown(): void {
    this.shuttingDown = true;
    this.reader.end();
    this.freeSlot();
  }

  destroy(): void {
    this.socket.destroy();
    this.outer?.destroy();
  }

  private handshakeExpired(): void {
    this.srv.log(`nbd: connection ${this.id}: handshake not finished within ${this.srv.opts.handshakeTimeoutMs} ms`);
    this.srv.counters.protocolErrors++;
    this.socket.destroy();
  }


  // ---- transmission ----

  private async transmission(): Promise<void> {
    const exp = this.export!;
    for (;;) {
      await this.slot();
      if (this.shuttingDown) return;
      const head = await this.reader.read(P.REQUEST_HEADER_BYTES, true);
      const lent = this.lender && head.readUInt32BE(0) === NBD_PROXY_WRITE_MAGIC ? await this.lentIndex(head) : undefined;
      const req = parseRequest(head, exp.backend.size);
      const name = P.COMMAND_NAMES[req.type] ?? 'unknown';
      this.srv.counters.requests[name] = (this.srv.counters.requests[name] ?? 0) + 1;
      if (lent !== undefined) {
        this.lentHeld.add(lent);
        this.srv.counters.proxied.lentWrites++;
        if (req.type !== P.NBD_CMD_WRITE) {
          this.giveLent(lent);
          throw new Error(`the NBD read proxy lent a buffer for a request of type ${req.type}, not a write`);
        }
      }
      if (req.type === P.NBD_CMD_DISC) return;
      const problem = this.validate(req, exp.backend);
      if (req.type === P.NBD_CMD_WRITE) await this.receiveWrite(req, problem, lent);
      else if (problem) void this.replyError(req, problem);
      else this.dispatch(req, null);
    }
  }

  /**
   * A LENT message's buffer index, after its request header (`head`, whose magic becomes a
   * request's again). The connection holds that buffer from here; a message read once the
   * proxy has closed is refused, as the proxy took its buffer back.
   */
  private async lentIndex(head: Buffer): Promise<number> {
    const i = (await this.reader.read(NBD_PROXY_LENT_INDEX_BYTES)).readUInt32BE(0);
    if (this.proxy === null) throw new ConnectionEnded('the read proxy closed: its lent write buffers are back');
    head.writeUInt32BE(P.NBD_REQUEST_MAGIC, 0);
    return i;
  }

  /** A lent write buffer back to the proxy (zeroed there); never throws, so the write it served stands. */
  private giveLent(i: number): void {
    this.lentHeld.delete(i);
    if (!this.lender!.giveWrite(i)) this.srv.log(`nbd: connection ${this.id}: write buffer ${i} came back but was not lent through this connection`);
  }

  /**
   * Reads a write's payload (or skips it, if the write is refused) and dispatches it.
   * With `lent`, the payload is already in that buffer the proxy lent: given back here,
   * unless the write is dispatched, which gives it back once done.
   */
  private async receiveWrite(req: Request, problem: Problem | null, lent?: number): Promise<void> {
    let handed = false;
    try {
      handed = await this.takeWrite(req, problem, lent);
    } finally {
      if (lent !== undefined && !handed) this.giveLent(lent);
    }
  }

  /** receiveWrite(), which says whether it dispatched the write. */
  private async takeWrite(req: Request, problem: Problem | null, lent: number | undefined): Promise<boolean> {
    const max = this.srv.opts.blockSize.maximum;
    if (req.length > max) {
      // proto.md: the client MUST NOT send more than the maximum payload, and
      // a payload deemed a denial of service may end the session. Answer, then hang up.
      const message = `write of ${req.length} bytes exceeds the maximum payload of ${max}`;
      void this.replyError(req, { error: P.NBD_EINVAL, message });
      throw new ProtocolError(message);
    }
    if (problem) {
      if (lent === undefined) await this.reader.skip(req.length);
      void this.replyError(req, problem);
      return false;
    }
    if (lent !== undefined) {
      const data = this.lender!.lentPayload(lent, req.length);
      this.srv.counters.bytesWritten += req.length;
      this.dispatch(req, data, lent);
      return true;
    }
    this.inFlightBytes += req.length;
    const b = this.export!.backend;
    let data: Buffer;
    if (b.payload && req.length > 0) {
      data = await b.payload(req.length);
      try {
        await this.reader.readInto(data);
      } catch (e) {
        b.release?.(data);
        throw e;
      }
    } else data = await this.reader.read(req.length);
    this.srv.counters.bytesWritten += req.length;
    this.inFlightBytes -= req.length;
    this.dispatch(req, data);
    return false;
  }

  /** Returns the error proto.md names for a request we will not run, or null. */
  private validate(req: Request, b: BlockBackend): Problem | null {
    const allowed = ALLOWED_FLAGS[req.type];
    const cmd = P.COMMAND_NAMES[req.type];
    if (allowed === undefined) return { error: P.NBD_EINVAL, message: `command ${cmd ?? req.type} is not supported` };
    if ((req.flags & ~allowed) !== 0) return { error: P.NBD_EINVAL, message: `flags 0x${req.flags.toString(16)} are not valid for ${cmd}` };
    const writes = req.type === P.NBD_CMD_WRITE || req.type === P.NBD_CMD_TRIM || req.type === P.NBD_CMD_WRITE_ZEROES;
    if (writes && b.readonly) return { error: P.NBD_EPERM, message: 'the export is read-only' };
    if (req.type === P.NBD_CMD_READ && req.length > this.srv.opts.blockSize.maximum) {
      const error = this.structured ? P.NBD_EOVERFLOW : P.NBD_EINVAL;
      return { error, message: `read of ${req.length} bytes exceeds the maximum payload of ${this.srv.opts.blockSize.maximum}` };
    }
    if (req.type === P.NBD_CMD_FLUSH || req.inRange) return null;
    // proto.md: writing past the end is ENOSPC, reading or trimming past it EINVAL.
    const error = req.type === P.NBD_CMD_WRITE || req.type === P.NBD_CMD_WRITE_ZEROES ? P.NBD_ENOSPC : P.NBD_EINVAL;
    return { error, message: `${cmd} of ${req.length} bytes at ${req.offset} is beyond the export size ${b.size}` };
  }

  /**
   * Starts a request; its backend call begins before this returns, so a later flush sees it.
   * A write from a lent buffer (`lent`) gives it back once done.
   */
  private dispatch(req: Request, data: Buffer | null, lent?: number): void {
    const cost = req.type === P.NBD_CMD_READ ? req.length : (data?.length ?? 0);
    this.inFlightBytes += cost;
    const h = this.execute(req, data, lent).finally(() => {
      this.handlers.delete(h);
      this.inFlightBytes -= cost;
      this.freeSlot();
    });
    this.handlers.add(h);
  }

  private async execute(req: Request, data: Buffer | null, lent: number | undefined): Promise<void> {
    const b = this.export!.backend;
    const fua = (req.flags & P.NBD_CMD_FLAG_FUA) !== 0;
    try {
      switch (req.type) {
        case P.NBD_CMD_READ:
        {
          // A read the backend can answer at once is answered before this call returns: no promise hop.
          const data = req.length === 0 ? Buffer.alloc(0) : (b.readNow?.(req.offset, req.length) ?? (await b.read(req.offset, req.length)));
          try {
            return await this.replyRead(req, data);
          } finally {
            b.release?.(data);
          }
        }
        case P.NBD_CMD_WRITE:
          try {
            if (req.length > 0) await this.tracked(b.write(req.offset, data!, fua));
          } finally {
            if (lent !== undefined) this.giveLent(lent);
            else if (b.payload && req.length > 0) b.release?.(data!);
          }
          break;
        case P.NBD_CMD_FLUSH:
          await Promise.allSettled(this.srv.writesInFlight(b));
          await b.flush();
          break;
        case P.NBD_CMD_TRIM:
          if (req.length > 0) await this.tracked(b.trim(req.offset, req.length).then(() => (fua ? b.flush() : undefined)));
          break;
        case P.NBD_CMD_WRITE_ZEROES:
          if (req.length > 0) await this.tracked(b.writeZeroes(req.offset, req.length, fua));
          break;
      }
      await this.replyOk(req);
    } catch (e) {
      await this.backendFailed(req, e);
    }
  }

  private tracked(op: Promise<void>): Promise<void> {
    this.srv.trackWrite(this.export!.backend, op);
    return op;
  }

  private async backendFailed(req: Request, e: unknown): Promise<void> {
    this.srv.counters.backendErrors++;
    const error = nbdError(e);
    const cmd = P.COMMAND_NAMES[req.type];
    this.srv.log(`nbd: connection ${this.id}: ${cmd} of ${req.length} bytes at ${req.offset} failed: ${errorChain(e)}`);
    await this.replyError(req, { error, message: `${cmd} of ${req.length} bytes at ${req.offset} failed (${ERROR_NAMES[error]})` });
  }

  // ---- replies (each written whole, so replies never interleave) ----

  private replyRead(req: Request, data: Buffer): Promise<void> {
    if (data.length !== req.length) {
      throw new Error(`backend returned ${data.length} bytes for a read of ${req.length}`);
    }
    this.srv.counters.bytesRead += data.length;
    if (!this.structured) return this.writeWhole([simpleReply(req.cookie, 0), data]);
    if (data.length === 0) return this.replyOk(req);
    const hdr = structuredHeader(req.cookie, P.NBD_REPLY_FLAG_DONE, P.NBD_REPLY_TYPE_OFFSET_DATA, 8 + data.length, 8);
    hdr.writeBigUInt64BE(BigInt(req.offset), P.STRUCTURED_REPLY_HEADER_BYTES);
    return this.writeWhole([hdr, data]);
  }

  private replyOk(req: Request): Promise<void> {
    if (!this.structured) return this.writeWhole([simpleReply(req.cookie, 0)]);
    return this.writeWhole([structuredHeader(req.cookie, P.NBD_REPLY_FLAG_DONE, P.NBD_REPLY_TYPE_NONE, 0)]);
  }

  private replyError(req: Request, p: Problem): Promise<void> {
    const name = ERROR_NAMES[p.error];
    this.srv.counters.errorReplies[name] = (this.srv.counters.errorReplies[name] ?? 0) + 1;
    if (!this.structured) return this.writeWhole([simpleReply(req.cookie, p.error)]);
    const msg = messageBytes(p.message);
    const hdr = structuredHeader(req.cookie, P.NBD_REPLY_FLAG_DONE, P.NBD_REPLY_TYPE_ERROR, 6 + msg.length, 6);
    hdr.writeUInt32BE(p.error, P.STRUCTURED_REPLY_HEADER_BYTES);
    hdr.writeUInt16BE(msg.length, P.STRUCTURED_REPLY_HEADER_BYTES + 4);
    return this.writeWhole([hdr, msg]);
  }

  /** Writes one message in a single corked batch; resolves when it has left or the socket is gone. */
  private writeWhole(parts: Buffer[]): Promise<void> {
    if (!this.socket.writable) return Promise.resolve();
    return new Promise((resolve) => {
      const done = () => {
        this.unsent.delete(done);
        resolve();
      };
      this.unsent.add(done);
      this.socket.cork();
      for (let i = 0; i < parts.length - 1; i++) if (parts[i].length > 0) this.socket.write(parts[i]);
      this.socket.write(parts[parts.length - 1], done);
      this.socket.uncork();
    });
  }

  // ---- flow control and endings ----

  /** Waits while this connection holds as many requests or bytes as it may. */
  private async slot(): Promise<void> {
    while (!this.shuttingDown && (this.handlers.size >= P.MAX_IN_FLIGHT_REQUESTS || this.inFlightBytes >= P.MAX_IN_FLIGHT_BYTES)) {
      await new Promise<void>((r) => (this.slotFreed = r));
    }
  }

  private freeSlot(): void {
    const w = this.slotFreed;
    this.slotFreed = null;
    w?.();
  }

  /** proto.md: on NBD_CMD_DISC or shutdown, outstanding requests are still answered. */
  private async drain(): Promise<void> {
    while (this.handlers.size > 0) await Promise.allSettled([...this.handlers]);
  }

  private failed(e: unknown): void {
    if (e instanceof ProtocolError) {
      this.srv.counters.protocolErrors++;
      this.srv.log(`nbd: connection ${this.id}: closed: ${e.message}`);
      this.endSocket();
    } else if (e instanceof ConnectionEnded) {
      if (this.shuttingDown) void this.drain().then(() => this.endSocket());
      else this.socket.destroy();
    } else {
      this.srv.log(`nbd: connection ${this.id}: closed: ${errorChain(e)}`);
      this.socket.destroy();
    }
  }

  /** Stops reading, lets queued replies leave, and drops the socket if the client lingers. */
  private endSocket(): void {
    this.reader.end();
    this.socket.end();
    setTimeout(() => this.socket.destroy(), P.LINGER_MS).unref();
  }
}

