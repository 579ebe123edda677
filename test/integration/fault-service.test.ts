// The fault service (agent/memory/fault-service.ts) on its own: an agent core on a
// real server serves the page faults of fault-client, a C program that maps a RAM
// file with the shim preloaded as QEMU does and touches its pages on command.
import { execFileSync } from 'node:child_process';
import { randomBytes } from 'node:crypto';
import fs from 'node:fs';
import path from 'node:path';
import { expect } from 'chai';
import { BufferPool } from '../../agent/chunks/buffer-pool.js';
import { FaultService, SAMPLE_EVERY } from '../../agent/memory/fault-service.js';
import { Evictor, type EvictTarget } from '../../agent/memory/evictor.js';
import type { AgentCore } from '../../agent/chunks/core.js';
import type { ManagerPolicy } from '../../policies/manager.js';
import { BUILD_DIR, PAGE_SIZE, UffdListener, shimEnv } from '../../native/index.js';
import { fnv32 } from '../../native/test/fault-server.js';
import { DEFAULT_FULL_POLICY } from '../../policies/schema.js';
import { agentInProcessSuite } from '../helpers/fixtures.js';
import { Lines } from '../helpers/lines.js';
import { ROOT, tmpDir } from '../helpers/proc.js';

const CLIENT = path.join(BUILD_DIR, 'fault-client');
const PAGES = 32;

/**
 * A fault service over a fresh RAM file of PAGES pages, served to a started
 * fault-client; everything it made is undone by `cleanup`. `hold` is the evictor's
 * hold of the (absent) VM; `onFault` hears each fault, as the access trace does.
 */
async function faultRig(
  core: AgentCore,
  cleanup: (() => unknown)[],
  o: { policy?: ManagerPolicy; hold?: EvictTarget['hold']; onFault?: (page: number) => void } = {},
) {
  const dir = tmpDir('lethe-faults-');
  const ram = path.join('/dev/shm', `lethe-faults-${randomBytes(4).toString('hex')}.ram`);
  fs.writeFileSync(ram, '', { mode: 0o600 });
  fs.truncateSync(ram, PAGES * PAGE_SIZE);
  const ramFd = fs.openSync(ram, 'r+');
  cleanup.push(() => fs.rmSync(ram, { force: true }), () => fs.closeSync(ramFd), () => fs.rmSync(dir, { recursive: true, force: true }));
  const pool = new BufferPool(4, PAGE_SIZE);
  const log: string[] = [];
  let service!: FaultService;
  const hold = o.hold ?? (() => Promise.reject(new Error('no VM here')));
  // Not started: it records what arrives, as a running one does on each fault.
  const evictor = new Evictor(core, { ramFd, pages: PAGES, hold, faultInFlight: (p) => service.faultInFlight(p) }, o.policy ?? DEFAULT_FULL_POLICY, (l) => log.push(l));
  service = new FaultService(core, pool, evictor, PAGES, (l) => log.push(l), o.onFault);
  let mapped!: () => void;
  const ready = new Promise<void>((r) => (mapped = r));
  const listener = await UffdListener.listen(path.join(dir, 'uffd.sock'), (m) => (service.start(m), mapped()), (e) => log.push(e.message));
  const client = new Lines(CLIENT, [ram, String(PAGES)], shimEnv(ram, path.join(dir, 'uffd.sock')));
  cleanup.push(() => pool.destroy(), () => evictor.destroy(), () => listener.close(), () => service.stop(), () => client.kill());
  await client.next(/^mapped 0x[0-9a-f]+$/);
  await ready;
  return { service, evictor, client, log };
}

