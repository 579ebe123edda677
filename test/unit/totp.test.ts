import { expect } from 'chai';
import { base32Decode, base32Encode, hotp, totp, totpStep } from '../../common/totp.js';

describe('TOTP (RFC 6238)', () => {
  // RFC 4226 appendix D and RFC 6238 appendix B, SHA-1 rows.
  const secret = Buffer.from('12345678901234567890');

  it('matches the RFC 4226 HOTP vectors', () => {
    const want = ['755224', '287082', '359152', '969429', '338314', '254676', '287922', '162583', '399871', '520489'];
    expect(want.map((_, i) => hotp(secret, i))).to.deep.equal(want);
  });

  it('matches the RFC 6238 SHA-1 vectors (8 digits)', () => {
    const rows: [number, string][] = [
      [59, '94287082'],
      [1111111109, '07081804'],
      [1111111111, '14050471'],
      [1234567890, '89005924'],
      [2000000000, '69279037'],
      [20000000000, '65353130'],
    ];
    for (const [t, code] of rows) expect(totp(secret, t * 1000, 8), `T=${t}`).to.equal(code);
  });

  it('accepts a code of the step before or after, and nothing further or malformed', () => {
    const now = 1_700_000_000_000;
    const step = Math.floor(now / 30_000);
    expect(totpStep(secret, totp(secret, now), now)).to.equal(step);
    expect(totpStep(secret, totp(secret, now - 30_000), now)).to.equal(step - 1);
    expect(totpStep(secret, totp(secret, now + 30_000), now)).to.equal(step + 1);
    expect(totpStep(secret, totp(secret, now - 90_000), now)).to.equal(null);
    expect(totpStep(secret, '12345', now)).to.equal(null);
    expect(totpStep(secret, '12345a', now)).to.equal(null);
  });

  it('round-trips base32 (RFC 4648 vectors) and refuses other characters', () => {
    expect(base32Encode(Buffer.from('foobar'))).to.equal('MZXW6YTBOI');
    expect(base32Encode(Buffer.from('fo'))).to.equal('MZXQ');
    expect(base32Decode('MZXW 6YTB OI======').toString()).to.equal('foobar');
    expect(() => base32Decode('MZ1W')).to.throw("'1' is not a base32 character");
  });
});
