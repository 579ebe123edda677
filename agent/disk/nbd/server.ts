// An NBD server (fixed newstyle handshake, simple and structured replies, many
// requests in flight) over a unix socket or loopback TCP. docs/nbd.md says what
// is implemented from proto.md, the limits, the error mapping and what flush
// and FUA promise. Nothing a client sends can throw out of this file: a
// violation closes that client's connection and is counted.
import fs from 'node:fs';
import net from 'node:net';
import { LetheError, errorChain, isLetheError } from '../../../common/errors.js';
import { peerCredentials, socketFd, type PeerCredentials } from '../../../native/index.js';
import * as P from './protocol.js';

/**
 * The storage behind one export. One instance serves every connection to its
 * export, which is what lets the server advertise NBD_FLAG_CAN_MULTI_CONN:
 * a read issued after a write has resolved sees that write whichever
 * connection made it, and `flush()` makes durable every write that has
 * resolved, from any caller. Methods may reject; see `nbdError` for how
 * rejections map to NBD errors. The server never calls a method with a range
 * outside `[0, size)` and never keeps a buffer after the call's reply is sent.
 */
export interface BlockBackend {
  size: number;
  readonly?: boolean;
  /** Resolves to exactly `length` bytes; anything else is answered NBD_EIO. */
  read(offset: number, length: number): Promise<Buffer>;
  /** With `fua`, resolves only once the data is on non-volatile storage. */
  write(offset: number, data: Buffer, fua: boolean): Promise<void>;
  flush(): Promise<void>;
  trim(offset: number, length: number): Promise<void>;
  writeZeroes(offset: number, length: number, fua: boolean): Promise<void>;
  /**
   * A buffer of `length` bytes for a write's payload, which the server reads off the
   * socket into it (zeroing the bytes it came in) and hands back through release()
   * once the write is done or failed. Without it the payload stays in Node's buffers.
   */
  payload?(length: number): Promise<Buffer>;
  /** Called with a buffer read() or payload() returned once its reply is on the wire (or failed): a backend zeroes plaintext here. */
  release?(buf: Buffer): void;
}

export type NbdAddress = { path: string } | { host: string; port: number };

export interface NbdBlockSize {
  minimum: number;
  preferred: number;
  maximum: number;
}

export interface NbdServerOptions {
  /** The export a client gets when it asks for the empty name "". */
  defaultExport?: string;
  /** Advertised with NBD_INFO_BLOCK_SIZE; defaults 1, 4096, 32 MiB. */
  blockSize?: NbdBlockSize;
  /** Advertise NBD_FLAG_CAN_MULTI_CONN (default true; see BlockBackend). */
  multiConn?: boolean;
  handshakeTimeoutMs?: number;
  /**
   * Decides from its peer's credentials (SO_PEERCRED) whether a connection on the unix
   * socket is served: null lets it in, a string says why not; a refused peer is logged
   * with its pid and uid and closed before a byte is read. Without it, any process that
   * can open the socket is served.
   */
  allowPeer?: (peer: PeerCredentials) => string | null;
  /** One line per notable event (protocol violations, backend failures, refused peers). */
  log?: (line: string) => void;
}

export interface NbdStats {
  connections: { total: number; active: number };
  /** Requests received, by command name ('read', 'write', …, 'unknown'). */
  requests: Record<string, number>;
  /** Bytes sent to clients by reads. */
  bytesRead: number;
  /** Bytes received from clients by writes. */
  bytesWritten: number;
  /** Error replies sent, by NBD error name ('EINVAL', 'EIO', …). */
  errorReplies: Record<string, number>;
  /** Connections closed because the client broke the protocol. */
  protocolErrors: number;
  /** Connections closed at once because allowPeer refused their peer. */
  refusedPeers: number;
  /** Backend calls that rejected. */
  backendErrors: number;
}