describe('the fault service against a fault client (agent core, real server)', function () {
  this.timeout(60_000);
  // Guest RAM of 32 pages: even pages stored, odd ones zero; none sensitive, so pages may be installed ahead.
  const t = agentInProcessSuite('faults', { chunks: PAGES / 2, policy: 'sensitive:\n  memory: none\n' });
  const cleanup: (() => unknown)[] = [];

  before(function () {
    this.timeout(120_000);
    execFileSync('make', ['-s', '-C', path.join(ROOT, 'native')], { stdio: ['ignore', 'ignore', 'inherit'] });
  });
  afterEach(async () => {
    for (const f of cleanup.splice(0).reverse()) await f();
  });

  it("serves each page the client touches with the image's content and zero pages as zeros; pages installed ahead never fault", async () => {
    const touched: number[] = [];
    const { service, evictor, client, log } = await faultRig(t.agent.core, cleanup, {
      policy: { ...DEFAULT_FULL_POLICY, memoryMode: 'none' },
      onFault: (p) => touched.push(p),
    });

    // Page 0 is a sample page (SAMPLE_EVERY), left to fault; page 40 is past the end of guest RAM.
    expect(SAMPLE_EVERY).to.equal(8);
    expect(await service.installAhead([0, 2, 10, 40])).to.equal(2);
    expect(service.faults, 'installing ahead is no fault').to.equal(0);

    client.send(`touch 0 ${PAGES}`);
    const plain = t.img.plain.mem;
    for (let i = 0; i < PAGES; i++) {
      const got = (await client.next(new RegExp(`^page ${i} ([0-9a-f]{8})$`)))[1];
      expect(got, `page ${i}`).to.equal(fnv32(plain.subarray(i * PAGE_SIZE, (i + 1) * PAGE_SIZE)).toString(16).padStart(8, '0'));
    }
    const faulted = Array.from({ length: PAGES }, (_, i) => i).filter((i) => i !== 2 && i !== 10);
    expect(service.faults).to.equal(faulted.length);
    expect(service.zeroFaults).to.equal(PAGES / 2);
    expect(service.installedAhead).to.equal(2);
    // An installed page never faults: it joins the order with its group's sample page (0 for 2, 8 for 10).
    const order = [0, 2, 1, 3, 4, 5, 6, 7, 8, 10, 9, ...Array.from({ length: PAGES - 11 }, (_, i) => 11 + i)];
    expect([...service.firstTouchOrder()], 'first touches, in order').to.deep.equal(order);
    const times = service.firstTouchTimes();
    expect(times[1], 'page 2 at its sample\'s time').to.equal(times[0]);
    expect([...times].every((ms, i) => i === 0 || ms >= times[i - 1]), 'times never go back').to.equal(true);
    expect(touched, 'faults only').to.deep.equal(faulted);
    expect(service.vcpuBlocked()).to.equal(false);
    expect(evictor.isResident(0) && evictor.isResident(5), 'the evictor knows of every page that went in').to.equal(true);
    expect(log.filter((l) => /not served/.test(l))).to.deep.equal([]);

    client.end();
    expect(await client.exited).to.deep.equal({ code: 0, signal: null });
  });
});

