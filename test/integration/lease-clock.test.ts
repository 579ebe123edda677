// A laptop that slept past its lease: timers run on the monotonic clock, which
// stops during a sleep, so the agent also checks the wall clock. Here the wall
// clock jumps past the expiry (as after waking) while no timer is due.
import { expect } from 'chai';
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
    const ttlMs = t.agent.lease.expiresAt - realNow();
    Date.now = () => realNow() + ttlMs + 60_000;
    try {
      const st = await waitFor(async () => (t.agent.status().lease.state === 'expired' ? t.agent.status() : undefined), 5_000, 'expiry by the wall clock');
      expect(st.keys).to.deep.equal({ classKeys: 0, sensitiveKeys: 0 });
    } finally {
      Date.now = realNow;
    }
    await waitFor(async () => t.agent.status().lease.state === 'active' || undefined, 15_000, 'a new lease');
    expect(t.agent.status().keys.classKeys).to.equal(1);
  });
});
