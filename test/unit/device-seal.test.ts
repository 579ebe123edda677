// The sealed key file (docs/device-keys.md): what it binds and how it fails.
import { expect } from 'chai';
import { randomBytes } from 'node:crypto';
import { wipe } from '../../common/crypto.js';
import { LetheError } from '../../common/errors.js';
import { isSealed, openKey, parseSealed, passphraseHeader, passphraseKek, sealKey } from '../../agent/keys/seal.js';
import { expectSameBytes } from '../helpers/bytes.js';

const fails = (fn: () => unknown): LetheError => {
  try {
    fn();
  } catch (e) {
    if (e instanceof LetheError) return e;
    throw e;
  }
  throw new Error('expected it to throw');
};

describe('sealed device key files', function () {
  this.timeout(20_000);
  const pass = Buffer.from('correct horse');

  it('a key opens under its passphrase and name only; the header and the name are bound', async () => {
    const kek = await passphraseKek(pass, passphraseHeader('interactive'));
    const key = randomBytes(64);
    const file = sealKey(kek, 'sign', key);
    expect(isSealed(file)).to.equal(true);
    expect(file.indexOf(key)).to.equal(-1);
    expect(file.length).to.equal(12 + 29 + 24 + 64 + 16);
    const f = parseSealed('sign.key', file);
    const out = openKey(kek, 'sign', f, 'passphrase');
    expectSameBytes(Buffer.from(out), key);
    expect((out as { secure?: boolean }).secure).to.equal(true);
    wipe(out);

    // Swapped files: the box key's name does not open the signing key's file.
    expect(fails(() => openKey(kek, 'box', f, 'passphrase')).code).to.equal('UNLOCK_FAILED');
    // A wrong passphrase gives another KEK.
    const wrong = await passphraseKek(Buffer.from('hunter2'), f.header);
    const e = fails(() => openKey(wrong, 'sign', f, 'passphrase'));
    expect([e.code, e.message, e.hint]).to.deep.equal(['UNLOCK_FAILED', 'wrong passphrase: the device keys did not open', 'try again with the right passphrase']);
    // Cheaper parameters written into the header change the KEK and break the tag.
    const cheaper = Buffer.from(file);
    cheaper.writeUInt32LE(1, 12 + 1);
    const g = parseSealed('sign.key', cheaper);
    const cheap = await passphraseKek(pass, g.header);
    expect(fails(() => openKey(cheap, 'sign', g, 'passphrase')).code).to.equal('UNLOCK_FAILED');
  });

  it('a file that is not a sealed key, or asks for absurd Argon2id costs, is named as damaged', () => {
    expect(fails(() => parseSealed('/h/sign.key', randomBytes(64))).message).to.equal("'/h/sign.key' is not a sealed key Lethe can read: no LETHEKEY header");
    const h = passphraseHeader('interactive');
    h.writeBigUInt64LE(64n * 1024n ** 3n, 5);
    const file = Buffer.concat([Buffer.from('LETHEKEY\x01\x01\x1d\x00', 'latin1'), h, randomBytes(24 + 32 + 16)]);
    expect(fails(() => parseSealed('/h/box.key', file)).message).to.equal(`'/h/box.key' is not a sealed key Lethe can read: Argon2id memlimit ${64 * 1024 ** 3} is out of range`);
    expect(fails(() => parseSealed('/h/box.key', file.subarray(0, 50))).message).to.contain('it is truncated');
  });
});

