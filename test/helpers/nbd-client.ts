// A raw NBD client for tests: it speaks the protocol byte by byte, so a test can
// pipeline requests, choose simple or structured replies, and break the protocol on
// purpose (test/integration/nbd.test.ts, nbd-proxy.test.ts).
import { expect } from 'chai';
import net from 'node:net';
import { setTimeout as sleep } from 'node:timers/promises';
import * as P from '../../agent/disk/nbd/protocol.js';

export interface Reply {
  kind: 'simple' | 'structured';
  error: number;
  cookie: bigint;
  flags?: number;
  type?: number;
  payload: Buffer;
}

/** A hand-driven NBD client over a unix socket, for what real clients never send. */
export class RawClient {
  private buf = Buffer.alloc(0);
  private wake: (() => void) | null = null;
  private ended = false;
  readonly closed: Promise<void>;
  private constructor(private readonly s: net.Socket) {
    s.on('data', (d: Buffer) => {
      this.buf = Buffer.concat([this.buf, d]);
      this.wake?.();
    });
    s.on('error', () => undefined);
    this.closed = new Promise((r) =>
      s.once('close', () => {
        this.ended = true;
        this.wake?.();
        r();
      }),
    );
  }
  static connect(sock: string): Promise<RawClient> {
    return new Promise((resolve, reject) => {
      const s = net.connect(sock, () => resolve(new RawClient(s)));
      s.once('error', reject);
    });
  }
  send(...parts: Buffer[]): void {
    this.s.write(Buffer.concat(parts));
  }
  end(): void {
    this.s.end();
  }
  destroy(): void {
    this.s.destroy();
  }
  /** Throws if the server closes before n bytes arrive. */
  async read(n: number): Promise<Buffer> {
    while (this.buf.length < n) {
      if (this.ended) throw new Error(`connection closed after ${this.buf.length} of ${n} bytes`);
      await new Promise<void>((r) => (this.wake = r));
    }
    const out = this.buf.subarray(0, n);
    this.buf = this.buf.subarray(n);
    return out;
  }
  /** Resolves true if the server closed the connection within ms. */
  async closesWithin(ms: number): Promise<boolean> {
    return Promise.race([this.closed.then(() => true), sleep(ms).then(() => false)]);
  }
  async greet(clientFlags = P.NBD_FLAG_C_FIXED_NEWSTYLE | P.NBD_FLAG_C_NO_ZEROES): Promise<number> {
    const g = await this.read(P.SERVER_GREETING_BYTES);
    expect(g.readBigUInt64BE(0)).to.equal(P.NBDMAGIC);
    expect(g.readBigUInt64BE(8)).to.equal(P.IHAVEOPT);
    this.send(u32(clientFlags));
    return g.readUInt16BE(16);
  }
  option(opt: number, data: Buffer = Buffer.alloc(0), declaredLength = data.length): void {
    const h = Buffer.alloc(P.OPTION_HEADER_BYTES);
    h.writeBigUInt64BE(P.IHAVEOPT, 0);
    h.writeUInt32BE(opt, 8);
    h.writeUInt32BE(declaredLength, 12);
    this.send(h, data);
  }
  async optReply(): Promise<{ option: number; type: number; data: Buffer }> {
    const h = await this.read(P.OPTION_REPLY_HEADER_BYTES);
    expect(h.readBigUInt64BE(0)).to.equal(P.NBD_OPT_REPLY_MAGIC);
    return { option: h.readUInt32BE(8), type: h.readUInt32BE(12), data: await this.read(h.readUInt32BE(16)) };
  }
  /** NBD_OPT_GO; resolves to the size and transmission flags. */
  async go(name: string, opts: { structured?: boolean } = {}): Promise<{ size: bigint; flags: number }> {
    if (opts.structured) {
      this.option(P.NBD_OPT_STRUCTURED_REPLY);
      expect((await this.optReply()).type).to.equal(P.NBD_REP_ACK);
    }
    this.option(P.NBD_OPT_GO, infoRequest(name, []));
    let size = -1n;
    let flags = -1;
    for (;;) {
      const r = await this.optReply();
      if (r.type === P.NBD_REP_ACK) return { size, flags };
      if (r.type !== P.NBD_REP_INFO) throw new Error(`NBD_OPT_GO ${name}: reply 0x${r.type.toString(16)} ${r.data.toString()}`);
      if (r.data.readUInt16BE(0) === P.NBD_INFO_EXPORT) {
        size = r.data.readBigUInt64BE(2);
        flags = r.data.readUInt16BE(10);
      }
    }
  }
  request(type: number, o: { flags?: number; cookie?: bigint; offset?: bigint | number; length?: number; data?: Buffer } = {}): void {
    const h = Buffer.alloc(P.REQUEST_HEADER_BYTES);
    h.writeUInt32BE(P.NBD_REQUEST_MAGIC, 0);
    h.writeUInt16BE(o.flags ?? 0, 4);
    h.writeUInt16BE(type, 6);
    h.writeBigUInt64BE(o.cookie ?? 1n, 8);
    h.writeBigUInt64BE(BigInt(o.offset ?? 0), 16);
    h.writeUInt32BE(o.length ?? o.data?.length ?? 0, 24);
    this.send(h, o.data ?? Buffer.alloc(0));
  }
  /** One simple reply (with `dataLength` bytes if it succeeded) or one structured chunk. */
  reply(dataLength = 0): Promise<Reply> {
    return this.replyFor(() => dataLength);
  }

  /** reply() when replies come in any order: a simple reply's data length by its cookie. */
  async replyFor(dataLength: (cookie: bigint) => number): Promise<Reply> {
    const m = await this.read(4);
    if (m.readUInt32BE(0) === P.NBD_SIMPLE_REPLY_MAGIC) {
      const h = await this.read(12);
      const error = h.readUInt32BE(0);
      const cookie = h.readBigUInt64BE(4);
      return { kind: 'simple', error, cookie, payload: error ? Buffer.alloc(0) : await this.read(dataLength(cookie)) };
    }
    expect(m.readUInt32BE(0)).to.equal(P.NBD_STRUCTURED_REPLY_MAGIC);
    const h = await this.read(16);
    const payload = await this.read(h.readUInt32BE(12));
    const type = h.readUInt16BE(2);
    const error = type & 0x8000 ? payload.readUInt32BE(0) : 0;
    return { kind: 'structured', flags: h.readUInt16BE(0), type, error, cookie: h.readBigUInt64BE(4), payload };
  }
}

export function u32(v: number): Buffer {
  const b = Buffer.alloc(4);
  b.writeUInt32BE(v >>> 0, 0);
  return b;
}

export function infoRequest(name: string, infos: number[]): Buffer {
  const n = Buffer.from(name);
  const b = Buffer.alloc(4 + n.length + 2 + 2 * infos.length);
  b.writeUInt32BE(n.length, 0);
  n.copy(b, 4);
  b.writeUInt16BE(infos.length, 4 + n.length);
  infos.forEach((t, i) => b.writeUInt16BE(t, 6 + n.length + 2 * i));
  return b;
}

