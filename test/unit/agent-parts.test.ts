// The key ring, the ciphertext cache and the fetcher's retries on their own.
import { expect } from 'chai';
import { randomBytes } from 'node:crypto';
import path from 'node:path';
import { ChunkCache } from '../../agent/chunks/cache.js';
import type { DeviceClient } from '../../agent/remote/device-client.js';
import { Fetcher } from '../../agent/remote/fetcher.js';
import { LetheError } from '../../common/errors.js';
import { KeyRing } from '../../agent/keys/keyring.js';
import { firstTouchesAndLearned } from '../../agent/daemon/prefetch.js';
import { sha256 } from '../../common/crypto.js';
import { execFileSync, spawnSync } from 'node:child_process';
import { ROOT, tmpDir } from '../helpers/proc.js';
import { expectSameBytes } from '../helpers/bytes.js';

describe('key ring', () => {
  it('holds class and sensitive keys, drops one, and zeroes all', () => {
    const ring = new KeyRing(16);
    const k1 = randomBytes(32);
    const k2 = randomBytes(32);
    ring.setClassKey(1, k1);
    ring.setSensitiveKeys(['1/mem/5'], k2);
    expect(ring.counts()).to.deep.equal({ classKeys: 1, sensitiveKeys: 1 });
    expect(ring.withClassKey(1, (k) => Buffer.from(k!).equals(k1))).to.equal(true);
    expect(ring.withSensitiveKey('1/mem/5', (k) => Buffer.from(k!).equals(k2))).to.equal(true);
    expect(ring.isAllZero()).to.equal(false);
    expect(ring.dropSensitiveKey('1/mem/5')).to.equal(true);
    expect(ring.withSensitiveKey('1/mem/5', (k) => k)).to.equal(undefined);
    ring.zeroAll();
    expect(ring.counts()).to.deep.equal({ classKeys: 0, sensitiveKeys: 0 });
    expect(ring.isAllZero()).to.equal(true);
    ring.destroy();
  });

  it('grows by slabs, and refuses keys past its last slab', () => {
    const ring = new KeyRing(2, 128);
    const keys = Array.from({ length: 128 }, () => randomBytes(32));
    keys.forEach((k, i) => ring.setSensitiveKeys([`k${i}`], k));
    expect(() => ring.setSensitiveKeys(['one-too-many'], randomBytes(32))).to.throw('key ring is full');
    // A batch that does not fit keeps none of its keys and loses no slot.
    ring.dropSensitiveKey('k127');
    expect(() => ring.setSensitiveKeys(['a', 'b'], randomBytes(64))).to.throw('key ring is full');
    expect(ring.counts().sensitiveKeys).to.equal(127);
    ring.setSensitiveKeys(['k127'], keys[127]);
    expect(keys.every((k, i) => ring.withSensitiveKey(`k${i}`, (x) => Buffer.from(x!).equals(k)))).to.equal(true);
    ring.zeroAll();
    expect(ring.isAllZero()).to.equal(true);
    ring.destroy();
  });

  it('stores a batch of keys at once, replacing ones it holds', () => {
    const ring = new KeyRing(4);
    const batch = randomBytes(32 * 6);
    ring.setSensitiveKeys(['k1'], randomBytes(32));
    ring.setSensitiveKeys(['k0', 'k1', 'k2', 'k3', 'k4', 'k5'], batch);
    expect(ring.counts().sensitiveKeys).to.equal(6);
    for (let i = 0; i < 6; i++) expect(ring.withSensitiveKey(`k${i}`, (k) => Buffer.from(k!).equals(batch.subarray(i * 32, (i + 1) * 32)))).to.equal(true);
    ring.destroy();
  });

  // In a child: touching a closed slab kills the process (SIGSEGV), which is the point.
  const touch = (body: string) =>
    spawnSync(process.execPath, ['--import', 'tsx', '--input-type=module', '-e', `
      import { KeyRing } from ${JSON.stringify(path.join(ROOT, 'agent/keys/keyring.ts'))};
      const ring = new KeyRing(2);
      for (let i = 0; i < 4; i++) ring.setSensitiveKeys(['k' + i], Buffer.alloc(32, i + 1));
      const slotOf = (id) => ring.slot(ring.sensitiveSlots.get(id));
      ${body}
      console.log('read');`], { cwd: ROOT, encoding: 'utf8' });

  it('keeps every slab unreadable but the one holding the key in use', () => {
    const inSlab = touch(`ring.withSensitiveKey('k2', () => slotOf('k3')[0]);`); // k2 and k3 share a slab
    expect(inSlab.stdout, inSlab.stderr).to.include('read');
    const otherSlab = touch(`ring.withSensitiveKey('k2', () => slotOf('k0')[0]);`);
    expect(otherSlab.signal).to.equal('SIGSEGV');
    const closed = touch(`slotOf('k2')[0];`);
    expect(closed.signal).to.equal('SIGSEGV');
  });
});

