// The server's rate limiter (server/limits.ts): token buckets by key, on a fake clock.
import { expect } from 'chai';
import { LetheError } from '../../common/errors.js';
import { RateLimiter, parseRate } from '../../server/limits.js';

describe('rate limits', () => {
  it('a burst of N, then one more each N-th of the period; keys do not share', () => {
    let now = 0;
    const r = new RateLimiter({ count: 3, perMs: 60_000 }, () => now);
    expect([r.take('a'), r.take('a'), r.take('a')]).to.deep.equal([0, 0, 0]);
    expect(r.take('a')).to.equal(20_000);
    expect(r.take('b')).to.equal(0);
    now = 10_000;
    expect(r.wait('a')).to.equal(10_000);
    expect(r.take('a')).to.equal(10_000); // a refusal takes nothing
    now = 20_000;
    expect(r.take('a')).to.equal(0);
    now = 10_000_000;
    expect([r.take('a'), r.take('a'), r.take('a'), r.take('a')]).to.deep.equal([0, 0, 0, 20_000]); // never more than the burst
  });

  it('rates as people type them, and a clear error otherwise', () => {
    expect(parseRate('200/s', '--rate-device')).to.deep.equal({ count: 200, perMs: 1000 });
    expect(parseRate('60 / min', '--rate-enroll')).to.deep.equal({ count: 60, perMs: 60_000 });
    expect(parseRate('10/h', 'x')).to.deep.equal({ count: 10, perMs: 3_600_000 });
    expect(parseRate('off', 'x')).to.equal(null);
    for (const bad of ['lots', '0/s', '5', '5/week', '-1/s', '1e9/s']) {
      expect(() => parseRate(bad, '--rate-device'), bad).to.throw(LetheError, `bad --rate-device: '${bad}'`);
    }
  });
});
