// Background prefetch over a slow link (the link emulator between agent and server):
// its requests shrink to a few milliseconds of the link each, several in flight, and
// every chunk still arrives whole and in the cache.
import { expect } from 'chai';
import fs from 'node:fs';
import path from 'node:path';
import { randomBytes } from 'node:crypto';
import { assign, enrolledDevice, pushImage, testUnlock } from '../helpers/fixtures.js';
import { Link } from '../helpers/link.js';
import { startServer, waitFor, type ServerProc } from '../helpers/proc.js';
import { startAgent, type RunningAgent } from '../../agent/index.js';
import { expectSameBytes } from '../helpers/bytes.js';

const PAGE = 4096;
const PAGES = 1024; // 4 MiB of guest RAM: under 2 s at 20 Mbit/s

describe('prefetch paced to a slow link (real server behind the link emulator)', function () {
  this.timeout(120_000);
  let s: ServerProc;
  let link: Link;
  let agent: RunningAgent | undefined;
  const mem = randomBytes(PAGES * PAGE);

  before(async () => {
    s = await startServer();
    link = await Link.start({ port: Number(new URL(s.url).port) }, { delayMs: 20, mbit: 20 });
  });
  after(async () => {
    agent?.stop();
    await agent?.done;
    await link?.close();
    await s?.stop();
  });

  it('fetches every page in requests smaller than the unpaced 64, and keeps each one whole', async () => {
    await pushImage(s, 'paced', { plain: { mem, disk: Buffer.alloc(0), state: Buffer.alloc(0) }, policy: 'sensitive:\n  memory: false\n' });
    const d = await enrolledDevice(s);
    await assign(s, d.deviceId, 'paced');
    d.close();
    // The device reaches the server through the link, as a laptop behind it would.
    const info = path.join(d.home, 'device.json');
    fs.writeFileSync(info, JSON.stringify({ ...JSON.parse(fs.readFileSync(info, 'utf8')), server: link.via(s.url) }, null, 2) + '\n');
    agent = await startAgent({ home: d.home, image: 'paced', cacheBytes: 1 << 26, heartbeatMs: 30_000, prefetch: true, nbd: null, log: () => {}, unlock: testUnlock(), push: false });
    await agent.lease.whenActive();
    await waitFor(async () => {
      const p = agent!.status().prefetch;
      return p.total > 0 && p.done === p.total ? true : undefined;
    }, 100_000, 'the prefetch');
    const f = agent.status().fetch;
    expect(f.prefetchChunks, 'every page came by prefetch').to.equal(PAGES);
    // The first requests go unpaced (no rate measured yet); the rest are a few
    // milliseconds of a 20 Mbit/s link (≈ 6 pages), however slow this machine is.
    expect(f.prefetchChunks / f.prefetchBatches, 'pages a request').to.be.lessThan(32);
    // What it measured of the link is bounded by the link itself: no round trip under
    // its 40 ms, no rate much above its 20 Mbit/s (2.5 MB/s).
    expect(f.link.rttMs, 'round trip').to.be.at.least(40);
    expect(f.link.bytesPerSec, 'rate').to.be.above(0).and.at.most(1.5 * 2.5e6);
    for (let i = 0; i < PAGES; i += 97) {
      const out = Buffer.alloc(PAGE);
      expect(await agent.core.readInto('mem', i, out, { resident: true })).to.equal('cache');
      expectSameBytes(out, mem.subarray(i * PAGE, (i + 1) * PAGE), `page ${i}`);
    }
  });
});
