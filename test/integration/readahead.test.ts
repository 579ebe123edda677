// Guest RAM read in order from an empty cache: the agent core fetches the next
// pages in the same request (readahead), caches them only as the server's
// checked ciphertext, and fetches a page read out of order on its own.
import { expect } from 'chai';
import { randomBytes } from 'node:crypto';
import { agentInProcessSuite } from '../helpers/fixtures.js';
import { expectSameBytes } from '../helpers/bytes.js';

const PAGE = 4096;
const PAGES = 64;

describe('readahead of guest RAM (real server)', function () {
  this.timeout(30_000);
  const t = agentInProcessSuite('ram', { plain: { mem: randomBytes(PAGES * PAGE) }, policy: 'sensitive:\n  memory: false\n' });
  const page = (i: number) => t.img.plain.mem.subarray(i * PAGE, (i + 1) * PAGE);
  const fetched = () => ({ ...t.agent.status().fetch });

  async function read(i: number): Promise<string> {
    const out = Buffer.alloc(PAGE);
    const src = await t.agent.core.readInto('mem', i, out, { resident: true });
    expectSameBytes(out, page(i), `page ${i}`);
    return src;
  }

  it('a page read right after its predecessor comes alone, and the next 15 in one request behind it', async () => {
    expect(await read(0)).to.equal('server');
    const before = fetched();
    expect(await read(1)).to.equal('server');
    const after = fetched();
    expect(after.demandBatches - before.demandBatches).to.equal(1);
    expect(after.demandChunks - before.demandChunks).to.equal(1);
    expect(after.readaheadBatches - before.readaheadBatches).to.equal(1);
    expect(after.readaheadChunks - before.readaheadChunks).to.equal(15);
    // Each comes with the readahead (still on its way, or cached by now), not on its own.
    for (let i = 2; i <= 16; i++) expect(await read(i), `page ${i}`).to.be.oneOf(['cache', 'server']);
    const later = fetched();
    expect(later.demandBatches + later.readaheadBatches, 'no request for pages already fetched ahead').to.equal(after.demandBatches + after.readaheadBatches);
    expect(await read(17)).to.equal('server');
  });

  it('a page read out of order comes alone', async () => {
    const before = fetched();
    expect(await read(40)).to.equal('server');
    expect(fetched().demandChunks - before.demandChunks).to.equal(1);
    expect(fetched().readaheadChunks - before.readaheadChunks).to.equal(0);
    expect(await read(41)).to.equal('server'); // its predecessor is cached now: readahead again
    expect(fetched().demandChunks - before.demandChunks).to.equal(2);
    expect(fetched().readaheadChunks - before.readaheadChunks).to.equal(15);
  });

  it('concurrent reads of a page on its way share one fetch', async () => {
    const before = fetched();
    expect(await Promise.all([read(60), read(60)])).to.deep.equal(['server', 'server']); // page 59 is not cached: no readahead
    expect(fetched().demandChunks - before.demandChunks).to.equal(1);
  });
});

describe('readahead of the disk (real server)', function () {
  this.timeout(30_000);
  const CHUNK = 128 * 1024;
  const t = agentInProcessSuite('disk', { plain: { disk: randomBytes(20 * CHUNK), mem: Buffer.alloc(0), state: Buffer.alloc(0) } });
  const fetched = () => ({ ...t.agent.status().fetch });

  async function range(i: number): Promise<string> {
    const out = Buffer.alloc(4096);
    const src = await t.agent.core.readRange('disk', i, 1000, out);
    expectSameBytes(out, t.img.plain.disk.subarray(i * CHUNK + 1000, i * CHUNK + 1000 + 4096), `chunk ${i}`);
    return src;
  }

  it('a chunk read right after its predecessor brings the next 7 (1 MiB) in one request', async () => {
    expect(await range(3)).to.equal('server');
    const before = fetched();
    expect(await range(4)).to.equal('server');
    expect(fetched().demandChunks - before.demandChunks).to.equal(1);
    expect(fetched().readaheadBatches - before.readaheadBatches).to.equal(1);
    expect(fetched().readaheadChunks - before.readaheadChunks).to.equal(7);
    for (let i = 5; i <= 11; i++) expect(await range(i), `chunk ${i}`).to.be.oneOf(['cache', 'server']);
    expect(fetched().demandChunks - before.demandChunks, 'no request for chunks already fetched ahead').to.equal(1);
    expect(await range(12)).to.equal('server');
  });
});
