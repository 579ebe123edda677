// The agent core's keys for guest RAM, against a real server: batches of
// sensitive and write keys never take in a chunk this device wrote, and keys
// whose plaintext is gone are dropped.
import { expect } from 'chai';
import { randomBytes } from 'node:crypto';
import { DeviceClient } from '../../agent/remote/device-client.js';
import { closeIdentity, loadIdentity } from '../../agent/keys/identity.js';
import { agentInProcessSuite, rejects, testUnlock } from '../helpers/fixtures.js';
import { waitFor } from '../helpers/proc.js';
import { KEY_BATCH } from '../../agent/chunks/chunk-keys.js';
import { SEAL_BUFFERS } from '../../agent/chunks/writes.js';
import { expectSameBytes } from '../helpers/bytes.js';

const PAGE = 4096;

describe('guest RAM keys and the suspended state in the agent core (real server)', function () {
  this.timeout(30_000);
  const t = agentInProcessSuite('ram'); // mem chunks 0, 2, 4, 6 stored (sensitive); 1, 3, 5, 7 zero
  const page = (i: number) => t.img.plain.mem.subarray(i * PAGE, (i + 1) * PAGE);

  it("a sensitive key batch leaves out a neighbour this device wrote; both read back", async () => {
    const core = t.agent.core;
    const mine = randomBytes(PAGE);
    await core.write('mem', 1, mine); // zero in the image: the server has no chunk 1 to release a key for
    core.evict('mem', 1);
    expect(core.hasWriteKey('mem', 1), 'the write key left with the page').to.equal(false);
    const out = Buffer.alloc(PAGE);
    expect(await core.readInto('mem', 0, out)).to.equal('server');
    expectSameBytes(out, page(0));
    await core.readInto('mem', 1, out);
    expectSameBytes(out, mine);
  });

  it('a fault on guest RAM brings the write keys of its neighbours in the same request', async () => {
    const core = t.agent.core;
    const before = core.stats.keyRequests;
    await core.readInto('mem', 5, Buffer.alloc(PAGE), { resident: true, writable: true }); // zero page: no read key
    await core.ensureWriteKeys('mem', [5]); // the fault did not wait for it; this joins the request on its way
    expect(core.stats.keyRequests - before).to.equal(1);
    for (const i of [5, 6, 7]) expect(core.hasWriteKey('mem', i), `page ${i}`).to.equal(true);
    core.evict('mem', 5);
    expect(core.hasWriteKey('mem', 5), 'the write key left with the page').to.equal(false);
  });

  it('keys whose plaintext is not resident are dropped; a resident page keeps its own', async () => {
    const core = t.agent.core;
    await core.readInto('mem', 2, Buffer.alloc(PAGE), { resident: true, writable: true });
    await core.ensureWriteKeys('mem', [2]);
    expect(t.agent.status().keys.sensitiveKeys).to.be.greaterThan(2); // neighbours came with it
    const held = t.agent.status().keys.sensitiveKeys;
    core.dropKeysWithoutPlaintext('mem', 60_000, () => false);
    expect(t.agent.status().keys.sensitiveKeys, 'keys younger than the idle time stay').to.equal(held);
    core.dropKeysWithoutPlaintext('mem', 0, () => false);
    expect(t.agent.status().keys.sensitiveKeys).to.equal(2); // page 2's read key and write key
    expect(core.hasWriteKey('mem', 2)).to.equal(true);
    const out = Buffer.alloc(PAGE);
    const before = core.stats.keyRequests;
    await core.readInto('mem', 2, out);
    expect(core.stats.keyRequests, 'the resident page needed no new key').to.equal(before);
    expectSameBytes(out, page(2));
  });

  it("a suspend's new device state replaces the image's whole, at its own size", async () => {
    const core = t.agent.core;
    const oldSize = core.sizeOf('state'); // 8 chunks of 128 KiB, odd ones zero
    const state = randomBytes(300 * 1024); // 3 chunks, the last one short
    await core.replaceState(state);
    const id = await loadIdentity(t.home, testUnlock());
    const client = new DeviceClient(id);
    try {
      const r = await core.checkin(client);
      expect(r.version).to.be.greaterThan(t.img.version);
    } finally {
      client.close();
      closeIdentity(id);
    }
    await t.agent.lease.reacquire();
    expect(core.manifest!.version).to.be.greaterThan(t.img.version);
    expect(core.sizeOf('state')).to.equal(state.length).and.not.equal(oldSize);
    expect(core.chunkIndexes('state')).to.deep.equal([0, 1, 2]);
    const out = Buffer.alloc(300 * 1024);
    // The cache named the written chunks by their seal ids; the check-in renamed them by the SHA-256 the version names them by.
    for (let i = 0; i < 3; i++) {
      const source = await core.readInto('state', i, out.subarray(i * 128 * 1024, Math.min((i + 1) * 128 * 1024, out.length)));
      expect(source, `state chunk ${i} after the check-in`).to.equal('cache');
    }
    expectSameBytes(out, state);
  });

  it('a smaller state after a suspend that failed before check-in: the larger one leaves nothing behind', async () => {
    const core = t.agent.core;
    await core.replaceState(randomBytes(5 * 128 * 1024)); // a suspend that got no further
    const state = randomBytes(200 * 1024);
    await core.replaceState(state);
    const id = await loadIdentity(t.home, testUnlock());
    const client = new DeviceClient(id);
    try {
      await core.checkin(client);
    } finally {
      client.close();
      closeIdentity(id);
    }
    await t.agent.lease.reacquire();
    expect(core.chunkIndexes('state')).to.deep.equal([0, 1]);
    const out = Buffer.alloc(state.length);
    for (let i = 0; i < 2; i++) await core.readInto('state', i, out.subarray(i * 128 * 1024, Math.min((i + 1) * 128 * 1024, out.length)));
    expectSameBytes(out, state);
  });

  it('a write-key request whose new state size does not fit its chunks changes nothing', async () => {
    const id = await loadIdentity(t.home, testUnlock());
    const client = new DeviceClient(id);
    try {
      const leaseId = t.agent.lease.leaseId();
      // The state has 2 chunks; a size of one chunk with chunk 3 asked for is refused as a whole ...
      const e = await rejects(client.keys(leaseId, [{ kind: 'state', index: 3 }], true, 100 * 1024));
      expect(e.code).to.equal('UNKNOWN_CHUNK');
      // ... so the draft keeps its two chunks.
      const r = await client.keys(leaseId, [{ kind: 'state', index: 1 }], true);
      expect(r.chunks).to.have.length(1);
    } finally {
      client.close();
      closeIdentity(id);
    }
  });
});

