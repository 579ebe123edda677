// The NBD read proxy (native/nbd-proxy.cc) in front of the agent's disk export, against
// a real server: reads of checked normal-class chunks are answered by its native
// thread, every other request reaches the JavaScript connection in the same stream and
// is answered as before, in simple and structured replies, pipelined, and through real
// clients (nbdcopy, qemu-io); a write is seen by the next read, its payload in a buffer
// the proxy lends, which comes back zeroed however the connection ends; every way a
// connection ends (DISC, a client gone mid-payload, a broken protocol, the server
// closing) ends it on both sides.
import { expect } from 'chai';
import { execFile } from 'node:child_process';
import { randomBytes } from 'node:crypto';
import fs from 'node:fs';
import path from 'node:path';
import { promisify } from 'node:util';
import type { RunningAgent } from '../../agent/daemon/start.js';
import { AgentDiskBackend } from '../../agent/disk/backend.js';
import { DeviceClient } from '../../agent/remote/device-client.js';
import * as P from '../../agent/disk/nbd/protocol.js';
import { NbdServer } from '../../agent/disk/nbd/server.js';
import { NBD_PROXY_WRITE_MAGIC } from '../../native/index.js';
import { expectSameBytes } from '../helpers/bytes.js';
import { agentInProcess } from '../helpers/fixtures.js';
import { RawClient, type Reply } from '../helpers/nbd-client.js';
import { startServer, tmpDir, waitFor, type ServerProc } from '../helpers/proc.js';

const run = promisify(execFile);
const CHUNK = 128 * 1024;
const CHUNKS = 16;
const SENSITIVE = 3;

/** A real server and an agent in this process, its disk exported as `image` on a socket in a fresh directory; stop() ends them all. */
async function agentExport(image: string, push: Parameters<typeof agentInProcess>[2], log?: (line: string) => void) {
  const s = await startServer();
  const dir = tmpDir(`lethe-nbd-${image}-`);
  const sock = path.join(dir, 'nbd.sock');
  let got: Awaited<ReturnType<typeof agentInProcess>> | undefined;
  let backend: AgentDiskBackend | undefined;
  let nbd: NbdServer | undefined;
  const stop = async () => {
    if (s.proc.pid) process.kill(s.proc.pid, 'SIGCONT'); // a test may have stopped it
    await nbd?.close();
    backend?.close();
    got?.agent.stop();
    await got?.agent.done;
    await s.stop();
    fs.rmSync(dir, { recursive: true, force: true });
  };
  try {
    got = await agentInProcess(s, image, push);
    backend = new AgentDiskBackend(got.agent.core);
    nbd = new NbdServer(new Map([[image, backend]]), log ? { log } : {});
    await nbd.listen({ path: sock });
  } catch (e) {
    await stop();
    throw e;
  }
  return { s, agent: got.agent, img: got.img, dir, sock, backend, nbd, stop };
}

