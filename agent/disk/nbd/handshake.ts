// The fixed newstyle handshake (proto.md, "Option haggling"): the greeting, the
// client's flags and its options, up to the export it goes on to transmit with.
import type net from 'node:net';
import { KNOWN_OPTIONS, messageBytes, parseInfoRequest, quote, u16 } from './messages.js';
import { ProtocolError, type ByteReader } from './reader.js';
import type { BlockBackend, Export, ServerSide } from './types.js';
import * as P from './protocol.js';

/** One connection's handshake; what it agreed (structured replies, the export) is read after run(). */
export class Handshake {
  structured = false;
  private noZeroes = false;
  export: Export | null = null;

  constructor(
    private readonly socket: net.Socket,
    private readonly reader: ByteReader,
    private readonly srv: ServerSide,
    /** Writes one message whole (the connection's writer). */
    private readonly send: (parts: Buffer[]) => Promise<void>,
  ) {}

  /** Resolves true when transmission begins, false on NBD_OPT_ABORT. */
  async run(): Promise<boolean> {
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
    this.send([hdr, data]);
  }

  private optError(opt: number, type: number, message: string): 'continue' {
    this.optReply(opt, type, messageBytes(message));
    return 'continue';
  }
}
