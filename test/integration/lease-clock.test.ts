// A laptop that slept past its lease: timers run on the monotonic clock, which
// stops during a sleep, so the agent also checks the wall clock. Here the wall
// clock jumps past the expiry (as after waking) while no timer is due, and the
// work due before expiry (evicting sensitive pages) still runs first.
import { expect } from 'chai';
import { randomBytes } from 'node:crypto';
import type { Fetcher } from '../../agent/remote/fetcher.js';
import { agentInProcessSuite } from '../helpers/fixtures.js';
import { waitFor } from '../helpers/proc.js';

describe('lease expiry by the wall clock (real server)', function () {
  this.timeout(30_000);
  const t = agentInProcessSuite('img');
  const realNow = Date.now;
  after(() => {
    Date.now = realNow;
  });

  it('keys are zeroed within a second or two of the wall clock passing the expiry; a new lease follows once the clock is right', async () => {
    expect(t.agent.status().keys.classKeys).to.equal(1);
    // The laptop slept through beforeExpiry's margin too: it still runs, keys held, before they go.
    const lease = t.agent.lease;
    const original = lease.beforeExpiry;
    const ran: { classKeys: number; state: string }[] = [];
    lease.beforeExpiry = async () => {
      ran.push({ classKeys: t.agent.status().keys.classKeys, state: lease.state });
      await original?.();
    };
    const ttlMs = lease.expiresAt - realNow();
    Date.now = () => realNow() + ttlMs + 60_000;
    try {
      const st = await waitFor(async () => (t.agent.status().lease.state === 'expired' ? t.agent.status() : undefined), 5_000, 'expiry by the wall clock');
      expect(st.keys).to.deep.equal({ classKeys: 0, sensitiveKeys: 0 });
      expect(ran, 'beforeExpiry ran once, with the keys still held').to.deep.equal([{ classKeys: 1, state: 'active' }]);
    } finally {
      Date.now = realNow;
      lease.beforeExpiry = original;
    }
    await waitFor(async () => t.agent.status().lease.state === 'active' || undefined, 15_000, 'a new lease');
    expect(t.agent.status().keys.classKeys).to.equal(1);
  });
});

describe('keys that arrive after their lease ended (real server)', function () {
  this.timeout(30_000);
  const CHUNK = 128 * 1024;
  const t = agentInProcessSuite('late', {
    plain: { disk: randomBytes(2 * CHUNK), mem: Buffer.alloc(0), state: Buffer.alloc(0) },
    policy: `sensitive:\n  memory: false\n  disk: [[0, ${CHUNK}]]\n`,
  });
  const realNow = Date.now;
  after(() => {
    Date.now = realNow;
  });

  it('are wiped, not kept, and the read that asked for them fails without plaintext', async () => {
    // The agent's one fetcher, as the core's key requests reach it.
    const fetcher = (t.agent.core as unknown as { chunkKeys: { fetcher: Fetcher } }).chunkKeys.fetcher;
    const keys = fetcher.keys.bind(fetcher);
    // The answer comes back only once the lease has run out (by the wall clock).
    fetcher.keys = async (...args: Parameters<Fetcher['keys']>) => {
      const answer = await keys(...args);
      const ttlMs = t.agent.lease.expiresAt - realNow();
      Date.now = () => realNow() + ttlMs + 60_000;
      await waitFor(async () => t.agent.lease.state === 'expired' || undefined, 10_000, 'the lease to expire');
      Date.now = realNow;
      return answer;
    };
    const out = Buffer.alloc(4096, 0xee);
    let err: { code?: string } | undefined;
    try {
      await t.agent.core.readRange('disk', 0, 0, out).catch((e) => (err = e));
    } finally {
      fetcher.keys = keys;
      Date.now = realNow;
    }
    expect(err?.code).to.equal('LEASE_EXPIRED');
    expect(t.agent.status().keys.sensitiveKeys, 'no sensitive key kept').to.equal(0);
    expect(out.every((b) => b === 0), 'the read buffer is zeroed').to.equal(true);
    await waitFor(async () => t.agent.lease.state === 'active' || undefined, 15_000, 'a new lease');
  });
});
