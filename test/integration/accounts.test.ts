// Named administrators (issue #20): the bootstrap token makes the first admin and
// is retired by it; users log in with a password (and an admin with a TOTP code,
// each good once) for API tokens scoped by role; every action names its user in
// the audit chain; failed logins are rate limited. Real server process, real CLI.
import { expect } from 'chai';
import { createHash } from 'node:crypto';
import { base32Decode, totp } from '../../common/totp.js';
import { enrolledDevice } from '../helpers/fixtures.js';
import { PinnedClient } from '../../common/http-client.js';
import { lethe, startServer, type ServerProc } from '../helpers/proc.js';

const PW: Record<'alice' | 'bob' | 'carol', string> = { alice: 'alice-long-passphrase-1', bob: 'bob-long-passphrase-22', carol: 'carol-long-passphrase-333' };

describe('named administrators and roles (issue #20; real server, real CLI)', function () {
  this.timeout(60_000);
  let s: ServerProc;
  let secret: Buffer;
  let aliceToken = '';
  /** `lethe ARGS` with this server and an admin token (the bootstrap one unless given). */
  const as = (token: string, args: string[], input?: string) => lethe(args, { ...s.env, LETHE_ADMIN_TOKEN: token }, input);
  const json = <T>(r: { code: number; stdout: string; stderr: string }): T => {
    expect(r.code, r.stderr).to.equal(0);
    return JSON.parse(r.stdout) as T;
  };
  /** Logs in (stdin carries the password) and returns the API token. */
  const login = async (user: keyof typeof PW, extra: string[] = []) => {
    const r = await lethe(['admin', 'login', user, '--password-fd', '0', ...extra], { ...s.env, LETHE_ADMIN_TOKEN: undefined }, PW[user] + '\n');
    expect(r.code, r.stderr).to.equal(0);
    const m = /^export LETHE_ADMIN_TOKEN=(\S+)$/m.exec(r.stdout);
    expect(m, r.stdout).to.not.equal(null);
    return m![1];
  };
  const auditLog = async (type: string) =>
    json<{ entries: { type: string; data: Record<string, unknown> }[] }>(await as(aliceToken, ['audit', 'log', '--type', type, '--json'])).entries;

  before(async () => {
    s = await startServer({ runArgs: ['--rate-login-failures', '8/h'] });
  });
  after(async () => {
    await s?.stop();
  });

  it('the bootstrap token adds the first admin (with a TOTP secret) and is refused from then on', async () => {
    const before = await as(s.adminToken, ['admin', 'whoami']);
    expect(before.stdout).to.match(/the bootstrap token \(admin until the first named admin is added\)/);
    const r = await as(s.adminToken, ['admin', 'user', 'add', 'alice', '--role', 'admin', '--password-fd', '0'], PW.alice + '\n');
    expect(r.code, r.stderr).to.equal(0);
    expect(r.stdout).to.match(/added alice \(admin\)/);
    expect(r.stdout).to.match(/the bootstrap token is retired/);
    const m = /secret: ([A-Z2-7]+)/.exec(r.stdout);
    expect(m, r.stdout).to.not.equal(null);
    expect(r.stdout).to.include('otpauth://totp/Lethe%3Aalice?secret=');
    secret = base32Decode(m![1]);
    const refused = await as(s.adminToken, ['admin', 'devices']);
    expect(refused.code).to.equal(1);
    expect(refused.stderr).to.include('admin token missing or wrong');
    expect(refused.stderr).to.include('the bootstrap token was retired when the first named admin was added');
  });

  it('an admin logs in with password and TOTP; a code works once; a wrong one is refused like a wrong password', async () => {
    const code = totp(secret);
    const noCode = await lethe(['admin', 'login', 'alice', '--password-fd', '0'], s.env, PW.alice + '\n');
    expect(noCode.code).to.equal(1);
    expect(noCode.stderr).to.include('user name, password or one-time code wrong');
    aliceToken = await login('alice', ['--totp', code]);
    expect(aliceToken).to.match(/^lethe-admin-/);
    const again = await lethe(['admin', 'login', 'alice', '--password-fd', '0', '--totp', code], s.env, PW.alice + '\n');
    expect(again.code).to.equal(1);
    expect(again.stderr).to.include('user name, password or one-time code wrong');
    const wrongPw = await lethe(['admin', 'login', 'alice', '--password-fd', '0', '--totp', totp(secret, Date.now() + 30_000)], s.env, 'not-the-password-at-all\n');
    expect(wrongPw.stderr).to.include('user name, password or one-time code wrong');
    const who = json<{ user: string; role: string; via: string }>(await as(aliceToken, ['admin', 'whoami', '--json']));
    expect(who).to.deep.include({ user: 'alice', role: 'admin', via: 'token' });
  });

  it('a helpdesk user mints enrollment tokens and sees devices, but may not wipe; an auditor reads and changes nothing', async () => {
    for (const [name, role] of [
      ['bob', 'helpdesk'],
      ['carol', 'auditor'],
    ] as const) {
      const r = await as(aliceToken, ['admin', 'user', 'add', name, '--role', role, '--password-fd', '0'], PW[name] + '\n');
      expect(r.code, r.stderr).to.equal(0);
      expect(r.stdout).to.not.include('secret:');
    }
    const bob = await login('bob');
    const carol = await login('carol');
    // A device to act on, enrolled through the helpdesk's token.
    const tok = json<{ token: string }>(await as(bob, ['admin', 'enroll-token', '--json']));
    expect(tok.token).to.match(/^lethe-enroll-/);
    const dev = await enrolledDevice({ ...s, adminToken: aliceToken });
    try {
      expect(json<{ devices: { id: string }[] }>(await as(bob, ['admin', 'devices', '--json'])).devices.map((d) => d.id)).to.include(dev.deviceId);
      const wipe = await as(bob, ['admin', 'wipe', dev.deviceId]);
      expect(wipe.code).to.equal(1);
      expect(wipe.stderr).to.include("user 'bob' (role helpdesk) may not do this (devices.act)");
      const bobAudit = await as(bob, ['audit', 'verify']);
      expect(bobAudit.code).to.equal(1);
      expect(bobAudit.stderr).to.include('(audit.read)');

      expect((await as(carol, ['audit', 'verify'])).code).to.equal(0);
      expect((await as(carol, ['image', 'ls'])).code).to.equal(0);
      const carolEnroll = await as(carol, ['admin', 'enroll-token']);
      expect(carolEnroll.stderr).to.include("user 'carol' (role auditor) may not do this (devices.enroll)");
      const carolRevoke = await as(carol, ['admin', 'revoke', dev.deviceId]);
      expect(carolRevoke.stderr).to.include('(devices.act)');
      const users = await as(carol, ['admin', 'user', 'ls']);
      expect(users.stderr).to.include('(users.manage)');

      // The device is untouched by the refused calls; alice's revoke names her in the audit chain.
      const status = (await as(aliceToken, ['admin', 'devices', '--json'])).stdout;
      expect(JSON.parse(status).devices.find((d: { id: string }) => d.id === dev.deviceId).status).to.equal('active');
      expect((await as(aliceToken, ['admin', 'revoke', dev.deviceId])).code).to.equal(0);
      const report = json<{ entries: { type: string; data: { actor?: string } }[] }>(await as(carol, ['audit', 'device', dev.deviceId, '--json']));
      expect(report.entries.find((e) => e.type === 'device.revoke')?.data.actor).to.equal('user:alice');
    } finally {
      dev.close();
    }
  });

  it('lists users and tokens; a revoked token and a removed user are refused at once; the last admin stays', async () => {
    const users = json<{ users: { name: string; role: string; totp: boolean; tokens: number }[] }>(await as(aliceToken, ['admin', 'user', 'ls', '--json']));
    expect(users.users.map((u) => [u.name, u.role, u.totp])).to.deep.equal([
      ['alice', 'admin', true],
      ['bob', 'helpdesk', false],
      ['carol', 'auditor', false],
    ]);
    const bob = await login('bob', ['--label', 'second']);
    const mine = json<{ tokens: { id: string; label: string }[] }>(await as(bob, ['admin', 'token', 'ls', '--json']));
    const second = mine.tokens.find((t) => t.label === 'second')!;
    expect(second).to.not.equal(undefined);
    expect((await as(bob, ['admin', 'token', 'rm', second.id])).code).to.equal(0);
    const revoked = await as(bob, ['admin', 'devices']);
    expect(revoked.stderr).to.include('admin token missing or wrong');
    expect(revoked.stderr).to.include("lethe: hint: log in with 'lethe admin login NAME'");

    const carol = await login('carol');
    expect((await as(aliceToken, ['admin', 'user', 'rm', 'carol'])).code).to.equal(0);
    expect((await as(carol, ['audit', 'verify'])).stderr).to.include('admin token missing or wrong');
    const last = await as(aliceToken, ['admin', 'user', 'rm', 'alice']);
    expect(last.code).to.equal(1);
    expect(last.stderr).to.include("'alice' is the last admin");
    // A token may do less than its user, never more.
    const more = await lethe(['admin', 'login', 'bob', '--password-fd', '0', '--role', 'admin'], s.env, PW.bob + '\n');
    expect(more.code).to.equal(1);
    expect(more.stderr).to.include('a helpdesk cannot make a token with role admin');
  });

  it('a user changes their own password only with the current one: a token alone cannot', async () => {
    const bob = await login('bob');
    const http = new PinnedClient(s.url, s.fingerprint);
    const put = (body: unknown) =>
      http.json('PUT', '/v1/admin/users/bob/password', body, { authorization: `Bearer ${bob}` }).then(
        () => 'changed',
        (e: { code?: string }) => e.code,
      );
    try {
      expect(await put({ password: 'taken-over-password-1' })).to.equal('BAD_REQUEST');
      expect(await put({ password: 'taken-over-password-1', currentPassword: 'a-wrong-guess-at-it' })).to.equal('LOGIN_FAILED');
      expect(await put({ password: 'bob-second-passphrase', currentPassword: PW.bob })).to.equal('changed');
    } finally {
      http.close();
    }
    PW.bob = 'bob-second-passphrase';
    expect(await login('bob')).to.match(/^lethe-admin-/);
  });

  it('a revoked device still calling is an alarm in the audit chain, once per device and reason in ten minutes', async () => {
    const dev = await enrolledDevice({ ...s, adminToken: aliceToken });
    try {
      expect((await as(aliceToken, ['admin', 'revoke', dev.deviceId])).code).to.equal(0);
      for (let i = 0; i < 3; i++) {
        const e = await dev.client.heartbeat().then(
          () => null,
          (err: { code?: string }) => err.code,
        );
        expect(e).to.equal('DEVICE_REVOKED');
      }
      const alarms = (await auditLog('alarm.device-refused')).filter((a) => a.data.device === dev.deviceId);
      expect(alarms).to.have.length(1);
      expect(alarms[0].data).to.deep.include({ reason: 'revoked', request: 'POST /v1/device/heartbeat' });
    } finally {
      dev.close();
    }
  });

  it('failed logins are counted per user name: past the budget even the right password waits (429 RATE_LIMITED)', async () => {
    // The address has spent part of its budget of 8 on the tests above; bob's name one.
    let refusedAt = -1;
    for (let i = 0; i < 10 && refusedAt < 0; i++) {
      const r = await lethe(['admin', 'login', 'bob', '--password-fd', '0'], s.env, `wrong-password-number-${i}\n`);
      if (/too many failed logins from this address or for this user/.test(r.stderr)) refusedAt = i;
      else expect(r.stderr).to.include('user name, password or one-time code wrong');
    }
    expect(refusedAt).to.be.within(1, 8);
    const r = await lethe(['admin', 'login', 'bob', '--password-fd', '0'], s.env, PW.bob + '\n');
    expect(r.code).to.equal(1);
    expect(r.stderr).to.match(/too many failed logins from this address or for this user/);
    expect(r.stderr).to.match(/retry after \d+ s/);
    // Each failure is in the audit chain with its reason and address; the refused one never reached the password check.
    const failed = (await auditLog('user.login-failed')).filter((e) => e.data.user === 'bob');
    // (and one more: the wrong current password of the test before)
    expect(failed.map((e) => e.data.reason)).to.deep.equal(Array(refusedAt + 1).fill('password'));
    expect(failed[0].data.address).to.match(/127\.0\.0\.1/);
    const logins = await auditLog('user.login');
    expect(logins.map((e) => e.data.user)).to.include.members(['alice', 'bob', 'carol']);
    const bootstrap = `token:${createHash('sha256').update(s.adminToken).digest('hex').slice(0, 8)}`;
    expect((await auditLog('user.add')).map((e) => e.data.actor)).to.deep.equal(['user:alice', 'user:alice', bootstrap]); // newest first
  });
});
