// The native sealWrite (native/seal-write.cc) against the TypeScript chunk format:
// a blob it seals off the event loop opens with decryptChunkInto, its SHA-256 is the
// blob's, it lies in the file where it was asked to, and nothing else of the file
// changed. The key is copied by the call; a failed write rejects as node:fs does.
import { expect } from 'chai';
import fs from 'node:fs';
import path from 'node:path';
import { chunkKey, chunkSealParts, decryptChunkInto, type ChunkCoord } from '../../common/chunk.js';
import { CHUNK_OVERHEAD, DISK_CHUNK_SIZE } from '../../common/constants.js';
import { randomBytes } from '../../common/crypto.js';
import { sealWrite } from '../../native/index.js';
import { expectSameBytes } from '../helpers/bytes.js';
import { tmpDir } from '../helpers/proc.js';

describe('native sealWrite', () => {
  const coord: ChunkCoord = { imageId: Buffer.alloc(16, 3), gen: 7, kind: 'disk', index: 42, cls: 'normal' };
  let dir: string;
  let fd: number;
  before(() => {
    dir = tmpDir('lethe-seal-');
    fd = fs.openSync(path.join(dir, 'slots'), 'w+');
  });
  after(() => {
    fs.closeSync(fd);
    fs.rmSync(dir, { recursive: true, force: true });
  });

  it('seals and writes a chunk that opens with the TypeScript format, at its offset only', async () => {
    const before = randomBytes(3 * DISK_CHUNK_SIZE);
    fs.writeSync(fd, before, 0, before.length, 0);
    const plain = randomBytes(DISK_CHUNK_SIZE - 1000);
    const key = Buffer.from(chunkKey(randomBytes(32), coord));
    const want = Buffer.from(key);
    const parts = chunkSealParts(Buffer.alloc(DISK_CHUNK_SIZE + CHUNK_OVERHEAD), coord, plain.length);
    const at = 40_000;
    const done = sealWrite(fd, at, key, parts.nonce, parts.ad, plain, parts.blob);
    key.fill(0); // copied by the call
    expect(await done, 'resolves with nothing').to.equal(undefined);
    const onDisk = Buffer.alloc(parts.blob.length);
    fs.readSync(fd, onDisk, 0, onDisk.length, at);
    expectSameBytes(onDisk, parts.blob, 'the blob in the file');
    const out = Buffer.alloc(plain.length);
    decryptChunkInto(out, want, coord, onDisk);
    expectSameBytes(out, plain, 'the plaintext');
    const all = Buffer.alloc(before.length);
    fs.readSync(fd, all, 0, all.length, 0);
    expectSameBytes(all.subarray(0, at), before.subarray(0, at), 'before the blob');
    expectSameBytes(all.subarray(at + onDisk.length), before.subarray(at + onDisk.length), 'after the blob');
    // Another coordinate's key or associated data does not open it.
    expect(() => decryptChunkInto(Buffer.alloc(plain.length), want, { ...coord, index: 43 }, onDisk)).to.throw(/tamper/i);
  });

  it('rejects a write that fails as node:fs would, and refuses bad arguments at the call', async () => {
    const plain = randomBytes(4096);
    const parts = chunkSealParts(Buffer.alloc(4096 + CHUNK_OVERHEAD), coord, plain.length);
    const ro = fs.openSync(path.join(dir, 'slots'), 'r');
    try {
      const err = await sealWrite(ro, 0, randomBytes(32), parts.nonce, parts.ad, plain, parts.blob).then(
        () => expect.fail('a write to a read-only fd should fail'),
        (e: NodeJS.ErrnoException) => e,
      );
      expect(err.code).to.equal('EBADF');
      expect(err.syscall).to.equal('pwrite');
    } finally {
      fs.closeSync(ro);
    }
    expect(() => sealWrite(fd, 0, randomBytes(31), parts.nonce, parts.ad, plain, parts.blob)).to.throw(TypeError);
    expect(() => sealWrite(fd, 0, randomBytes(32), parts.nonce, parts.ad, plain, parts.blob.subarray(1))).to.throw(TypeError);
    expect(() => sealWrite(fd, -1, randomBytes(32), parts.nonce, parts.ad, plain, parts.blob)).to.throw(RangeError);
  });
});