const ERROR_NAMES: Record<number, string> = {
  [P.NBD_EPERM]: 'EPERM',
  [P.NBD_EIO]: 'EIO',
  [P.NBD_ENOMEM]: 'ENOMEM',
  [P.NBD_EINVAL]: 'EINVAL',
  [P.NBD_ENOSPC]: 'ENOSPC',
  [P.NBD_EOVERFLOW]: 'EOVERFLOW',
  [P.NBD_ENOTSUP]: 'ENOTSUP',
  [P.NBD_ESHUTDOWN]: 'ESHUTDOWN',
};

/** Command flags each command accepts; any other bit is answered NBD_EINVAL. */
const ALLOWED_FLAGS: Record<number, number> = {
  [P.NBD_CMD_READ]: P.NBD_CMD_FLAG_FUA | P.NBD_CMD_FLAG_DF,
  [P.NBD_CMD_WRITE]: P.NBD_CMD_FLAG_FUA,
  [P.NBD_CMD_FLUSH]: P.NBD_CMD_FLAG_FUA,
  [P.NBD_CMD_TRIM]: P.NBD_CMD_FLAG_FUA,
  [P.NBD_CMD_WRITE_ZEROES]: P.NBD_CMD_FLAG_FUA | P.NBD_CMD_FLAG_NO_HOLE,
};

const KNOWN_OPTIONS = new Set([
  P.NBD_OPT_EXPORT_NAME,
  P.NBD_OPT_ABORT,
  P.NBD_OPT_LIST,
  P.NBD_OPT_INFO,
  P.NBD_OPT_GO,
  P.NBD_OPT_STRUCTURED_REPLY,
]);

const SYSTEM_ERRNO_TO_NBD: Record<string, number> = {
  ENOSPC: P.NBD_ENOSPC,
  EDQUOT: P.NBD_ENOSPC,
  EFBIG: P.NBD_ENOSPC,
  EINVAL: P.NBD_EINVAL,
  EPERM: P.NBD_EPERM,
  EACCES: P.NBD_EPERM,
  EROFS: P.NBD_EPERM,
};

/**
 * The NBD error for a backend rejection: file-system errnos proto.md names
 * (ENOSPC, EDQUOT, EFBIG → ENOSPC; EINVAL; EPERM, EACCES, EROFS → EPERM), a
 * LetheError BAD_REQUEST → EINVAL, anything else → EIO. A read that fails is
 * always an error, never zeros (DESIGN.md invariant 7).
 */
export function nbdError(e: unknown): number {
  if (isLetheError(e, 'BAD_REQUEST')) return P.NBD_EINVAL;
  const code = (e as { code?: unknown } | null)?.code;
  return (typeof code === 'string' && SYSTEM_ERRNO_TO_NBD[code]) || P.NBD_EIO;
}

/** The client broke the protocol; its connection is closed. */
class ProtocolError extends Error {}
/** The connection ended (or was told to) while we waited for bytes. */
class ConnectionEnded extends Error {}

/** Reads exact byte counts from a socket, pausing it while too much is buffered. */
class ByteReader {
  private chunks: Buffer[] = [];
  private buffered = 0;
  private want = 0;
  private wake: (() => void) | null = null;
  private ended = false;
  private endedByUs = false;

