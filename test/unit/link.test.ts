// The link emulator (test/helpers/link.ts): it must delay, cap and drop for real, or
// every WAN figure measured through it means nothing. Only lower bounds on time are
// asserted: a busy machine makes things slower, never faster.
import { expect } from 'chai';
import crypto from 'node:crypto';
import net from 'node:net';
import { Link } from '../helpers/link.js';

/** A TCP server on loopback that runs `onConn` for each connection. */
async function tcpServer(onConn: (s: net.Socket) => void): Promise<{ port: number; close: () => Promise<void> }> {
  const sockets = new Set<net.Socket>();
  const server = net.createServer((s) => {
    sockets.add(s);
    s.on('close', () => sockets.delete(s));
    s.on('error', () => {});
    onConn(s);
  });
  await new Promise<void>((r) => server.listen(0, '127.0.0.1', () => r()));
  return {
    port: (server.address() as net.AddressInfo).port,
    close: () => {
      for (const s of sockets) s.destroy();
      return new Promise<void>((r) => server.close(() => r()));
    },
  };
}

const echo = () => tcpServer((s) => s.pipe(s));

function connect(port: number): Promise<net.Socket> {
  return new Promise((resolve, reject) => {
    const s = net.connect(port, '127.0.0.1', () => resolve(s));
    s.once('error', reject);
  });
}

/** Reads exactly `n` bytes from `s`. */
function readBytes(s: net.Socket, n: number): Promise<Buffer> {
  return new Promise((resolve, reject) => {
    const parts: Buffer[] = [];
    let got = 0;
    const onData = (d: Buffer) => {
      parts.push(d);
      got += d.length;
      if (got >= n) {
        s.off('data', onData);
        resolve(Buffer.concat(parts).subarray(0, n));
      }
    };
    s.on('data', onData);
    s.once('close', () => got < n && reject(new Error(`connection closed after ${got} of ${n} bytes`)));
  });
}

describe('link emulator (test helper for WAN tests and benches)', () => {
  const cleanup: (() => Promise<void>)[] = [];
  afterEach(async () => {
    for (const c of cleanup.splice(0).reverse()) await c();
  });
  async function setup(o: Parameters<typeof Link.start>[1]) {
    const target = await echo();
    const link = await Link.start({ port: target.port }, o);
    cleanup.push(target.close, () => link.close());
    return link;
  }

  it('delays each direction: a round trip takes at least twice the one-way delay, and the bytes come back intact', async () => {
    const link = await setup({ delayMs: 60 });
    const s = await connect(link.port);
    cleanup.push(async () => void s.destroy());
    const data = crypto.randomBytes(300_000);
    const t0 = performance.now();
    s.write(data);
    const back = await readBytes(s, data.length);
    expect(performance.now() - t0).to.be.at.least(120);
    expect(Buffer.compare(back, data), 'echoed bytes').to.equal(0);
    expect(link.stats()).to.deep.include({ up: data.length, down: data.length, connections: 1 });
  });

  it('caps the rate: 1 MiB at 20 Mbit/s takes at least 0.42 s each way, shared by two connections', async () => {
    const link = await setup({ mbit: 20 });
    const a = await connect(link.port);
    const b = await connect(link.port);
    cleanup.push(async () => void a.destroy(), async () => void b.destroy());
    const half = crypto.randomBytes(512 * 1024);
    const t0 = performance.now();
    a.write(half);
    b.write(half);
    const [ra, rb] = await Promise.all([readBytes(a, half.length), readBytes(b, half.length)]);
    // Both halves share one cap: 1 MiB = 8.39 Mbit, at 20 Mbit/s 0.42 s up (and the same down, overlapped).
    expect(performance.now() - t0).to.be.at.least(419);
    expect(Buffer.compare(ra, half)).to.equal(0);
    expect(Buffer.compare(rb, half)).to.equal(0);
  });

  it("a stalled drop holds every byte until the link is back, and the connection carries on", async () => {
    const link = await setup({ delayMs: 5 });
    const s = await connect(link.port);
    cleanup.push(async () => void s.destroy());
    s.write('a');
    expect((await readBytes(s, 1)).toString()).to.equal('a');
    const t0 = performance.now();
    link.drop(400, 'stall');
    s.write('b');
    expect((await readBytes(s, 1)).toString()).to.equal('b');
    expect(performance.now() - t0, 'held for the outage').to.be.at.least(400);
    expect(s.destroyed).to.equal(false);
  });

  it('a reset drop closes every connection and refuses new ones until the link is back', async () => {
    const link = await setup({});
    const s = await connect(link.port);
    const closed = new Promise((r) => s.once('close', r));
    s.on('error', () => {});
    link.drop(300, 'reset');
    await closed;
    const refused = await connect(link.port);
    refused.on('error', () => {});
    await new Promise((r) => refused.once('close', r));
    await new Promise((r) => setTimeout(r, 350));
    const again = await connect(link.port);
    cleanup.push(async () => void again.destroy());
    again.write('c');
    expect((await readBytes(again, 1)).toString()).to.equal('c');
  });

  it('a server that answers and closes at once: the answer arrives whole before the end', async () => {
    const answer = crypto.randomBytes(200_000);
    const target = await tcpServer((s) => s.end(answer));
    const link = await Link.start({ port: target.port }, { delayMs: 30, mbit: 50 });
    cleanup.push(target.close, () => link.close());
    const s = await connect(link.port);
    const parts: Buffer[] = [];
    s.on('data', (d) => parts.push(d));
    await new Promise((r) => s.once('end', r));
    expect(Buffer.compare(Buffer.concat(parts), answer)).to.equal(0);
  });

  it('refuses a negative delay or rate', async () => {
    let err: unknown;
    try {
      await Link.start({ port: 1 }, { delayMs: -1 });
    } catch (e) {
      err = e;
    }
    expect(String(err)).to.match(/delay and rate of 0 or more/);
  });
});