describe('disk write keys in the agent core (real server)', function () {
  this.timeout(60_000);
  const CHUNK = 128 * 1024;
  const CHUNKS = 12 * KEY_BATCH; // the tests' regions: 0 to 4 batches, 5 batches on, 8 batches on
  const t = agentInProcessSuite('disk-keys', { plain: { disk: randomBytes(CHUNKS * CHUNK), mem: Buffer.alloc(0), state: Buffer.alloc(0) } });
  const held = (from: number, to: number) => Array.from({ length: to - from }, (_, i) => from + i).filter((i) => t.agent.core.hasWriteKey('disk', i));

  it('a run of writes asks for the next write keys half way through the window it holds, a window that grows with the run; a write out of a run asks for none', async () => {
    const core = t.agent.core;
    const before = core.stats.keyRequests;
    const asked = () => core.stats.keyRequests - before;
    await core.write('disk', 0, randomBytes(CHUNK));
    expect(asked(), 'the first write: its batch').to.equal(1);
    expect(held(0, CHUNKS)).to.deep.equal(Array.from({ length: KEY_BATCH }, (_, i) => i));
    for (let i = 1; i < KEY_BATCH / 2; i++) await core.write('disk', i, randomBytes(CHUNK));
    expect(asked(), 'still inside the first half').to.equal(1);
    await core.write('disk', KEY_BATCH / 2, randomBytes(CHUNK));
    // Asked for in the background, before the run needs them: one more batch.
    await waitFor(async () => held(KEY_BATCH, 2 * KEY_BATCH).length === KEY_BATCH || undefined, 20_000, 'the next batch of write keys');
    expect(asked()).to.equal(2);
    for (let i = KEY_BATCH / 2 + 1; i < KEY_BATCH; i++) await core.write('disk', i, randomBytes(CHUNK));
    expect(asked(), 'the run reached the next batch without a wait').to.equal(2);
    // A batch into the run, chunk 0 written a batch back: the window is two batches, asked for one batch ahead.
    await core.write('disk', KEY_BATCH, randomBytes(CHUNK));
    await waitFor(async () => held(2 * KEY_BATCH, 4 * KEY_BATCH).length === 2 * KEY_BATCH || undefined, 20_000, 'two batches of write keys ahead');
    expect(asked()).to.equal(3);
    expect(held(4 * KEY_BATCH, CHUNKS), 'no more than the window').to.deep.equal([]);
    // A write whose predecessor was not written is not a run: nothing is asked for ahead of it.
    const lone = 3 * KEY_BATCH + 4; // held, its predecessor not written, the keys half a window ahead not held
    await core.write('disk', lone, randomBytes(CHUNK));
    expect(asked(), 'a lone write asks for nothing ahead').to.equal(3);
    expect(held(4 * KEY_BATCH, CHUNKS)).to.deep.equal([]);
  });

  it('keys asked for ahead of a run start at its first chunk without one: a chunk between is never left to ask for alone', async () => {
    const core = t.agent.core;
    const r = 8 * KEY_BATCH; // nothing written in the batch before
    const before = core.stats.keyRequests;
    const asked = () => core.stats.keyRequests - before;
    await core.write('disk', r, randomBytes(CHUNK));
    await core.write('disk', r + KEY_BATCH, randomBytes(CHUNK)); // not a run: its own batch
    expect(held(r, r + 4 * KEY_BATCH)).to.deep.equal(Array.from({ length: 2 * KEY_BATCH }, (_, i) => r + i));
    await core.write('disk', r + 1, randomBytes(CHUNK));
    expect(asked(), 'inside the first half of a one-batch window').to.equal(2);
    // Written out of order, as a copy with many writes in flight does: its predecessor and
    // the chunk a batch back are written, so its window is two batches, and half of that
    // ahead (r + 2 batches + 1) is not held. The next chunk without a key is r + 2 batches.
    await core.write('disk', r + KEY_BATCH + 1, randomBytes(CHUNK));
    await waitFor(async () => held(r + 2 * KEY_BATCH, r + 4 * KEY_BATCH).length >= 2 * KEY_BATCH - 1 || undefined, 20_000, 'the keys ahead');
    expect(asked()).to.equal(3);
    expect(held(r + 2 * KEY_BATCH, r + 4 * KEY_BATCH)).to.deep.equal(Array.from({ length: 2 * KEY_BATCH }, (_, i) => r + 2 * KEY_BATCH + i));
  });

  it('more writes at once than there are seal buffers: each waits its turn for one, and every chunk reads back as written', async () => {
    const core = t.agent.core;
    const first = 5 * KEY_BATCH;
    const n = SEAL_BUFFERS * 3;
    const data = Array.from({ length: n }, () => randomBytes(CHUNK));
    await Promise.all(data.map((d, i) => core.write('disk', first + i, d)));
    const out = Buffer.alloc(CHUNK);
    for (let i = 0; i < n; i++) {
      await core.readInto('disk', first + i, out);
      expectSameBytes(out, data[i], `chunk ${first + i}`);
    }
  });
});