  constructor(private readonly socket: net.Socket) {
    socket.on('data', (d: Buffer) => this.push(d));
    socket.on('end', () => this.peerEnded());
    socket.on('close', () => this.peerEnded());
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

interface Export {
  name: string;
  backend: BlockBackend;
}

interface Request {
  flags: number;
  type: number;
  cookie: Buffer;
  offset: number;
  length: number;
  /** true when offset + length lies within the export. */
  inRange: boolean;
}

interface Problem {
  error: number;
  message: string;
}

/** What a connection needs from its server. */
interface ServerSide {
  readonly exports: Map<string, BlockBackend>;
  readonly opts: Required<Omit<NbdServerOptions, 'defaultExport' | 'log' | 'allowPeer'>> & NbdServerOptions;
  readonly counters: NbdStats;
  log(line: string): void;
  /** Registers a backend write so a later flush waits for it. */
  trackWrite(backend: BlockBackend, op: Promise<unknown>): void;
  /** The writes in flight on a backend at this moment. */
  writesInFlight(backend: BlockBackend): Promise<unknown>[];
}

let nextConnectionId = 1;

/** One client, from greeting to close. */
class Connection {
  readonly id = nextConnectionId++;
  private readonly reader: ByteReader;
  private structured = false;
  private noZeroes = false;
  private export: Export | null = null;
  private readonly handlers = new Set<Promise<void>>();
  /** Resolvers of replies not yet flushed; all resolved when the socket closes. */
  private readonly unsent = new Set<() => void>();
  private inFlightBytes = 0;
  private slotFreed: (() => void) | null = null;
  private shuttingDown = false;

  constructor(
    private readonly socket: net.Socket,
    private readonly srv: ServerSide,
  ) {
    this.reader = new ByteReader(socket);
    socket.on('error', () => this.reader.peerEnded());
    socket.on('close', () => {
      for (const r of this.unsent) r();
      this.unsent.clear();
    });
    socket.setNoDelay(true);
  }

  /** Runs the connection to its end; never throws. */
  async run(): Promise<void> {
    const timer = setTimeout(() => this.handshakeExpired(), this.srv.opts.handshakeTimeoutMs);
    try {
      const go = await this.handshake();
      clearTimeout(timer);
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
  }

  // ---- handshake ----

  /** Resolves true when transmission begins, false on NBD_OPT_ABORT. */
  private async handshake(): Promise<boolean> {
    const greeting = Buffer.alloc(P.SERVER_GREETING_BYTES);
    greeting.writeBigUInt64BE(P.NBDMAGIC, 0);
    greeting.writeBigUInt64BE(P.IHAVEOPT, 8);
    greeting.writeUInt16BE(P.NBD_FLAG_FIXED_NEWSTYLE | P.NBD_FLAG_NO_ZEROES, 16);
    this.socket.write(greeting);
    this.clientFlags((await this.reader.read(P.CLIENT_FLAGS_BYTES, true)).readUInt32BE(0));
    for (let n = 0; n < P.MAX_OPTIONS_PER_CONNECTION; n++) {
      const hdr = await this.reader.read(P.OPTION_HEADER_BYTES, true);
      const magic = hdr.readBigUInt64BE(0);
      if (magic !== P.IHAVEOPT) throw new ProtocolError(`bad option magic 0x${magic.toString(16)}`);
      const next = await this.option(hdr.readUInt32BE(8), hdr.readUInt32BE(12));
      if (next !== 'continue') return next === 'transmission';
    }
    throw new ProtocolError(`more than ${P.MAX_OPTIONS_PER_CONNECTION} options`);
  }

  private clientFlags(flags: number): void {
    const known = P.NBD_FLAG_C_FIXED_NEWSTYLE | P.NBD_FLAG_C_NO_ZEROES;
    if ((flags & ~known) !== 0) throw new ProtocolError(`unknown client flags 0x${flags.toString(16)}`);
    if (!(flags & P.NBD_FLAG_C_FIXED_NEWSTYLE)) throw new ProtocolError('client does not speak fixed newstyle');
    this.noZeroes = (flags & P.NBD_FLAG_C_NO_ZEROES) !== 0;
  }

  private async option(opt: number, len: number): Promise<'continue' | 'transmission' | 'abort'> {
    if (len > P.MAX_OPTION_PAYLOAD) return this.oversizedOption(opt, len);
    const data = await this.reader.read(len);
    switch (opt) {
      case P.NBD_OPT_EXPORT_NAME:
        return this.optExportName(data);
      case P.NBD_OPT_ABORT:
        this.optReply(opt, P.NBD_REP_ACK);
        return 'abort';
      case P.NBD_OPT_LIST:
        return this.optList(data);
      case P.NBD_OPT_STRUCTURED_REPLY:
        return this.optStructuredReply(data);
      case P.NBD_OPT_INFO:
      case P.NBD_OPT_GO:
        return this.optInfoGo(opt, data);
      default:
        return this.optError(opt, P.NBD_REP_ERR_UNSUP, `option ${opt} is not supported`);
    }
  }

  /** Skips a payload we will not hold, or hangs up if it is absurd. */
  private async oversizedOption(opt: number, len: number): Promise<'continue'> {
    if (opt === P.NBD_OPT_EXPORT_NAME || len > P.MAX_OPTION_DISCARD) {
      throw new ProtocolError(`option ${opt} carries ${len} bytes, more than ${P.MAX_OPTION_PAYLOAD}`);
    }
    await this.reader.skip(len);
    const known = KNOWN_OPTIONS.has(opt);
    return this.optError(opt, known ? P.NBD_REP_ERR_TOO_BIG : P.NBD_REP_ERR_UNSUP, `option payload of ${len} bytes is too large`);
  }

  /** proto.md: an export name this server cannot satisfy ends the session. */
  private optExportName(data: Buffer): 'transmission' {
    const exp = this.lookup(data.toString('utf8'));
    if (!exp) throw new ProtocolError(`NBD_OPT_EXPORT_NAME for unknown export ${quote(data.toString('utf8'))}`);
    const reply = Buffer.alloc(10 + (this.noZeroes ? 0 : P.EXPORT_NAME_PADDING_BYTES));
    reply.writeBigUInt64BE(BigInt(exp.backend.size), 0);
    reply.writeUInt16BE(this.transmissionFlags(exp.backend), 8);
    this.socket.write(reply);
    this.export = exp;
    return 'transmission';
  }

  private optList(data: Buffer): 'continue' {
    if (data.length > 0) return this.optError(P.NBD_OPT_LIST, P.NBD_REP_ERR_INVALID, 'NBD_OPT_LIST takes no data');
    for (const name of this.srv.exports.keys()) {
      const n = Buffer.from(name, 'utf8');
      const body = Buffer.alloc(4 + n.length);
      body.writeUInt32BE(n.length, 0);
      n.copy(body, 4);
      this.optReply(P.NBD_OPT_LIST, P.NBD_REP_SERVER, body);
    }
    this.optReply(P.NBD_OPT_LIST, P.NBD_REP_ACK);
    return 'continue';
  }

  private optStructuredReply(data: Buffer): 'continue' {
    const opt = P.NBD_OPT_STRUCTURED_REPLY;
    if (data.length > 0) return this.optError(opt, P.NBD_REP_ERR_INVALID, 'NBD_OPT_STRUCTURED_REPLY takes no data');
    this.structured = true;
    this.optReply(opt, P.NBD_REP_ACK);
    return 'continue';
  }

  private optInfoGo(opt: number, data: Buffer): 'continue' | 'transmission' {
    const req = parseInfoRequest(data);
    if (!req) return this.optError(opt, P.NBD_REP_ERR_INVALID, 'malformed information request');
    const exp = this.lookup(req.name);
    if (!exp) return this.optError(opt, P.NBD_REP_ERR_UNKNOWN, `unknown export ${quote(req.name)}`);
    const info = Buffer.alloc(12);
    info.writeUInt16BE(P.NBD_INFO_EXPORT, 0);
    info.writeBigUInt64BE(BigInt(exp.backend.size), 2);
    info.writeUInt16BE(this.transmissionFlags(exp.backend), 10);
    this.optReply(opt, P.NBD_REP_INFO, info);
    if (req.infos.includes(P.NBD_INFO_NAME)) {
      const name = Buffer.from(exp.name, 'utf8');
      this.optReply(opt, P.NBD_REP_INFO, Buffer.concat([u16(P.NBD_INFO_NAME), name]));
    }
    if (req.infos.includes(P.NBD_INFO_BLOCK_SIZE)) this.optReply(opt, P.NBD_REP_INFO, this.blockSizeInfo());
    this.optReply(opt, P.NBD_REP_ACK);
    if (opt === P.NBD_OPT_INFO) return 'continue';
    this.export = exp;
    return 'transmission';
  }

  private blockSizeInfo(): Buffer {
    const { minimum, preferred, maximum } = this.srv.opts.blockSize;
    const b = Buffer.alloc(14);
    b.writeUInt16BE(P.NBD_INFO_BLOCK_SIZE, 0);
    b.writeUInt32BE(minimum, 2);
    b.writeUInt32BE(preferred, 6);
    b.writeUInt32BE(maximum, 10);
    return b;
  }

  private lookup(name: string): Export | null {
    const resolved = name === '' && this.srv.opts.defaultExport !== undefined ? this.srv.opts.defaultExport : name;
    const backend = this.srv.exports.get(resolved);
    return backend ? { name: resolved, backend } : null;
  }

  private transmissionFlags(b: BlockBackend): number {
    let f = P.NBD_FLAG_HAS_FLAGS | P.NBD_FLAG_SEND_FLUSH | P.NBD_FLAG_SEND_FUA;
    f |= b.readonly ? P.NBD_FLAG_READ_ONLY : P.NBD_FLAG_SEND_TRIM | P.NBD_FLAG_SEND_WRITE_ZEROES;
    if (this.srv.opts.multiConn) f |= P.NBD_FLAG_CAN_MULTI_CONN;
    // Every structured read is one chunk, so "don't fragment" always holds.
    if (this.structured) f |= P.NBD_FLAG_SEND_DF;
    return f;
  }

  private optReply(opt: number, type: number, data: Buffer = Buffer.alloc(0)): void {
    const hdr = Buffer.alloc(P.OPTION_REPLY_HEADER_BYTES);
    hdr.writeBigUInt64BE(P.NBD_OPT_REPLY_MAGIC, 0);
    hdr.writeUInt32BE(opt, 8);
    hdr.writeUInt32BE(type, 12);
    hdr.writeUInt32BE(data.length, 16);
    this.writeWhole([hdr, data]);
  }

  private optError(opt: number, type: number, message: string): 'continue' {
    this.optReply(opt, type, messageBytes(message));
    return 'continue';
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
      const req = parseRequest(await this.reader.read(P.REQUEST_HEADER_BYTES, true), exp.backend.size);
      const name = P.COMMAND_NAMES[req.type] ?? 'unknown';
      this.srv.counters.requests[name] = (this.srv.counters.requests[name] ?? 0) + 1;
      if (req.type === P.NBD_CMD_DISC) return;
      const problem = this.validate(req, exp.backend);
      if (req.type === P.NBD_CMD_WRITE) await this.receiveWrite(req, problem);
      else if (problem) void this.replyError(req, problem);
      else this.dispatch(req, null);
    }
  }

  /** Reads a write's payload (or skips it, if the write is refused) and dispatches it. */
  private async receiveWrite(req: Request, problem: Problem | null): Promise<void> {
    const max = this.srv.opts.blockSize.maximum;
    if (req.length > max) {
      // proto.md: the client MUST NOT send more than the maximum payload, and
      // a payload deemed a denial of service may end the session. Answer, then hang up.
      const message = `write of ${req.length} bytes exceeds the maximum payload of ${max}`;
      void this.replyError(req, { error: P.NBD_EINVAL, message });
      throw new ProtocolError(message);
    }
    if (problem) {
      await this.reader.skip(req.length);
      void this.replyError(req, problem);
      return;
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

  /** Starts a request; its backend call begins before this returns, so a later flush sees it. */
  private dispatch(req: Request, data: Buffer | null): void {
    const cost = req.type === P.NBD_CMD_READ ? req.length : (data?.length ?? 0);
    this.inFlightBytes += cost;
    const h = this.execute(req, data).finally(() => {
      this.handlers.delete(h);
      this.inFlightBytes -= cost;
      this.freeSlot();
    });
    this.handlers.add(h);
  }

  private async execute(req: Request, data: Buffer | null): Promise<void> {
    const b = this.export!.backend;
    const fua = (req.flags & P.NBD_CMD_FLAG_FUA) !== 0;
    try {
      switch (req.type) {
        case P.NBD_CMD_READ:
        {
          const data = req.length === 0 ? Buffer.alloc(0) : await b.read(req.offset, req.length);
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
            if (b.payload && req.length > 0) b.release?.(data!);
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

// ---- wire helpers ----

function u16(v: number): Buffer {
  const b = Buffer.alloc(2);
  b.writeUInt16BE(v, 0);
  return b;
}

function quote(s: string): string {
  return JSON.stringify(s.length > 64 ? `${s.slice(0, 64)}…` : s);
}

function messageBytes(message: string): Buffer {
  const b = Buffer.from(message, 'utf8');
  return b.length > P.MAX_ERROR_MESSAGE ? b.subarray(0, P.MAX_ERROR_MESSAGE) : b;
}

function simpleReply(cookie: Buffer, error: number): Buffer {
  const b = Buffer.alloc(P.SIMPLE_REPLY_HEADER_BYTES);
  b.writeUInt32BE(P.NBD_SIMPLE_REPLY_MAGIC, 0);
  b.writeUInt32BE(error, 4);
  cookie.copy(b, 8);
  return b;
}

/** A structured chunk header with `extra` bytes of room after it for fixed fields. */
function structuredHeader(cookie: Buffer, flags: number, type: number, length: number, extra = 0): Buffer {
  const b = Buffer.alloc(P.STRUCTURED_REPLY_HEADER_BYTES + extra);
  b.writeUInt32BE(P.NBD_STRUCTURED_REPLY_MAGIC, 0);
  b.writeUInt16BE(flags, 4);
  b.writeUInt16BE(type, 6);
  cookie.copy(b, 8);
  b.writeUInt32BE(length, 16);
  return b;
}

/** Throws ProtocolError on a bad magic: nothing after it can be trusted. */
function parseRequest(h: Buffer, size: number): Request {
  const magic = h.readUInt32BE(0);
  if (magic !== P.NBD_REQUEST_MAGIC) throw new ProtocolError(`bad request magic 0x${magic.toString(16)}`);
  const big = h.readBigUInt64BE(16);
  const length = h.readUInt32BE(24);
  // Offsets past 2^53 are out of range anyway; clamp them for messages.
  const offset = big > BigInt(Number.MAX_SAFE_INTEGER) ? Number.MAX_SAFE_INTEGER : Number(big);
  return {
    flags: h.readUInt16BE(4),
    type: h.readUInt16BE(6),
    cookie: Buffer.from(h.subarray(8, 16)),
    offset,
    length,
    inRange: big <= BigInt(size) && offset + length <= size,
  };
}

/** NBD_OPT_INFO/GO data: u32 name length, name, u16 count, u16 × count; null if malformed. */
function parseInfoRequest(d: Buffer): { name: string; infos: number[] } | null {
  if (d.length < 6) return null;
  const nameLen = d.readUInt32BE(0);
  if (nameLen > d.length - 6) return null;
  const count = d.readUInt16BE(4 + nameLen);
  if (d.length !== 4 + nameLen + 2 + 2 * count) return null;
  const infos: number[] = [];
  for (let i = 0; i < count; i++) infos.push(d.readUInt16BE(6 + nameLen + 2 * i));
  return { name: d.toString('utf8', 4, 4 + nameLen), infos };
}

// ---- the server ----

const LOOPBACK = /^(127\.\d{1,3}\.\d{1,3}\.\d{1,3}|::1|localhost)$/;

/**
 * Serves named exports to NBD clients. Listen on a unix socket (made 0600;
 * keep it in a private directory) or on loopback TCP: an export carries
 * plaintext disk data and NBD has no authentication here.
 */
export class NbdServer {
  private readonly net = net.createServer();
  private readonly conns = new Set<Connection>();
  private readonly running = new Set<Promise<void>>();
  private readonly writes = new WeakMap<BlockBackend, Set<Promise<unknown>>>();
  private bound: NbdAddress | null = null;
  private closing: Promise<void> | null = null;
  private readonly side: ServerSide;
  private readonly counters: NbdStats = {
    connections: { total: 0, active: 0 },
    requests: {},
    bytesRead: 0,
    bytesWritten: 0,
    errorReplies: {},
    protocolErrors: 0,
    refusedPeers: 0,
    backendErrors: 0,
  };

  /** Throws LetheError CONFIG on an export or option proto.md does not allow. */
  constructor(exports: Map<string, BlockBackend>, opts: NbdServerOptions = {}) {
    checkExports(exports, opts.defaultExport);
    const blockSize = opts.blockSize ?? {
      minimum: P.NBD_DEFAULT_MIN_BLOCK,
      preferred: P.NBD_DEFAULT_PREFERRED_BLOCK,
      maximum: P.NBD_DEFAULT_MAX_PAYLOAD,
    };
    checkBlockSize(blockSize);
    const full = {
      ...opts,
      blockSize,
      multiConn: opts.multiConn ?? true,
      handshakeTimeoutMs: opts.handshakeTimeoutMs ?? P.HANDSHAKE_TIMEOUT_MS,
    };
    this.side = {
      exports,
      opts: full,
      counters: this.counters,
      log: (line) => opts.log?.(line),
      trackWrite: (b, op) => this.trackWrite(b, op),
      writesInFlight: (b) => [...(this.writes.get(b) ?? [])],
    };
    this.net.maxConnections = P.MAX_CONNECTIONS;
    this.net.on('connection', (s) => this.accept(s));
    this.net.on('error', (e) => this.side.log(`nbd: listener: ${errorChain(e)}`));
  }

  /** Starts listening; resolves to the bound address (the real port for port 0). Throws LetheError CONFIG. */
  async listen(address: NbdAddress): Promise<NbdAddress> {
    if ('path' in address) {
      await removeStaleSocket(address.path);
      await new Promise<void>((resolve, reject) => this.net.once('error', reject).listen(address.path, resolve));
      fs.chmodSync(address.path, 0o600);
      this.bound = { path: address.path };
    } else {
      if (!LOOPBACK.test(address.host)) {
        throw new LetheError('CONFIG', `nbd: refusing to listen on ${quote(address.host)}`, {
          hint: 'exports carry plaintext; use a unix socket or a loopback address such as 127.0.0.1',
        });
      }
      await new Promise<void>((resolve, reject) => this.net.once('error', reject).listen(address.port, address.host, resolve));
      const a = this.net.address() as net.AddressInfo;
      this.bound = { host: address.host, port: a.port };
    }
    return this.bound;
  }

  address(): NbdAddress | null {
    return this.bound;
  }

  /** A copy of the counters. */
  stats(): NbdStats {
    return structuredClone({ ...this.counters, connections: { ...this.counters.connections, active: this.conns.size } });
  }

  /**
   * Stops listening and ends every connection: handshakes are dropped,
   * in-flight requests get CLOSE_GRACE_MS to finish and be answered. Never throws.
   */
  close(): Promise<void> {
    this.closing ??= this.shutdown();
    return this.closing;
  }

  private async shutdown(): Promise<void> {
    const stopped = new Promise<void>((r) => (this.net.listening ? this.net.close(() => r()) : r()));
    for (const c of this.conns) c.shutdown();
    const grace = new Promise<void>((r) => setTimeout(r, P.CLOSE_GRACE_MS).unref());
    await Promise.race([Promise.allSettled([...this.running]), grace]);
    for (const c of this.conns) c.destroy();
    await stopped;
  }

  private accept(socket: net.Socket): void {
    if (this.closing) return void socket.destroy();
    if (this.side.opts.allowPeer && !this.peerAllowed(socket, this.side.opts.allowPeer)) return;
    this.counters.connections.total++;
    const c = new Connection(socket, this.side);
    this.conns.add(c);
    const done = new Promise<void>((r) => socket.once('close', () => r()));
    const run = Promise.all([c.run(), done]).then(() => {
      this.conns.delete(c);
      this.running.delete(run);
    });
    this.running.add(run);
  }

  /** Asks allowPeer about the socket's peer; closes the socket and says so when it is refused. */
  private peerAllowed(socket: net.Socket, allowPeer: (peer: PeerCredentials) => string | null): boolean {
    const fd = socketFd(socket);
    let peer: PeerCredentials | null = null;
    let why: string | null;
    try {
      if (fd === null) throw new Error('the socket has no file descriptor');
      peer = peerCredentials(fd);
      why = allowPeer(peer);
    } catch (e) {
      why = `its credentials cannot be read: ${errorChain(e)}`;
    }
    if (why === null) return true;
    this.counters.refusedPeers++;
    this.side.log(`nbd: refused a connection from ${peer ? `pid ${peer.pid} (uid ${peer.uid})` : 'an unknown peer'}: ${why}`);
    socket.destroy();
    return false;
  }

  private trackWrite(b: BlockBackend, op: Promise<unknown>): void {
    let set = this.writes.get(b);
    if (!set) this.writes.set(b, (set = new Set()));
    const s = set;
    s.add(op);
    op.then(
      () => s.delete(op),
      () => s.delete(op),
    );
  }
}

function checkExports(exports: Map<string, BlockBackend>, defaultExport: string | undefined): void {
  for (const [name, b] of exports) {
    if (Buffer.byteLength(name) > P.NBD_MAX_STRING_BYTES || name.includes('\0')) {
      throw new LetheError('CONFIG', `nbd: export name ${quote(name)} is not a valid NBD string`);
    }
    if (!Number.isSafeInteger(b.size) || b.size < 0) {
      throw new LetheError('CONFIG', `nbd: export ${quote(name)} has an invalid size ${b.size}`);
    }
  }
  if (defaultExport !== undefined && !exports.has(defaultExport)) {
    throw new LetheError('CONFIG', `nbd: default export ${quote(defaultExport)} is not among the exports`);
  }
}

/** proto.md "Size constraints": powers of two, min ≤ 64 KiB, preferred ≥ max(min, 512), max ≥ preferred. */
function checkBlockSize({ minimum, preferred, maximum }: NbdBlockSize): void {
  const pow2 = (n: number) => Number.isInteger(n) && n > 0 && (n & (n - 1)) === 0;
  const ok =
    pow2(minimum) &&
    minimum <= P.NBD_MAX_MIN_BLOCK &&
    pow2(preferred) &&
    preferred >= Math.max(minimum, P.NBD_MIN_PREFERRED_BLOCK) &&
    Number.isInteger(maximum) &&
    maximum >= preferred &&
    maximum <= 0xffffffff;
  if (!ok) throw new LetheError('CONFIG', `nbd: block sizes ${minimum}/${preferred}/${maximum} break proto.md's size constraints`);
}

/** Removes a socket file nobody listens on; throws LetheError CONFIG if the path is in use or not a socket. */
async function removeStaleSocket(path: string): Promise<void> {
  let st: fs.Stats;
  try {
    st = fs.lstatSync(path);
  } catch {
    return;
  }
  if (!st.isSocket()) throw new LetheError('CONFIG', `nbd: ${quote(path)} exists and is not a socket`);
  const live = await new Promise<boolean>((resolve) => {
    const s = net.connect(path);
    s.once('connect', () => (s.destroy(), resolve(true)));
    s.once('error', () => resolve(false));
  });
  if (live) throw new LetheError('CONFIG', `nbd: another server is listening on ${quote(path)}`, { hint: 'stop it or choose another socket path' });
  fs.unlinkSync(path);
}
