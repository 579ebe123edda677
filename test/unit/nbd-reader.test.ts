// The NBD server's ByteReader on a socket made to read into one buffer (onread), as the
// agent's export reads the requests the read proxy forwards: exact byte counts across
// reads, and a write's payload left nowhere but in the buffer it was read into. The
// socket is a real loopback TCP connection.
import { expect } from 'chai';
import net from 'node:net';
import { randomBytes } from 'node:crypto';
import { ByteReader } from '../../agent/disk/nbd/reader.js';
import { expectSameBytes } from '../helpers/bytes.js';

/** A connected pair: the server's end to write with, and a reader on the client's, made with onread. */
async function pair(): Promise<{ peer: net.Socket; reader: ByteReader; readBuffer: Buffer; close: () => void }> {
  const server = net.createServer();
  await new Promise<void>((r) => server.listen(0, '127.0.0.1', () => r()));
  const accepted = new Promise<net.Socket>((r) => server.once('connection', r));
  const { reader, onread } = ByteReader.onread();
  const socket = net.connect({ port: (server.address() as net.AddressInfo).port, host: '127.0.0.1', onread });
  const r = reader(socket);
  const peer = await accepted;
  return { peer, reader: r, readBuffer: onread.buffer, close: () => (socket.destroy(), peer.destroy(), server.close()) };
}

/** Every buffer the reader holds bytes in, reused or held (white-box: the invariant is about them). */
const held = (r: ByteReader) => {
  const x = r as unknown as { spare: Buffer[]; chunks: { buf: Buffer }[] };
  return [...x.spare, ...x.chunks.map((c) => c.buf)];
};
const zero = (b: Buffer) => b.every((v) => v === 0);

describe('NBD byte reader on an onread socket (loopback TCP)', () => {
  it('reads a header and a payload that came in one stream, and keeps no copy of the payload', async () => {
    const p = await pair();
    try {
      const header = randomBytes(28);
      const payload = randomBytes(300 * 1024);
      p.peer.write(Buffer.concat([header, payload]));
      expectSameBytes(await p.reader.read(28), header, 'header');
      // The socket read that brought the header brought payload too: held until the read below takes it.
      const dest = Buffer.alloc(payload.length);
      await p.reader.readInto(dest);
      expectSameBytes(dest, payload, 'payload');
      expect(zero(p.readBuffer), 'the buffer the socket reads into').to.equal(true);
      const bufs = held(p.reader);
      expect(bufs.length, 'bytes were held in reused buffers').to.be.greaterThan(0);
      for (const b of bufs) expect(zero(b), 'a reused buffer').to.equal(true);
    } finally {
      p.close();
    }
  });

  it('end() zeroes bytes it held and no read took', async () => {
    const p = await pair();
    try {
      p.peer.write(randomBytes(100 * 1024));
      await p.reader.read(10); // the socket read that brought these brought more
      expect(held(p.reader).some((b) => !zero(b)), 'bytes are held').to.equal(true);
      p.reader.end();
      for (const b of held(p.reader)) expect(zero(b)).to.equal(true);
      expect(zero(p.readBuffer)).to.equal(true);
      await p.reader.read(1).then(
        () => expect.fail('a read after end() should fail'),
        (e: Error) => expect(e.constructor.name).to.equal('ConnectionEnded'),
      );
    } finally {
      p.close();
    }
  });
});