describe('the NBD read proxy (real server, agent and clients)', function () {
  this.timeout(120_000);
  let agent: RunningAgent;
  let plain: Buffer;
  let nbd: NbdServer;
  let backend: AgentDiskBackend;
  let dir: string;
  let sock: string;
  const logs: string[] = [];
  let stop: (() => Promise<void>) | undefined;

  before(async () => {
    const x = await agentExport(
      'proxy',
      {
        plain: { disk: randomBytes(CHUNKS * CHUNK - 5000), mem: Buffer.alloc(0), state: Buffer.alloc(0) },
        policy: `sensitive:\n  memory: false\n  disk: [[${SENSITIVE * CHUNK}, ${(SENSITIVE + 1) * CHUNK}]]\n`,
      },
      (l) => logs.push(l),
    );
    ({ agent, dir, sock, backend, nbd, stop } = x);
    plain = Buffer.from(x.img.plain.disk);
    // Each chunk's tag checked once: the normal-class ones enter the native table.
    for (let i = 0; i < CHUNKS; i++) await agent.core.readRange('disk', i, 0, Buffer.alloc(100));
    expect(agent.core.diskReads.chunks).to.equal(CHUNKS - 1);
  });
  after(() => stop?.());

  /** A connected client past NBD_OPT_GO. */
  async function client(structured: boolean): Promise<RawClient> {
    const c = await RawClient.connect(sock);
    await c.greet();
    await c.go('proxy', { structured });
    return c;
  }

  type Ask = { cookie: bigint; type: number; offset: number; length: number; flags?: number; data?: Buffer };

  /** Sends every request at once (pipelined), then takes one reply for each, by cookie. */
  async function exchange(c: RawClient, asks: Ask[]): Promise<Map<bigint, Reply>> {
    for (const a of asks) c.request(a.type, { cookie: a.cookie, offset: a.offset, length: a.length, flags: a.flags, data: a.data });
    const byCookie = new Map(asks.map((a) => [a.cookie, a]));
    const replies = new Map<bigint, Reply>();
    while (replies.size < asks.length) {
      const r = await c.replyFor((cookie) => (byCookie.get(cookie)!.type === P.NBD_CMD_READ ? byCookie.get(cookie)!.length : 0));
      expect(replies.has(r.cookie), `one reply for cookie ${r.cookie}`).to.equal(false);
      replies.set(r.cookie, r);
    }
    return replies;
  }

  /** The bytes a read reply carries: simple, or the one OFFSET_DATA chunk (its offset checked). */
  function readData(r: Reply, offset: number): Buffer {
    expect(r.error, `reply ${r.cookie}`).to.equal(0);
    if (r.kind === 'simple') return r.payload;
    expect(r.type).to.equal(P.NBD_REPLY_TYPE_OFFSET_DATA);
    expect(r.flags! & P.NBD_REPLY_FLAG_DONE).to.not.equal(0);
    expect(Number(r.payload.readBigUInt64BE(0))).to.equal(offset);
    return r.payload.subarray(8);
  }

  for (const structured of [false, true]) {
    it(`answers the reads it can and passes the rest to JavaScript in the same stream (${structured ? 'structured' : 'simple'} replies)`, async () => {
      const c = await client(structured);
      try {
        const proxied = nbd.stats().proxied.reads;
        const size = plain.length;
        const written = randomBytes(300);
        const at = (structured ? 6 : 5) * CHUNK + 7;
        const replies = await exchange(c, [
          { cookie: 1n, type: P.NBD_CMD_READ, offset: 0, length: 4096 },
          { cookie: 2n, type: P.NBD_CMD_READ, offset: CHUNK - 100, length: 200 }, // two chunks
          { cookie: 3n, type: P.NBD_CMD_READ, offset: SENSITIVE * CHUNK + 10, length: 100 }, // sensitive: JavaScript
          { cookie: 4n, type: P.NBD_CMD_READ, offset: size - 10, length: 20 }, // past the end: EINVAL from JavaScript
          { cookie: 5n, type: P.NBD_CMD_READ, offset: 0, length: 512, flags: P.NBD_CMD_FLAG_NO_HOLE }, // a flag reads do not take
          { cookie: 6n, type: P.NBD_CMD_WRITE, offset: at, length: written.length, data: written },
          { cookie: 7n, type: P.NBD_CMD_READ, offset: 2 * CHUNK, length: 2 * CHUNK, flags: P.NBD_CMD_FLAG_FUA }, // two whole chunks
        ]);
        expectSameBytes(readData(replies.get(1n)!, 0), plain.subarray(0, 4096));
        expectSameBytes(readData(replies.get(2n)!, CHUNK - 100), plain.subarray(CHUNK - 100, CHUNK + 100));
        expectSameBytes(readData(replies.get(3n)!, SENSITIVE * CHUNK + 10), plain.subarray(SENSITIVE * CHUNK + 10, SENSITIVE * CHUNK + 110));
        expect(replies.get(4n)!.error).to.equal(P.NBD_EINVAL);
        expect(replies.get(5n)!.error).to.equal(P.NBD_EINVAL);
        expect(replies.get(6n)!.error).to.equal(0);
        expectSameBytes(readData(replies.get(7n)!, 2 * CHUNK), plain.subarray(2 * CHUNK, 4 * CHUNK));
        expect(nbd.stats().proxied.reads - proxied, 'reads 1, 2 answered natively').to.be.at.least(2);
        // Once its reply came, the write is what every later read sees, through the proxy or not.
        written.copy(plain, at);
        const after = await exchange(c, [
          { cookie: 8n, type: P.NBD_CMD_READ, offset: at - 7, length: 4096 },
          { cookie: 9n, type: P.NBD_CMD_READ, offset: at - 7 - CHUNK, length: 2 * CHUNK },
        ]);
        expectSameBytes(readData(after.get(8n)!, at - 7), plain.subarray(at - 7, at - 7 + 4096));
        expectSameBytes(readData(after.get(9n)!, at - 7 - CHUNK), plain.subarray(at - 7 - CHUNK, at - 7 + CHUNK));
        c.request(P.NBD_CMD_DISC, { cookie: 10n });
        expect(await c.closesWithin(10_000), 'DISC ends the connection').to.equal(true);
      } finally {
        c.destroy();
      }
    });
  }

  for (const structured of [false, true]) {
    it(`serves one connection's pipelined reads on several threads: every reply whole and right, and a DISC behind them ends it only after the last (${structured ? 'structured' : 'simple'})`, async () => {
      const c = await client(structured);
      try {
        const proxied = nbd.stats().proxied.reads;
        // Normal-class chunks only (the sensitive one and the written ones go to JavaScript):
        // whole chunks, pairs of them, and small reads across a boundary, mixed.
        const normal = [0, 1, 2, 4, 8, 9, 10, 11, 12, 13, 14];
        const asks = Array.from({ length: 240 }, (_, i) => {
          const k = normal[(i * 7) % normal.length];
          const length = i % 3 === 0 ? CHUNK : i % 3 === 1 ? 2 * CHUNK : 3000;
          const offset = i % 3 === 2 ? (k + 1) * CHUNK - 1000 : k * CHUNK;
          return { cookie: BigInt(i + 1), offset, length: Math.min(length, plain.length - offset) };
        });
        for (const a of asks) c.request(P.NBD_CMD_READ, { cookie: a.cookie, offset: a.offset, length: a.length });
        c.request(P.NBD_CMD_DISC, { cookie: 999n });
        const byCookie = new Map(asks.map((a) => [a.cookie, a]));
        const seen = new Set<bigint>();
        for (let n = 0; n < asks.length; n++) {
          const r = await c.replyFor((cookie) => byCookie.get(cookie)!.length);
          const a = byCookie.get(r.cookie)!;
          expect(seen.has(r.cookie), `one reply for cookie ${r.cookie}`).to.equal(false);
          seen.add(r.cookie);
          expectSameBytes(readData(r, a.offset), plain.subarray(a.offset, a.offset + a.length), `read ${r.cookie}`);
        }
        expect(await c.closesWithin(10_000), 'DISC ends the connection once every read is answered').to.equal(true);
        expect(nbd.stats().proxied.reads - proxied, 'answered natively').to.be.at.least(asks.length / 2);
      } finally {
        c.destroy();
      }
    });
  }

  it('real clients read the whole export through it: nbdcopy over four connections, qemu-io', async () => {
    const proxied = nbd.stats().proxied.reads;
    const uri = `nbd+unix:///proxy?socket=${sock}`;
    const out = path.join(dir, 'copy.raw');
    await run('nbdcopy', [uri, out]);
    expectSameBytes(fs.readFileSync(out), plain, 'nbdcopy');
    const at = 9 * CHUNK + 512;
    const { stdout } = await run('qemu-io', ['-r', '-f', 'raw', '-c', `read -v ${at} 64`, uri]);
    // "00000000:  81 db … (16 bytes)  ascii": the first 16 fields after the address.
    const hex = stdout.split('\n').filter((l) => /^[0-9a-f]{8}:/.test(l)).map((l) => l.split(':')[1].trim().split(/\s+/).slice(0, 16).join('')).join('');
    expect(hex).to.equal(plain.subarray(at, at + 64).toString('hex'));
    // nbdcopy's eight 256 KiB reads: the three that cover the sensitive chunk or one this device wrote go to JavaScript.
    expect(nbd.stats().proxied.reads - proxied, 'answered natively').to.be.at.least(5);
    await waitFor(async () => nbd.stats().connections.active === 0 || undefined, 10_000, 'the clients to be gone');
  });

  it('a chunk in the cache file that no read has checked is admitted by the proxy itself at its first read: no call into JavaScript', async () => {
    // As after a restart: the manifest installed anew, the table empty, told where the cached chunks lie.
    const device = new DeviceClient(agent.identity);
    try {
      agent.core.setManifest(await device.manifest(agent.lease.leaseId()), agent.core.writeGen);
    } finally {
      device.close();
    }
    expect(agent.core.diskReads.chunks).to.equal(0);
    const unwritten = [...Array(CHUNKS).keys()].filter((i) => i !== SENSITIVE && agent.core.entry('disk', i)!.gen !== agent.core.writeGen);
    expect(unwritten.length).to.be.at.least(3);
    expect(agent.core.diskReads.placed).to.equal(unwritten.length);
    const [whole, part, written] = unwritten;
    const c = await client(true);
    try {
      const jsReads = agent.core.stats.reads;
      const proxied = nbd.stats().proxied.reads;
      const { admits } = agent.core.diskReads;
      const replies = await exchange(c, [
        { cookie: 1n, type: P.NBD_CMD_READ, offset: whole * CHUNK, length: CHUNK },
        { cookie: 2n, type: P.NBD_CMD_READ, offset: part * CHUNK + 777, length: 4096 },
      ]);
      expectSameBytes(readData(replies.get(1n)!, whole * CHUNK), plain.subarray(whole * CHUNK, (whole + 1) * CHUNK), `chunk ${whole}, whole`);
      expectSameBytes(readData(replies.get(2n)!, part * CHUNK + 777), plain.subarray(part * CHUNK + 777, part * CHUNK + 777 + 4096), `chunk ${part}, 4 KiB`);
      expect(nbd.stats().proxied.reads - proxied, 'answered natively').to.equal(2);
      expect(agent.core.stats.reads, 'reads through JavaScript').to.equal(jsReads);
      expect(agent.core.diskReads).to.include({ admits: admits + 2, placed: unwritten.length - 2 });
      // A write to a chunk the table knows the place of, before any read: the next read has the new bytes.
      const next = randomBytes(4096);
      const wrote = await exchange(c, [{ cookie: 3n, type: P.NBD_CMD_WRITE, offset: written * CHUNK + 8192, length: next.length, data: next }]);
      expect(wrote.get(3n)!.error).to.equal(0);
      expect(agent.core.diskReads.placed, "the written chunk's place is dropped").to.equal(unwritten.length - 3);
      const after = await exchange(c, [{ cookie: 4n, type: P.NBD_CMD_READ, offset: written * CHUNK + 4096, length: 3 * 4096 }]);
      const want = Buffer.from(plain.subarray(written * CHUNK + 4096, written * CHUNK + 4 * 4096));
      next.copy(want, 4096);
      expectSameBytes(readData(after.get(4n)!, written * CHUNK + 4096), want, `chunk ${written} after the write`);
      c.request(P.NBD_CMD_DISC, { cookie: 9n });
      expect(await c.closesWithin(10_000), 'DISC ends the connection').to.equal(true);
    } finally {
      c.destroy();
    }
  });

  it('a client gone in the middle of a write, and one that breaks the protocol, end their connections; others go on', async () => {
    const errors = nbd.stats().protocolErrors;
    const gone = await client(false);
    gone.request(P.NBD_CMD_WRITE, { cookie: 1n, offset: 0, length: 4096, data: randomBytes(1000) }); // 3 KiB short
    gone.destroy();
    const broken = await client(true);
    broken.send(Buffer.alloc(P.REQUEST_HEADER_BYTES, 0x41));
    expect(await broken.closesWithin(10_000), 'a request with a bad magic ends the connection').to.equal(true);
    await waitFor(async () => nbd.stats().connections.active === 0 || undefined, 10_000, 'both connections to end');
    expect(nbd.stats().protocolErrors, 'a payload cut short, a bad magic').to.equal(errors + 2);
    const c = await client(true);
    try {
      const r = await exchange(c, [{ cookie: 1n, type: P.NBD_CMD_READ, offset: 4096, length: 4096 }]);
      expectSameBytes(readData(r.get(1n)!, 4096), plain.subarray(4096, 8192));
    } finally {
      c.destroy();
    }
  });

  /**
   * The table's write buffers, as the proxies lend them: none out, and every byte zero.
   * Called once every reply came (a write gives its buffer back before it answers) or the
   * connection is gone (its proxy takes back what was never read as it closes).
   */
  function writeBuffersBack(): void {
    const table = agent.core.readTable;
    expect(table.stats().writesOut, 'write buffers out').to.equal(0);
    const views = (table as unknown as { writeViews: Buffer[] }).writeViews;
    expect(views.length).to.be.greaterThan(0);
    views.forEach((v, i) => expect(v.every((b) => b === 0), `write buffer ${i} zeroed`).to.equal(true));
  }

  it("a write's payload comes in a buffer the proxy lends: every write lands, and each buffer comes back zeroed", async () => {
    const c = await client(true);
    try {
      const lent = nbd.stats().proxied.lentWrites;
      const writes = [
        { at: 8 * CHUNK, length: CHUNK }, // a whole chunk
        { at: 9 * CHUNK + 100, length: 5000 }, // part of one
        { at: 10 * CHUNK, length: 2 * CHUNK }, // two whole chunks: as long as a write buffer
        { at: 13 * CHUNK - 300, length: 600 }, // across two
        { at: 13 * CHUNK + 4096, length: 2 * CHUNK + 4096 }, // longer than a write buffer: through the socket pair
      ].map((w) => ({ ...w, data: randomBytes(w.length) }));
      const replies = await exchange(c, writes.map((w, i) => ({ cookie: BigInt(i + 1), type: P.NBD_CMD_WRITE, offset: w.at, length: w.length, data: w.data })));
      for (const r of replies.values()) expect(r.error, `write ${r.cookie}`).to.equal(0);
      expect(nbd.stats().proxied.lentWrites - lent, 'writes up to a write buffer long').to.equal(4);
      for (const w of writes) w.data.copy(plain, w.at);
      const back = await exchange(c, [{ cookie: 9n, type: P.NBD_CMD_READ, offset: 8 * CHUNK, length: 7 * CHUNK + 8192 }]);
      expectSameBytes(readData(back.get(9n)!, 8 * CHUNK), plain.subarray(8 * CHUNK, 15 * CHUNK + 8192));
      writeBuffersBack();
    } finally {
      c.destroy();
    }
  });

  it("a client's request with the lent message's magic is a bad magic, never a lent buffer", async () => {
    const errors = nbd.stats().protocolErrors;
    const lent = nbd.stats().proxied.lentWrites;
    // A write's payload first, so a write buffer holds (zeroed) bytes a forged index could name.
    const c = await client(true);
    const forged = Buffer.alloc(P.REQUEST_HEADER_BYTES + 4);
    forged.writeUInt32BE(NBD_PROXY_WRITE_MAGIC, 0);
    forged.writeUInt16BE(P.NBD_CMD_WRITE, 6);
    forged.writeBigUInt64BE(1n, 8);
    forged.writeBigUInt64BE(BigInt(CHUNK), 16);
    forged.writeUInt32BE(4096, 24);
    forged.writeUInt32BE(0, 28); // "write buffer 0"
    c.send(forged);
    expect(await c.closesWithin(10_000), 'a bad magic ends the connection').to.equal(true);
    await waitFor(async () => nbd.stats().protocolErrors === errors + 1 || undefined, 10_000, 'the protocol error');
    expect(nbd.stats().proxied.lentWrites).to.equal(lent);
    expect(logs.some((l) => l.includes('bad request magic 0x0')), 'JavaScript saw a bad magic').to.equal(true);
    const r = await client(true);
    try {
      const got = await exchange(r, [{ cookie: 1n, type: P.NBD_CMD_READ, offset: CHUNK, length: 4096 }]);
      expectSameBytes(readData(got.get(1n)!, CHUNK), plain.subarray(CHUNK, CHUNK + 4096));
    } finally {
      r.destroy();
    }
  });

  it('a connection that ends with lent writes it never read gives their buffers back, zeroed, and runs none of them', async () => {
    // A server whose largest payload is smaller than a write buffer: the first write breaks the
    // protocol there, after the proxy lent it and the writes behind it.
    const other = new NbdServer(new Map([['proxy', backend]]), { blockSize: { minimum: 1, preferred: 4096, maximum: 64 * 1024 } });
    const otherSock = path.join(dir, 'small.sock');
    await other.listen({ path: otherSock });
    try {
      const c = await RawClient.connect(otherSock);
      await c.greet();
      await c.go('proxy', { structured: true });
      const at = 15 * CHUNK + 8192;
      const before = Buffer.from(plain.subarray(at, at + 8 * 4096));
      c.request(P.NBD_CMD_WRITE, { cookie: 1n, offset: 0, length: CHUNK, data: randomBytes(CHUNK) });
      for (let i = 0; i < 8; i++) c.request(P.NBD_CMD_WRITE, { cookie: BigInt(2 + i), offset: at + i * 4096, length: 4096, data: randomBytes(4096) });
      expect(await c.closesWithin(10_000), 'a payload over the maximum ends the connection').to.equal(true);
      expect(other.stats().protocolErrors).to.equal(1);
      await waitFor(async () => other.stats().connections.active === 0 || undefined, 10_000, 'the connection to end');
      writeBuffersBack();
      const r = await client(true);
      try {
        const got = await exchange(r, [{ cookie: 1n, type: P.NBD_CMD_READ, offset: at, length: 8 * 4096 }]);
        expectSameBytes(readData(got.get(1n)!, at), before);
      } finally {
        r.destroy();
      }
    } finally {
      await other.close();
    }
  });

  it('the server closing ends connections the proxy holds', async () => {
    const other = new NbdServer(new Map([['proxy', backend]]));
    const otherSock = path.join(dir, 'other.sock');
    await other.listen({ path: otherSock });
    const c = await RawClient.connect(otherSock);
    await c.greet();
    await c.go('proxy');
    c.request(P.NBD_CMD_READ, { cookie: 1n, offset: 0, length: 512 });
    expectSameBytes((await c.reply(512)).payload, plain.subarray(0, 512));
    await other.close();
    expect(await c.closesWithin(10_000)).to.equal(true);
    expect(other.stats().connections.active).to.equal(0);
  });
});

