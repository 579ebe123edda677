// The policy manager's decisions and the trace replay built on them.
import { expect } from 'chai';
import { LetheError } from '../../common/errors.js';
import { PolicyManager, prefetchPlan, startupPages, type ManagerPolicy } from '../../policies/manager.js';
import { parseAccessTrace, simulate, simulateWithBaselines, type Trace } from '../../policies/simulate.js';

const base: ManagerPolicy = {
  memoryMode: 'all',
  evictIdleMs: 1000,
  evictBudgetBytes: null,
  freePages: 'evict',
  onLeaseExpiry: 'evict-sensitive',
  prefetchStartupBytes: 0,
  prefetchOrder: 'trace',
};

/** Arrival times for `pages` pages: given pages at given times, the rest not resident. */
function arrivals(pages: number, at: Record<number, number>): Float64Array {
  const a = new Float64Array(pages);
  for (const [p, t] of Object.entries(at)) a[Number(p)] = t;
  return a;
}

describe('policy manager', () => {
  it('memory: all evicts the server-sensitive pages resident for the idle time, and no other', () => {
    const m = new PolicyManager(base, 8, (p) => (p < 4 ? 'sensitive' : 'normal'));
    const d = m.evictionSet(5000, arrivals(8, { 0: 3000, 1: 4500, 2: 4001, 5: 1000 }));
    expect(d.pages).to.deep.equal([0]);
    expect(d.why).to.deep.equal({ idle: 1, free: 0, budget: 0 });
  });

  it('memory: hinted evicts only what the last report named sensitive', () => {
    const m = new PolicyManager({ ...base, memoryMode: 'hinted', freePages: 'keep' }, 16);
    const resident = arrivals(16, { 1: 1, 2: 1, 3: 1, 9: 1, 10: 1 });
    expect(m.evictionSet(5000, resident).pages, 'before any report nothing is sensitive').to.deep.equal([]);
    m.hintReport({ sensitive: [[2, 2], [9, 1]], free: [] });
    expect(m.evictionSet(5000, resident).pages).to.deep.equal([2, 3, 9]);
    m.hintReport({ sensitive: [[10, 1]], free: [] });
    expect(m.isSensitive(2), 'a new report replaces the old').to.equal(false);
    expect(m.evictionSet(5000, resident).pages).to.deep.equal([10]);
  });

  it('evicts pages the guest reported free at once, unless the policy keeps them', () => {
    const resident = arrivals(8, { 4: 4999, 5: 4999 });
    const report = { sensitive: [], free: [[4, 1]] as [number, number][] };
    const evicting = new PolicyManager({ ...base, memoryMode: 'hinted' }, 8);
    evicting.hintReport(report);
    expect(evicting.evictionSet(5000, resident)).to.deep.equal({ pages: [4], why: { idle: 0, free: 1, budget: 0 } });
    const keeping = new PolicyManager({ ...base, freePages: 'keep' }, 8, () => 'normal');
    keeping.hintReport(report);
    expect(keeping.evictionSet(5000, resident).pages).to.deep.equal([]);
    const none = new PolicyManager({ ...base, memoryMode: 'none' }, 8);
    none.hintReport({ sensitive: [[0, 8]], free: [[0, 8]] });
    expect(none.evictionSet(1e9, resident).pages, 'memory: none evicts nothing').to.deep.equal([]);
  });

  it('takes a 4 GiB guest\'s frames above 4 GiB as the RAM file\'s pages above 2 GiB, and ignores the PCI hole', () => {
    const GiB = 1 << 30;
    const pages = (4 * GiB) / 4096;
    const m = new PolicyManager({ ...base, memoryMode: 'hinted', freePages: 'evict' }, pages);
    // Frames: 0x10 low; 0x7ffff to 0x80000 across the top of low RAM into the hole; 0x100000 (4 GiB) on,
    // the last frame of RAM, and one past it.
    m.hintReport({ sensitive: [[0x10, 1], [0x7ffff, 2], [0x100000, 2], [0x17ffff, 2]], free: [[0x90000, 1]] });
    const resident = new Float64Array(pages).fill(1);
    const d = m.evictionSet(5000, resident);
    expect(d.pages).to.deep.equal([0x10, 0x7ffff, 0x80000, 0x80001, 0xfffff]);
    expect(d.why).to.deep.equal({ idle: 5, free: 0, budget: 0 });
  });

  it('takes the frames of a guest under 2.75 GiB as its pages, and ignores those past its RAM', () => {
    const pages = 0xb0000000 / 4096 - 1;
    const m = new PolicyManager({ ...base, memoryMode: 'hinted' }, pages);
    m.hintReport({ sensitive: [[0x90000, 1], [pages - 1, 3]], free: [[0xa0000, 2]] });
    expect(m.evictionSet(5000, new Float64Array(pages).fill(1)).pages).to.deep.equal([0x90000, 0xa0000, 0xa0001, pages - 1]);
  });

  it('over the plaintext budget, evicts the oldest sensitive pages first', () => {
    const m = new PolicyManager({ ...base, evictIdleMs: 60_000, evictBudgetBytes: 2 * 4096 }, 8);
    const d = m.evictionSet(10_000, arrivals(8, { 0: 5000, 1: 1000, 2: 3000, 3: 9000 }));
    expect(d.pages).to.deep.equal([1, 2]);
    expect(d.why.budget).to.equal(2);
  });

  it('maps the lease-expiry setting to an action', () => {
    const action = (onLeaseExpiry: ManagerPolicy['onLeaseExpiry']) => new PolicyManager({ ...base, onLeaseExpiry }, 1).leaseEnding();
    expect(action('evict-sensitive')).to.deep.equal({ evict: 'sensitive', suspend: false });
    expect(action('evict-all')).to.deep.equal({ evict: 'all', suspend: false });
    expect(action('suspend')).to.deep.equal({ evict: 'all', suspend: true });
  });

  it('prefetches the learned order first, then the rest by address, skipping zero pages and repeats', () => {
    const present = (p: number) => p !== 3;
    const p = { prefetchStartupBytes: 3 * 4096, prefetchOrder: 'trace' } as const;
    expect(prefetchPlan(p, 8, [6, 3, 1, 6, 99], present)).to.deep.equal({ startup: [6, 1, 0], rest: [2, 4, 5, 7] });
    expect(prefetchPlan({ ...p, prefetchOrder: 'address' }, 8, [6, 1], present)).to.deep.equal({ startup: [0, 1, 2], rest: [4, 5, 6, 7] });
  });

  it("sizes an automatic startup buffer by vTube's rule: the rest of the order arrives before the guest first needs it", () => {
    // The guest touched 100 pages by 10 ms, 200 by 100 ms, 300 by 110 ms.
    const curve = [[100, 10], [200, 100], [300, 110]] as const;
    // At 1 page/ms: 100 − 0, 200 − 10, 300 − 100: 200 pages before the guest runs.
    expect(startupPages(curve, 1, 1000)).to.equal(200);
    // A link ten times faster needs only the first point's pages, taken before any time passes.
    expect(startupPages(curve, 10, 1000)).to.equal(100);
    // A slow link needs nearly all of it, never more than the order holds.
    expect(startupPages(curve, 0.01, 250)).to.equal(250);
    expect(startupPages([], 1, 1000), 'no curve, no buffer').to.equal(0);
    // Whatever the rate, every page the curve counts arrives by its time.
    for (const rate of [0.05, 0.5, 2, 7.3]) {
      const b = startupPages(curve, rate, 1000);
      let before = 0;
      for (const [k, t] of curve) {
        expect(b + before * rate, `rate ${rate}, count ${k}`).to.be.at.least(k);
        before = t;
      }
    }
  });

  it('order none fills the startup buffer by address and prefetches nothing in the background', () => {
    const present = (p: number) => p !== 1;
    const p = { prefetchStartupBytes: 3 * 4096, prefetchOrder: 'none' } as const;
    expect(prefetchPlan(p, 8, [6, 5], present)).to.deep.equal({ startup: [0, 2, 3], rest: [] });
    expect(prefetchPlan({ ...p, prefetchStartupBytes: 0 }, 8, [6], present)).to.deep.equal({ startup: [], rest: [] });
  });
});