describe('chunk cache', () => {
  const key = (index: number) => ({ imageId: 'ab', gen: 1, kind: 'mem' as const, index });

  it('evicts clean chunks least recently used first, never dirty ones', () => {
    const c = new ChunkCache(path.join(tmpDir(), 'c.db'), 4 * 4200);
    for (let i = 0; i < 4; i++) c.put(key(i), randomBytes(4137));
    c.get(key(0)); // 0 is now the most recently used
    c.put(key(9), randomBytes(4137), true, 'sensitive'); // dirty, over the limit
    expect(c.get(key(1)), 'oldest clean one went').to.equal(undefined);
    expect(c.get(key(0))).to.not.equal(undefined);
    for (let i = 10; i < 20; i++) c.put(key(i), randomBytes(4137), true, 'normal');
    expect(c.stats().dirty).to.equal(11);
    expect(c.dirtyChunks('ab').map((d) => d.index)).to.include.members([9, 10, 19]);
    c.close();
  });

  it('drops a damaged row instead of serving it, and survives a reopen', () => {
    const file = path.join(tmpDir(), 'c.db');
    const c = new ChunkCache(file, 1 << 20);
    const blob = randomBytes(4137);
    c.put(key(1), blob);
    c.put(key(2), randomBytes(4137));
    c.close();
    const again = new ChunkCache(file, 1 << 20);
    expectSameBytes(again.get(key(1))!, blob);
    // Damage row 2 behind the cache's back.
    (again as unknown as { db: { prepare(s: string): { run(...a: unknown[]): void } } }).db
      .prepare('UPDATE chunks SET data = ? WHERE idx = 2')
      .run(randomBytes(4137));
    expect(again.get(key(2))).to.equal(undefined);
    expect(again.stats()).to.include({ damaged: 1, chunks: 1 });
    again.close();
  });

  it('stores a batch in one transaction with the hashes it is given, and trims after it', () => {
    const c = new ChunkCache(path.join(tmpDir(), 'c.db'), 3 * 4200);
    const blobs = [0, 1, 2, 3].map(() => randomBytes(4137));
    c.putMany(blobs.map((blob, i) => ({ k: key(i), blob, hash: sha256(blob) })));
    // Four stored, then the oldest trimmed to fit three.
    expect(c.stats()).to.include({ chunks: 3, evicted: 1 });
    expect(c.get(key(0))).to.equal(undefined);
    expect(Buffer.compare(c.get(key(3))!, blobs[3])).to.equal(0);
    // A given hash is what a read checks against: a wrong one makes the row damaged, never served.
    c.putMany([{ k: key(7), blob: blobs[0], hash: sha256(blobs[1]) }]);
    expect(c.get(key(7))).to.equal(undefined);
    c.close();
  });
});

describe('install-ahead and the uploaded order', () => {
  it('the pages the guest faulted on lead, then the learned order without repeats', () => {
    const out = firstTouchesAndLearned(Uint32Array.from([5, 9, 2]), Uint32Array.from([9, 1, 5, 7, 1]));
    expect([...out]).to.deep.equal([5, 9, 2, 1, 7]);
  });

  it('without a learned order, the faults are the order', () => {
    const touched = Uint32Array.from([3, 4]);
    expect([...firstTouchesAndLearned(touched, new Uint32Array(0))]).to.deep.equal([3, 4]);
  });
});

describe('process hardening', () => {
  it('makes a process non-dumpable (in a child, so the test runner keeps its own setting)', () => {
    const script = `import { isDumpable, makeNonDumpable } from ${JSON.stringify(path.join(ROOT, 'agent/daemon/harden.ts'))};
      const before = isDumpable(); makeNonDumpable(); console.log(JSON.stringify([before, isDumpable()]));`;
    const out = execFileSync(process.execPath, ['--import', 'tsx', '--input-type=module', '-e', script], { cwd: ROOT }).toString();
    expect(JSON.parse(out)).to.deep.equal([true, false]);
  });
});

describe('fetcher retries', () => {
  /** A device client whose server is down: every request fails as unreachable. */
  const down = { chunks: () => Promise.reject(new LetheError('SERVER_UNREACHABLE', 'connect ECONNREFUSED')) } as unknown as DeviceClient;
  const settledWithin = async (p: Promise<unknown>, ms: number) => {
    let done = false;
    p.then(
      () => (done = true),
      () => (done = true),
    );
    await new Promise((r) => setTimeout(r, ms));
    return done;
  };

  it("a demand fetch retries while the server is down, but gives up at the lease's eviction point", async () => {
    // A retry window of its own, short enough that the test waits for its end: a
    // retry loop left running kept the test process alive for 30 s after the suite.
    const unbounded = new Fetcher(down, down, () => 'lease-1', undefined, 3_000);
    const waiting = unbounded.demand({ kind: 'disk', index: 0 }).then(
      () => expect.fail('the fetch should have failed'),
      (e: unknown) => e,
    );
    expect(await settledWithin(waiting, 600), 'without a lease deadline it keeps retrying').to.equal(false);

    const bounded = new Fetcher(down, down, () => 'lease-1', () => Date.now() + 300);
    const failed = bounded.demand({ kind: 'disk', index: 0 }).then(
      () => expect.fail('the fetch should have failed'),
      (e: unknown) => e,
    );
    expect(await settledWithin(failed, 1_500), 'it gives up by the eviction point').to.equal(true);
    expect(((await failed) as LetheError).code).to.equal('SERVER_UNREACHABLE');
    expect(bounded.stats.retries).to.be.greaterThan(0);
    expect(((await waiting) as LetheError).code, 'and gives up at the end of its retry window').to.equal('SERVER_UNREACHABLE');
  });
});
