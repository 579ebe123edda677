// Enrollment tokens: one use, expiry, tampering; the CLI's enroll and admin transcripts.
import { expect } from 'chai';
import fs from 'node:fs';
import path from 'node:path';
import { lethe, startServer, tmpDir, TEST_PASSPHRASE, type ServerProc } from '../helpers/proc.js';

/** `lethe enroll`, its keys sealed under TEST_PASSPHRASE (read from stdin). */
const enroll = (args: string[]) => lethe(['enroll', ...args, '--passphrase-fd', '0', '--argon2', 'interactive'], {}, TEST_PASSPHRASE);

describe('enrollment (real server process)', function () {
  let s: ServerProc;
  before(async () => {
    s = await startServer();
  });
  after(async () => {
    await s?.stop();
  });

  async function mint(ttl = '1h'): Promise<string> {
    const r = await lethe(['admin', 'enroll-token', '--ttl', ttl, '--json'], s.env);
    expect(r.code, r.stderr).to.equal(0);
    return (JSON.parse(r.stdout) as { token: string }).token;
  }

  it('a token works once, then is refused with a clear message', async () => {
    const token = await mint();
    const home1 = path.join(tmpDir(), 'home');
    const first = await enroll([token, '--home', home1, '--json']);
    expect(first.code, first.stderr).to.equal(0);
    const { deviceId } = JSON.parse(first.stdout) as { deviceId: string };
    expect(deviceId).to.match(/^dev-[0-9a-f]{16}$/);

    const second = await enroll([token, '--home', path.join(tmpDir(), 'home')]);
    expect(second.code).to.equal(1);
    expect(second.stderr).to.equal(
      "lethe: error: enrollment token is invalid, expired or already used\nlethe: hint: ask IT for a new token ('lethe admin enroll-token')\n",
    );

    const list = await lethe(['admin', 'devices', '--json'], s.env);
    const devices = (JSON.parse(list.stdout) as { devices: { id: string; status: string }[] }).devices;
    expect(devices.filter((d) => d.id === deviceId)).to.have.length(1);
    expect(devices.find((d) => d.id === deviceId)!.status).to.equal('active');
  });

  it('private keys are 0600 in the device home and the server is pinned', async () => {
    const home = path.join(tmpDir(), 'home');
    const r = await enroll([await mint(), '--home', home, '--json']);
    expect(r.code, r.stderr).to.equal(0);
    for (const f of ['sign.key', 'box.key', 'device.json']) {
      expect(fs.statSync(path.join(home, f)).mode & 0o777, f).to.equal(0o600);
    }
    const info = JSON.parse(fs.readFileSync(path.join(home, 'device.json'), 'utf8')) as { fingerprint: string; server: string };
    expect(info.fingerprint).to.equal(s.fingerprint);
    expect(info.server).to.equal(s.url);
  });

  it('an expired token is refused', async () => {
    const token = await mint('1s');
    await new Promise((r) => setTimeout(r, 1500));
    const r = await enroll([token, '--home', path.join(tmpDir(), 'home')]);
    expect(r.code).to.equal(1);
    expect(r.stderr).to.contain('enrollment token is invalid, expired or already used');
  });

  it('a tampered token is refused the same way, and garbage is named as not a token', async () => {
    const token = await mint();
    const body = JSON.parse(Buffer.from(token.slice('lethe-enroll-'.length), 'base64url').toString()) as { s: string };
    body.s = body.s.replace(/^./, (c) => (c === 'A' ? 'B' : 'A'));
    const forged = 'lethe-enroll-' + Buffer.from(JSON.stringify(body)).toString('base64url');
    const r = await enroll([forged, '--home', path.join(tmpDir(), 'home')]);
    expect(r.code).to.equal(1);
    expect(r.stderr).to.contain('enrollment token is invalid, expired or already used');

    const g = await enroll(['hello', '--home', path.join(tmpDir(), 'home')]);
    expect(g.code).to.equal(2);
    expect(g.stderr).to.equal(
      "lethe: error: not an enrollment token: 'hello'\nlethe: hint: ask IT for a new token (they mint one with 'lethe admin enroll-token')\n",
    );
  });

  it('a token whose pin does not match the server is refused before anything is sent', async () => {
    const token = await mint();
    const body = JSON.parse(Buffer.from(token.slice('lethe-enroll-'.length), 'base64url').toString()) as { f: string };
    body.f = 'ab'.repeat(32);
    const forged = 'lethe-enroll-' + Buffer.from(JSON.stringify(body)).toString('base64url');
    const r = await enroll([forged, '--home', path.join(tmpDir(), 'home')]);
    expect(r.code).to.equal(1);
    expect(r.stderr).to.match(/^lethe: error: the server at https:\/\/127\.0\.0\.1:\d+ presented certificate [0-9a-f]{16}…, not the pinned abababababababab…\n/);
    // The token was not spent: it still enrolls against the real server.
    const ok = await enroll([token, '--home', path.join(tmpDir(), 'home'), '--json']);
    expect(ok.code, ok.stderr).to.equal(0);
  });

  it('a wrong admin token gets 401 and a hint, as text and as JSON', async () => {
    const r = await lethe(['admin', 'devices', '--json'], { ...s.env, LETHE_ADMIN_TOKEN: 'lethe-admin-wrong' });
    expect(r.code).to.equal(1);
    expect(JSON.parse(r.stdout)).to.deep.equal({
      error: {
        code: 'ADMIN_AUTH_FAILED',
        message: 'admin token missing or wrong',
        hint: 'set LETHE_ADMIN_TOKEN (or --admin-token) to the token printed by lethe server init',
      },
    });
    expect(r.stderr).to.contain('lethe: error: admin token missing or wrong\n');
  });

  it('a bad --ttl is named', async () => {
    const r = await lethe(['admin', 'enroll-token', '--ttl', 'soon'], s.env);
    expect(r.code).to.equal(2);
    expect(r.stderr).to.equal("lethe: error: bad --ttl: 'soon'\nlethe: hint: use a number with a unit, e.g. 90s, 15m, 1h, 7d\n");
  });
});