describe('policy simulate', () => {
  const trace = (lines: object[]) => parseAccessTrace([{ trace: 'lethe-access', version: 1, pages: 4 }, ...lines].map((l) => JSON.stringify(l)).join('\n'));

  it('replays faults, evictions and re-faults exactly', () => {
    // Page 0 at 0 s, evicted at 2 s (idle 2 s, passes every 0.5 s), touched again at 5 s, evicted at 7 s.
    const t = trace([{ t: 0, fault: 0 }, { t: 5000, fault: 0 }, { t: 10_000, fault: 1 }]);
    const r = simulate('policy', { ...base, evictIdleMs: 2000 }, t);
    expect(r).to.deep.include({ faults: 3, serverFetches: 2, keyReleases: 3, evictions: 2, sensitivePlaintextSeconds: 4 });
    expect(r.bytesFetched).to.equal(2 * (4096 + 41));
  });

  it('places a policy between keeping everything and evicting everything', () => {
    const events: object[] = [];
    for (let t = 0; t < 60_000; t += 250) events.push({ t, fault: (t / 250) % 4 });
    const [policy, keep, evictAll] = simulateWithBaselines({ ...base, evictIdleMs: 10_000 }, trace(events));
    expect(keep.faults, 'kept: each page faults once').to.equal(4);
    expect(evictAll.faults).to.be.greaterThan(policy.faults);
    expect(policy.faults).to.be.greaterThan(keep.faults);
    expect(keep.sensitivePlaintextSeconds).to.be.greaterThan(policy.sensitivePlaintextSeconds);
    expect(policy.sensitivePlaintextSeconds).to.be.greaterThan(evictAll.sensitivePlaintextSeconds);
  });

  it('uses hints from the trace: unhinted pages stay, hinted ones go', () => {
    const t: Trace = trace([{ t: 0, hint: { sensitive: [[1, 1]], free: [] } }, { t: 0, fault: 0 }, { t: 0, fault: 1 }, { t: 20_000, fault: 2 }]);
    const r = simulate('policy', { ...base, memoryMode: 'hinted', evictIdleMs: 5000 }, t);
    expect(r.evictions).to.equal(1);
    expect(r.keyReleases, 'every fault of a hinted guest needs a key release').to.equal(3);
    expect(r.sensitivePlaintextSeconds).to.equal(5);
  });

  it('a long quiet trace of a big guest replays with only the passes that can evict (exact figures)', function () {
    this.timeout(2_000); // walking 256 Ki pages at every 100 ms tick of an hour took ~20 s
    const big = parseAccessTrace([{ trace: 'lethe-access', version: 1, pages: 1 << 18 }, { t: 0, fault: 1 }, { t: 3_600_000, fault: 2 }].map((l) => JSON.stringify(l)).join('\n'));
    expect(simulate('policy', { ...base, evictIdleMs: 0 }, big)).to.deep.include({ faults: 2, evictions: 2, sensitivePlaintextSeconds: 0.1 }); // page 1 for one 100 ms tick; page 2 comes at the end
  });

  it('refuses a malformed trace naming the line', () => {
    expect(() => parseAccessTrace('null', 't.jsonl')).to.throw(LetheError, 't.jsonl:1: not a Lethe access trace');
    expect(() => parseAccessTrace(`${JSON.stringify({ trace: 'lethe-access', version: 1, pages: 4 })}\nnull`, 't.jsonl')).to.throw(LetheError, 't.jsonl:2: an event is');
    expect(() => parseAccessTrace('hello', 't.jsonl')).to.throw(LetheError, 't.jsonl:1: not a Lethe access trace');
    const head = JSON.stringify({ trace: 'lethe-access', version: 1, pages: 4 });
    expect(() => parseAccessTrace(`${head}\n{"t": 1, "fault": 9}`, 't.jsonl')).to.throw(LetheError, "t.jsonl:2: page 9 is outside the guest's 4 pages");
    expect(() => parseAccessTrace(`${head}\n{"t": 5, "fault": 1}\n{"t": 2, "fault": 1}`, 't.jsonl')).to.throw(LetheError, 't.jsonl:3: bad time 2');
    expect(() => parseAccessTrace(`${head}\n{"t": 5, "hint": {"sensitive": [[1]]}}`, 't.jsonl')).to.throw(LetheError, 't.jsonl:2: hint runs');
  });
});