describe('re-faults of evicted sensitive pages (agent core, real server)', function () {
  this.timeout(60_000);
  // Guest RAM of 32 pages, every one stored and sensitive.
  const t = agentInProcessSuite('refaults', { plain: { mem: randomBytes(PAGES * PAGE_SIZE) }, policy: 'sensitive:\n  memory: all\n' });
  const cleanup: (() => unknown)[] = [];

  afterEach(async () => {
    for (const f of cleanup.splice(0).reverse()) await f();
  });

  it('brings the keys of the pages evicted after a re-faulted one in the same round trip, in the order they went', async () => {
    const core = t.agent.core;
    // The client touches pages only on command: between commands it holds still, as a held VM does.
    const { service, evictor, client, log } = await faultRig(core, cleanup, { hold: async () => async () => {} });

    // An order far from the pages' addresses: the k-th touch is page 31 + 7k (mod 32).
    const order = Array.from({ length: PAGES }, (_, k) => (31 + 7 * k) % PAGES);
    const plain = t.img.plain.mem;
    const touchAll = async () => {
      for (const p of order) {
        // Each page arrives in a later millisecond than the one before: the eviction order follows arrival.
        const at = Date.now();
        while (Date.now() === at) await new Promise((r) => setTimeout(r, 1));
        client.send(`touch ${p} ${p + 1}`);
        const got = (await client.next(new RegExp(`^page ${p} ([0-9a-f]{8})$`)))[1];
        expect(got, `page ${p}`).to.equal(fnv32(plain.subarray(p * PAGE_SIZE, (p + 1) * PAGE_SIZE)).toString(16).padStart(8, '0'));
        await client.next(/^checksum /);
      }
    };
    await touchAll();
    expect(service.faults).to.equal(PAGES);
    const out = await evictor.evictResident('the test');
    expect(out).to.deep.equal({ evicted: PAGES, dirty: 0, kept: 0 });
    expect(evictor.evictedAfter(order[0], 63), 'the others, in the order they arrived').to.deep.equal(order.slice(1));
    expect(evictor.evictedAfter(order[30], 63)).to.deep.equal([order[31]]);

    const before = core.stats.keyRequests;
    await touchAll();
    // The first re-fault asks for every read key and every write key at once (two requests);
    // by address alone (neighbours after page 31: none) it would take one for page 31, then 6..30, and so on.
    expect(core.stats.keyRequests - before, 'key requests for 32 re-faults').to.equal(2);
    expect(service.sensitiveRefaults.summary().count).to.equal(PAGES);
    expect(evictor.evictedAfter(order[0], 63), 'resident again: none is a companion').to.deep.equal([]);
    expect(log.filter((l) => /not served/.test(l))).to.deep.equal([]);

    client.end();
    expect(await client.exited).to.deep.equal({ code: 0, signal: null });
  });
  it("a vCPU's fault waits for an eviction batch to end; another thread's (QEMU's main loop) goes in at once", async () => {
    // The hold is granted only when the test says: until then the eviction batch waits with its gate closed.
    let holding!: () => void;
    const held = new Promise<void>((r) => (holding = r));
    let grant!: () => void;
    const granted = new Promise<void>((r) => (grant = r));
    const hold = async () => {
      holding();
      await granted;
      return async () => {};
    };
    const { service, evictor, client, log } = await faultRig(t.agent.core, cleanup, { hold });
    const clientThread = client.proc.pid!; // fault-client is one thread: its id is its pid
    const fnvOf = (p: number) => fnv32(t.img.plain.mem.subarray(p * PAGE_SIZE, (p + 1) * PAGE_SIZE)).toString(16).padStart(8, '0');
    const touch = async (p: number) => {
      client.send(`touch ${p} ${p + 1}`);
      expect((await client.next(new RegExp(`^page ${p} ([0-9a-f]{8})$`)))[1], `page ${p}`).to.equal(fnvOf(p));
      await client.next(/^checksum /);
    };

    await touch(0);
    const evicting = evictor.evictResident('the test');
    await held;
    // The batch is under way (its gate closed). The client is not a vCPU: its fault is served at once.
    service.setVcpuThreads([clientThread + 1]);
    await touch(1);
    expect(service.vcpuBlocked(), "another thread's fault holds no stop back").to.equal(false);

    // As a vCPU, its fault waits for the batch.
    service.setVcpuThreads([clientThread]);
    client.send('touch 2 3');
    while (!service.vcpuBlocked()) await new Promise((r) => setTimeout(r, 5));
    expect(service.faultInFlight(2), 'the vCPU fault waits').to.equal(true);
    grant();
    expect(await evicting).to.deep.equal({ evicted: 1, dirty: 0, kept: 0 });
    expect((await client.next(/^page 2 ([0-9a-f]{8})$/))[1]).to.equal(fnvOf(2));
    await client.next(/^checksum /);
    expect(service.vcpuBlocked()).to.equal(false);
    expect(evictor.isResident(1) && evictor.isResident(2) && !evictor.isResident(0), 'page 0 went; 1 and 2 came in').to.equal(true);
    expect(log.filter((l) => /not served/.test(l))).to.deep.equal([]);

    client.end();
    expect(await client.exited).to.deep.equal({ code: 0, signal: null });
  });
});
