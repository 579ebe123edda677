// Disk reads of part of a chunk (AgentCore.readRange), against a real server:
// the chunk's tag is checked once and its ciphertext kept in memory, a damaged
// cache row is fetched again and never served, a device write replaces the kept
// ciphertext, and the bytes asked for are the image's whatever the range.
import { expect } from 'chai';
import { randomBytes } from 'node:crypto';
import path from 'node:path';
import { AgentDiskBackend } from '../../agent/disk/backend.js';
import { agentInProcessSuite } from '../helpers/fixtures.js';
import { lethe, waitFor } from '../helpers/proc.js';
import { expectSameBytes } from '../helpers/bytes.js';
import { damageCachedBlob } from '../helpers/cache.js';
import { CHUNK_CT_AT } from '../../common/chunk.js';

const CHUNK = 128 * 1024;
const CHUNKS = 6;

describe('disk range reads (real server)', function () {
  this.timeout(30_000);
  // Chunk 1 is sensitive: its key comes by an audited release, the range read is the same.
  const t = agentInProcessSuite('ranges', {
    plain: { disk: randomBytes(CHUNKS * CHUNK - 1000), mem: Buffer.alloc(0), state: Buffer.alloc(0) },
    policy: `sensitive:\n  memory: false\n  disk: [[${CHUNK}, ${2 * CHUNK}]]\n`,
  });

  async function range(index: number, from: number, length: number): Promise<string> {
    const out = Buffer.alloc(length, 0xee);
    const src = await t.agent.core.readRange('disk', index, from, out);
    const at = index * CHUNK + from;
    expectSameBytes(out, t.img.plain.disk.subarray(at, at + length), `chunk ${index} bytes ${from}+${length}`);
    return src;
  }

  it('returns the image bytes for ranges at any offset, and checks each chunk once', async () => {
    expect(await range(0, 0, 4096)).to.equal('server');
    const kept = t.agent.core.checked.count;
    expect(kept).to.equal(1);
    for (const [from, len] of [[1, 1], [63, 2], [4095, 4097], [CHUNK - 7, 7], [0, CHUNK], [5000, 60000]]) {
      expect(await range(0, from, len)).to.equal('cache');
    }
    expect(t.agent.core.checked.count).to.equal(kept);
    await range(1, 100, 9000);
    await range(CHUNKS - 1, 0, CHUNK - 1000); // the short last chunk
    // A chunk read from the server is checked and kept in memory; one the prefetch already
    // put in the cache file is checked on a pool thread and taken into the native table.
    const admitted = t.agent.core.diskReads.admits;
    expect(t.agent.core.checked.count + admitted, 'chunks checked').to.equal(3);
    const shown = t.agent.status().diskMemory;
    expect(shown.chunks).to.equal(t.agent.core.checked.count);
    expect(shown.bytes).to.be.within(2 * CHUNK, 3 * CHUNK + 200);
    // Read again, no chunk is checked again: each is served from memory or from the table.
    const served = t.agent.core.diskReads.reads;
    for (const i of [0, 1, CHUNKS - 1]) await range(i, 10, 100);
    expect(t.agent.core.checked.count + t.agent.core.diskReads.admits, 'chunks checked, after').to.equal(3);
    if (admitted > 0) expect(t.agent.core.diskReads.reads, 'reads the table served').to.be.above(served);
    let err: unknown;
    await t.agent.core.readRange('disk', CHUNKS - 1, CHUNK - 1000, Buffer.alloc(1)).catch((e) => (err = e));
    expect(err).to.be.instanceOf(RangeError);
    // Refused before any key is asked for: no audited release for the sensitive chunk 1.
    t.agent.core.evict('disk', 1);
    const asked = t.agent.core.stats.keyRequests;
    err = undefined;
    await t.agent.core.readRange('disk', 1, CHUNK - 10, Buffer.alloc(11)).catch((e) => (err = e));
    expect(err).to.be.instanceOf(RangeError);
    expect(t.agent.core.stats.keyRequests, 'key requests').to.equal(asked);
  });

  it('the disk backend zeroes every reply buffer it hands back, pooled or the large one', async () => {
    const disk = new AgentDiskBackend(t.agent.core);
    try {
      // 4 KiB and 256 KiB come from the locked pool, 300 KiB takes the large buffer; chunk 1 is sensitive.
      for (const [at, len] of [[CHUNK + 5, 4096], [0, 256 * 1024], [3000, 300 * 1024]]) {
        const reply = await disk.read(at, len);
        expectSameBytes(reply, t.img.plain.disk.subarray(at, at + len), `bytes ${at}+${len}`);
        disk.release(reply);
        expect(reply.every((b) => b === 0), `reply of ${len} bytes zeroed`).to.equal(true);
      }
    } finally {
      disk.close();
    }
  });

  it('requests longer than a pooled buffer take the one large buffer in turn: no locked buffer is made per request', async () => {
    const disk = new AgentDiskBackend(t.agent.core);
    const len = 512 * 1024;
    const held: Buffer[] = [];
    try {
      held.push(await disk.read(0, len));
      let next: Buffer | undefined;
      const waiting = disk.read(CHUNK, len).then((b) => (next = b));
      await new Promise((r) => setTimeout(r, 300));
      expect(next, 'a second long read waits for the large buffer').to.equal(undefined);
      disk.release(held.pop()!);
      await waiting;
      expectSameBytes(next!, t.img.plain.disk.subarray(CHUNK, CHUNK + len));
      held.push(next!);
    } finally {
      for (const b of held) disk.release(b);
      disk.close();
    }
  });

  it('a cache row damaged before its first read is fetched again, never served', async () => {
    // Chunk 2 is in the cache file only once read whole; damage it there, with a matching checksum.
    await t.agent.core.readInto('disk', 2, Buffer.alloc(CHUNK));
    t.agent.core.checked.clear();
    damageCachedBlob(path.join(t.home, 'cache.db'), 'disk', 2, 5000);
    const before = t.agent.core.stats.fromServer;
    const refused = t.agent.core.diskReads.refused;
    expect(await range(2, 4096, 4096)).to.equal('server');
    expect(t.agent.core.stats.fromServer).to.equal(before + 1);
    // The native check of a first read refused it before JavaScript's did.
    expect(t.agent.core.diskReads.refused, 'admissions refused').to.equal(refused + 1);
  });

  it('a device write replaces the kept ciphertext: later ranges read the new bytes', async () => {
    await range(3, 0, 512);
    const next = randomBytes(CHUNK);
    await t.agent.core.write('disk', 3, next);
    for (const [from, len] of [[0, 512], [777, 3000], [CHUNK - 64, 64]]) {
      const out = Buffer.alloc(len);
      await t.agent.core.readRange('disk', 3, from, out);
      expectSameBytes(out, next.subarray(from, from + len), `bytes ${from}+${len}`);
    }
  });

  it('a blob read from the cache file into a reused buffer is kept as its own copy: the next read does not change it', async () => {
    // Chunks 0 and 5 are in the cache file (read in the first test); both reads below go through the same spare buffer.
    // (Reads over 32 KiB: a shorter one would take only its pieces, keeping no blob.)
    t.agent.core.checked.clear();
    expect(await range(0, 0, 40_000)).to.equal('cache');
    expect(await range(5, 0, 40_000)).to.equal('cache');
    // Chunk 0 now comes from the kept blob: its bytes must still be chunk 0's.
    const kept = t.agent.core.checked.count;
    await range(0, 8192, 4096);
    expect(t.agent.core.checked.count, 'served from memory').to.equal(kept);
  });

  it('a short read of a chunk only in the cache file takes just the pieces it covers, each checked; a damaged piece is never served', async () => {
    // Chunk 4's tag checked once (its pieces' tags taken), then its blob only in the cache file.
    t.agent.core.checked.clear();
    await range(4, 0, 40_000);
    t.agent.core.checked.clear();
    const pieces = () => t.agent.status().diskPieces;
    const before = pieces().reads;
    const mismatched = pieces().mismatches;
    for (const [from, len] of [[0, 4096], [1, 1], [4095, 2], [70_000, 9000], [CHUNK - 5000, 5000], [8192, 32 * 1024]]) {
      expect(await range(4, from, len), `bytes ${from}+${len}`).to.equal('cache');
    }
    expect(pieces().reads - before).to.equal(6);
    expect(t.agent.core.checked.count, 'no blob read whole').to.equal(0);
    // Chunk 4 is of the normal class: its pieces are read in native code, a read of any length.
    expect(pieces().native.reads).to.be.at.least(6);
    expect(await range(4, 0, CHUNK)).to.equal('cache');
    expect(pieces().reads - before).to.equal(7);
    expect(t.agent.core.checked.count, 'no blob read whole').to.equal(0);

    // A damaged piece (the row's SHA-256 made to match: only the piece tags and the blob's tag can tell).
    t.agent.core.checked.clear();
    damageCachedBlob(path.join(t.home, 'cache.db'), 'disk', 4, CHUNK_CT_AT + 3 * 4096 + 10);
    // Another piece of the same blob is still whole and served from it ...
    expect(await range(4, 0, 4096)).to.equal('cache');
    expect(pieces().mismatches).to.equal(mismatched);
    // ... the damaged one is not: the whole blob is read, fails its tag, and comes again from the server.
    const fromServer = t.agent.core.stats.fromServer;
    expect(await range(4, 3 * 4096, 100)).to.equal('server');
    expect(pieces().mismatches).to.equal(mismatched + 1);
    expect(t.agent.core.stats.fromServer).to.equal(fromServer + 1);
  });

  it("a chunk's first read from the cache file is checked on a pool thread and taken into the native table; a sensitive one is not", async () => {
    await t.agent.core.readInto('disk', 0, Buffer.alloc(CHUNK)); // in the cache file
    t.agent.core.checked.clear();
    t.agent.core.readTable.forget(0);
    const native = () => t.agent.core.diskReads;
    const { admits, reads } = native();
    expect(await range(0, 100, 4096)).to.equal('cache');
    expect(native().admits, 'admitted').to.equal(admits + 1);
    expect(t.agent.core.checked.count, 'no blob read in JavaScript').to.equal(0);
    expect(await range(0, 5000, 60_000)).to.equal('cache');
    expect(native()).to.include({ admits: admits + 1, reads: reads + 1 });
    // Chunk 1 is sensitive: its key is the key ring's alone, never the table's.
    await range(1, 0, 4096);
    t.agent.core.checked.clear();
    expect(await range(1, 10, 4096)).to.equal('cache');
    expect(native().admits, 'a sensitive chunk is not admitted').to.equal(admits + 1);
  });

  it('a piece read of a sensitive chunk whose key was dropped asks the server for it again (audited), as a whole read does', async () => {
    // Chunk 1 is sensitive: its pieces' digests taken, then its key dropped with its plaintext.
    t.agent.core.checked.clear();
    await range(1, 0, 40_000);
    t.agent.core.checked.clear();
    t.agent.core.evict('disk', 1);
    const asked = t.agent.core.stats.keyRequests;
    const pieceReads = t.agent.status().diskPieces.reads;
    await range(1, 4096, 4096);
    expect(t.agent.core.stats.keyRequests, 'key requests').to.equal(asked + 1);
    expect(t.agent.status().diskPieces.reads, 'no piece read without the key').to.equal(pieceReads);
    // With the key held again, a short read of the blob, out of memory once more, takes pieces.
    t.agent.core.checked.clear();
    await range(1, 8192, 100);
    expect(t.agent.status().diskPieces.reads).to.equal(pieceReads + 1);
    expect(t.agent.core.stats.keyRequests).to.equal(asked + 1);
  });
  it('a chunk read in native code is forgotten when the device writes it: the next read, now or later, has the new bytes', async () => {
    const disk = new AgentDiskBackend(t.agent.core);
    try {
      // Chunk 2's tag checked (its blob kept in memory), then its blob leaves memory for the native table.
      t.agent.core.checked.clear();
      await range(2, 0, 40_000);
      t.agent.core.checked.clear();
      const native = () => t.agent.status().diskPieces.native;
      const served = native().reads;
      const now = disk.readNow(2 * CHUNK + 100, 4096);
      expect(now, 'served now, from the native table').to.not.equal(undefined);
      expectSameBytes(now!, t.img.plain.disk.subarray(2 * CHUNK + 100, 2 * CHUNK + 4196));
      disk.release(now!);
      expect(native().reads).to.equal(served + 1);
      const next = randomBytes(CHUNK);
      await t.agent.core.write('disk', 2, next);
      const again = disk.readNow(2 * CHUNK + 100, 4096) ?? (await disk.read(2 * CHUNK + 100, 4096));
      expectSameBytes(again, next.subarray(100, 4196), 'after the write');
      disk.release(again);
    } finally {
      disk.close();
    }
  });

  it("the lease's end zeroes the native table's class keys with the key ring's: nothing more is served from it", async () => {
    const disk = new AgentDiskBackend(t.agent.core);
    try {
      t.agent.core.checked.clear();
      await range(0, 0, 40_000);
      t.agent.core.checked.clear();
      expect(t.agent.status().diskPieces.native.keys).to.equal(1);
      const before = disk.readNow(0, 4096);
      expect(before, 'served now while the lease lasts').to.not.equal(undefined);
      disk.release(before!);
      const u = await lethe(['admin', 'unassign', t.agent.identity.info.deviceId, 'ranges'], t.s.env);
      expect(u.code, u.stderr).to.equal(0);
      // The next call the server refuses (a sensitive key asked for again) ends the lease.
      t.agent.core.evict('disk', 1);
      await t.agent.core.readRange('disk', 1, 0, Buffer.alloc(10)).catch(() => {});
      await waitFor(async () => t.agent.lease.state !== 'active' || undefined, 10_000, 'the lease to end');
      expect(t.agent.status().keys).to.deep.equal({ classKeys: 0, sensitiveKeys: 0 });
      expect(t.agent.status().diskPieces.native.keys, 'native class keys').to.equal(0);
      expect(disk.readNow(0, 4096), 'nothing served now').to.equal(undefined);
    } finally {
      disk.close();
    }
  });
});