describe('the NBD read proxy lends one connection at most half of the write buffers (real server and agent)', function () {
  this.timeout(120_000);
  let s: ServerProc;
  let agent: RunningAgent;
  let nbd: NbdServer;
  let sock: string;
  let stop: (() => Promise<void>) | undefined;

  before(async () => {
    ({ s, agent, nbd, sock, stop } = await agentExport('lend', { plain: { disk: randomBytes(CHUNKS * CHUNK), mem: Buffer.alloc(0), state: Buffer.alloc(0) } }));
  });
  after(() => stop?.());

  it("a connection whose writes cannot finish holds half of them; another connection's write still gets one, and all come back zeroed", async () => {
    const table = agent.core.readTable;
    const half = 8; // NBD_PROXY_WRITE_BUFFERS / 2
    const client = async () => {
      const c = await RawClient.connect(sock);
      await c.greet();
      await c.go('lend', { structured: true });
      return c;
    };
    const a = await client();
    const b = await client();
    const data = Array.from({ length: half + 4 }, () => randomBytes(4096));
    try {
      // No write key is held yet: with the server stopped, every write waits for its key.
      process.kill(s.proc.pid!, 'SIGSTOP');
      data.forEach((d, i) => a.request(P.NBD_CMD_WRITE, { cookie: BigInt(i + 1), offset: i * CHUNK, length: 4096, data: d }));
      await waitFor(async () => nbd.stats().requests.write === data.length || undefined, 20_000, 'every write read');
      expect(nbd.stats().proxied.lentWrites, 'writes in lent buffers').to.equal(half);
      expect(table.stats().writesOut).to.equal(half);
      b.request(P.NBD_CMD_WRITE, { cookie: 100n, offset: 15 * CHUNK, length: 4096, data: randomBytes(4096) });
      await waitFor(async () => nbd.stats().proxied.lentWrites === half + 1 || undefined, 20_000, "the other connection's write in a lent buffer");
      process.kill(s.proc.pid!, 'SIGCONT');
      for (let i = 0; i < data.length; i++) expect((await a.replyFor(() => 0)).error).to.equal(0);
      expect((await b.replyFor(() => 0)).error).to.equal(0);
      expect(table.stats().writesOut, 'write buffers out').to.equal(0);
      const views = (table as unknown as { writeViews: Buffer[] }).writeViews;
      views.forEach((v, i) => expect(v.every((x) => x === 0), `write buffer ${i} zeroed`).to.equal(true));
      for (let i = 0; i < data.length; i++) {
        a.request(P.NBD_CMD_READ, { cookie: BigInt(200 + i), offset: i * CHUNK, length: 4096 });
        const r = await a.replyFor(() => 4096);
        expectSameBytes(r.payload.subarray(8), data[i]);
      }
    } finally {
      process.kill(s.proc.pid!, 'SIGCONT');
      a.destroy();
      b.destroy();
    }
  });
});
