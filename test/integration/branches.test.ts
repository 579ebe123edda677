// Issue #14: one device's check-in must not become every device's image
// (DESIGN invariant 11). Against a real server process: a check-in is a branch
// only its device resumes; other devices keep the shared version and never get
// its chunks; an admin's promote (audited, with the device it came from) or a
// `users: single` policy makes it shared; a newer shared version wins over an
// older branch; bad promotes get stable codes; a database made before branches
// upgrades in place.
import fs from 'node:fs';
import { expect } from 'chai';
import { sqliteFilesOnly } from '../helpers/pg.js';
import { serverDb } from '../helpers/server-db.js';
import Database from 'better-sqlite3';
import path from 'node:path';
import { randomBytes } from 'node:crypto';
import { sha256 } from '../../common/crypto.js';
import { PromoteResponse } from '../../common/wire.js';
import { DeviceClient } from '../../agent/remote/device-client.js';
import { closeIdentity, homeFiles, loadIdentity, type DeviceInfo } from '../../agent/keys/identity.js';
import type { RunningAgent } from '../../agent/daemon/start.js';
import { admin, agentInProcess, assign, enrolledDevice, pushImage, rejects, testUnlock, type TestDevice, type TestImage } from '../helpers/fixtures.js';
import { lethe, startServer, type ServerProc } from '../helpers/proc.js';
import { expectSameBytes } from '../helpers/bytes.js';

const PAGE = 4096;

interface VersionView {
  version: number;
  state: string;
  device?: string;
  base?: number | null;
  promotedAt?: string | null;
}

/** The device id of an enrolled home (device.json: no key is unsealed for it). */
const deviceIdOf = (home: string) => (JSON.parse(fs.readFileSync(homeFiles(home).info, 'utf8')) as DeviceInfo).deviceId;

/** An agent in this process: its device checks its writes in with its own client. */
async function checkin(agent: RunningAgent, home: string): Promise<{ version: number; shared?: boolean }> {
  const id = await loadIdentity(home, testUnlock());
  const client = new DeviceClient(id);
  try {
    return (await agent.core.checkin(client)) as { version: number; shared?: boolean };
  } finally {
    client.close();
    closeIdentity(id);
  }
}

describe('issue #14: device branches (real server process)', function () {
  this.timeout(60_000);
  let s: ServerProc;
  let agent: RunningAgent;
  let home: string;
  let img: TestImage;
  let a: string; // the agent's device
  let b: TestDevice;
  const mine = randomBytes(PAGE);

  before(async () => {
    s = await startServer();
    ({ agent, home, img } = await agentInProcess(s, 'desk')); // mem chunks 0, 2, 4, 6 stored
    a = deviceIdOf(home);
    b = await enrolledDevice(s, 'laptop-b');
    await assign(s, b.deviceId, 'desk');
  });
  after(async () => {
    agent?.stop();
    await agent?.done;
    b?.close();
    await s?.stop();
  });

  const versions = async (name = 'desk') => {
    const c = admin(s);
    try {
      const r = await c.json<{ images: { name: string; current: number; versions: VersionView[] }[] }>('GET', '/images');
      return r.images.find((i) => i.name === name)!;
    } finally {
      c.close();
    }
  };
  const manifestHash = async (version: number, index: number) => {
    const c = admin(s);
    try {
      const m = await c.json<{ chunks: { mem: [number, number, string, string][] } }>('GET', `/images/desk/versions/${version}/manifest`);
      return m.chunks.mem.find(([i]) => i === index)!;
    } finally {
      c.close();
    }
  };
  const audited = async (type: string) => {
    const db = await serverDb(s);
    try {
      return (await db.sql.all<{ device: string; data: string }>('SELECT device, data FROM audit WHERE type = ? ORDER BY seq', type)).map((r) => ({
        device: r.device,
        data: JSON.parse(r.data) as Record<string, unknown>,
      }));
    } finally {
      await db.close();
    }
  };
  /** The mem chunk 0 that device B is served under a new lease, and that lease's version. */
  const servedToB = async () => {
    const lease = await b.client.lease('desk');
    const [blob] = await b.client.chunks(lease.leaseId, [{ kind: 'mem', index: 0 }]);
    return { version: lease.version, hash: sha256(blob).toString('base64url') };
  };

  it("a check-in is its device's own: another device keeps the shared version and is never served its chunks", async () => {
    await agent.core.write('mem', 0, mine);
    const r = await checkin(agent, home);
    expect(r).to.deep.include({ version: img.version + 1, shared: false });
    const branch = r.version;
    const [, gen, , branchHash] = await manifestHash(branch, 0);
    expect(gen).to.equal(branch);
    const [, , , sharedHash] = await manifestHash(img.version, 0);

    expect(await servedToB()).to.deep.equal({ version: img.version, hash: sharedHash });
    expect(sharedHash).to.not.equal(branchHash);
    const listed = await versions();
    expect(listed.current).to.equal(img.version);
    expect(listed.versions.find((v) => v.version === branch)).to.deep.include({ state: 'committed', device: a, base: img.version, promotedAt: null });
    expect(listed.versions.find((v) => v.version === img.version)).to.not.have.property('device');
    const ls = await lethe(['image', 'ls'], s.env);
    expect(ls.stdout).to.contain(` 1,${branch}(branch ${a}) `);
  });

  it("the device's next lease resumes its branch, with its writes; the other device's stays on the shared version", async () => {
    await agent.lease.reacquire();
    expect(agent.core.manifest!.version).to.equal(img.version + 1);
    const out = Buffer.alloc(PAGE);
    await agent.core.readInto('mem', 0, out);
    expectSameBytes(out, mine);
    expect((await servedToB()).version).to.equal(img.version);
  });

  it('promote makes the branch the shared version: the other device gets it; audited with the device it came from', async () => {
    const branch = img.version + 1;
    const r = await lethe(['image', 'promote', 'desk', String(branch)], s.env);
    expect(r).to.deep.include({ code: 0, stderr: '' });
    expect(r.stdout).to.equal(`desk@${branch} (checked in by ${a}) is now the shared version, after ${img.version}; assigned devices start from it at their next lease\n`);
    const [, , , branchHash] = await manifestHash(branch, 0);
    expect(await servedToB()).to.deep.equal({ version: branch, hash: branchHash });
    expect(await audited('version.promote')).to.deep.equal([
      { device: a, data: { image: 'desk', version: branch, device: a, base: img.version, previous: img.version, actor: `token:${sha256(s.adminToken).toString('hex').slice(0, 8)}` } },
    ]);
    const again = await lethe(['image', 'promote', 'desk', String(branch), '--json'], s.env);
    expect(PromoteResponse.parse(JSON.parse(again.stdout))).to.deep.equal({ image: 'desk', version: branch, device: a, previous: branch, changed: false });
    expect(await audited('version.promote'), 'a repeat changes nothing and is not audited').to.have.length(1);
    expect((await lethe(['image', 'ls'], s.env)).stdout).to.contain(`,${branch}(promoted from ${a}) `);
  });

  it("a shared version pushed after a device branched wins over the branch, which stays promotable", async () => {
    await agent.lease.reacquire();
    await agent.core.write('mem', 2, randomBytes(PAGE));
    const second = (await checkin(agent, home)).version; // a branch of the promoted version
    await agent.lease.reacquire();
    expect(agent.core.manifest!.version, 'its own newer branch').to.equal(second);
    const stale = await b.client.lease('desk');
    await b.client.keys(stale.leaseId, [{ kind: 'mem', index: 0 }], true);
    const pushed = await pushImage(s, 'desk');
    expect(pushed.version).to.equal(second + 2); // the draft of B's write took a number
    await agent.lease.reacquire();
    expect(agent.core.manifest!.version, "the admin's push wins").to.equal(pushed.version);
    expect((await servedToB()).version).to.equal(pushed.version);
    // A check-in on a version its device no longer resumes is refused, as before branches.
    const e = await rejects(b.client.checkin(stale.leaseId, Buffer.alloc(0), true));
    expect({ status: e.status, code: e.code }).to.deep.equal({ status: 409, code: 'CONFLICT' });
    const r = await lethe(['image', 'promote', 'desk', String(second), '--json'], s.env);
    expect(PromoteResponse.parse(JSON.parse(r.stdout))).to.deep.equal({ image: 'desk', version: second, device: a, previous: pushed.version, changed: true });
    await agent.lease.reacquire();
    expect(agent.core.manifest!.version).to.equal(second);
    expect((await servedToB()).version).to.equal(second);
  });

  it('bad promotes get a 4xx with a stable code and change nothing', async () => {
    const before = await versions();
    // A draft of this device's writes, not checked in.
    await agent.lease.reacquire();
    await agent.core.write('mem', 4, randomBytes(PAGE));
    await agent.core.ensureWriteKeys('mem', [4]);
    const draft = (await versions()).versions.find((v) => v.state === 'draft' && v.device === a)!;
    expect(draft, "the draft of this device's writes").to.not.equal(undefined);
    const c = admin(s);
    try {
      const cases: [string, string, number, string, string][] = [
        ['unknown version', '/images/desk/versions/99/promote', 404, 'UNKNOWN_VERSION', "image 'desk' has no version 99"],
        ['unknown image', '/images/nope/versions/1/promote', 404, 'UNKNOWN_IMAGE', "no image 'nope'"],
        ["an admin's push", '/images/desk/versions/1/promote', 409, 'NOT_A_BRANCH', 'desk@1 is not a device branch: an admin pushed it'],
        ["a device's draft", `/images/desk/versions/${draft.version}/promote`, 409, 'VERSION_DRAFT', `desk@${draft.version} is a draft: its device has not checked it in`],
        ['a version that is not a number', '/images/desk/versions/x/promote', 400, 'BAD_REQUEST', "version must be a non-negative integer, got 'x'"],
      ];
      for (const [what, p, status, code, message] of cases) {
        const e = await rejects(c.json('POST', p));
        expect({ status: e.status, code: e.code, message: e.message }, what).to.deep.equal({ status, code, message });
      }
    } finally {
      c.close();
    }
    const cli = await lethe(['image', 'promote', 'desk', '1'], s.env);
    expect(cli).to.deep.equal({
      code: 1,
      stdout: '',
      stderr: "lethe: error: desk@1 is not a device branch: an admin pushed it\nlethe: hint: to make it current again, push it anew ('lethe image pull desk@1', then 'lethe image push')\n",
    });
    const notNumber = await lethe(['image', 'promote', 'desk', 'latest'], s.env);
    expect(notNumber).to.deep.equal({ code: 2, stdout: '', stderr: "lethe: error: version must be a number, got 'latest'\nlethe: hint: 'lethe image ls' lists the versions\n" });
    const after = await versions();
    expect(after.current).to.equal(before.current);
    expect(await audited('version.promote')).to.have.length(2);
  });

  it('users: single in the policy promotes a check-in at once (audited as auto)', async () => {
    const solo = await agentInProcess(s, 'solo', { policy: 'image:\n  users: single\n' });
    try {
      await assign(s, b.deviceId, 'solo');
      const dev = deviceIdOf(solo.home);
      await solo.agent.core.write('mem', 0, randomBytes(PAGE));
      const r = await checkin(solo.agent, solo.home);
      expect(r).to.deep.include({ version: solo.img.version + 1, shared: true });
      expect((await b.client.lease('solo')).version).to.equal(r.version);
      expect((await versions('solo')).current).to.equal(r.version);
      expect((await audited('version.promote')).at(-1)).to.deep.equal({
        device: dev,
        data: { image: 'solo', version: r.version, device: dev, base: solo.img.version, previous: solo.img.version, auto: true },
      });
    } finally {
      solo.agent.stop();
      await solo.agent.done;
    }
  });
});

describe('issue #14: a database made before device branches (real server process)', function () {
  // Edits or copies the data dir's SQLite files; the fleet suite checks the chain on PostgreSQL.
  before(function () {
    sqliteFilesOnly(this);
  });
  this.timeout(60_000);

  it('upgrades in place: versions keep their rows, leases and promotes work', async () => {
    let s = await startServer();
    const img = await pushImage(s, 'old');
    const dev = await enrolledDevice(s, 'laptop');
    await assign(s, dev.deviceId, 'old');
    const lease1 = await dev.client.lease('old');
    await s.stop();
    // Back to the schema before branches: no branch columns, no trusted tracers (and no versioned migrations yet).
    const db = new Database(path.join(s.dir, 'lethe.db'));
    db.exec('ALTER TABLE versions DROP COLUMN device_id; ALTER TABLE versions DROP COLUMN base; ALTER TABLE versions DROP COLUMN promoted_at; DROP TABLE trusted_tracers; DROP TABLE schema_migrations;');
    db.close();
    s = await s.restart();
    try {
      const cols = new Database(path.join(s.dir, 'lethe.db'), { readonly: true });
      try {
        const names = (cols.prepare('PRAGMA table_info(versions)').all() as { name: string }[]).map((c) => c.name);
        expect(names).to.include.members(['device_id', 'base', 'promoted_at']);
        expect(cols.prepare('SELECT device_id, base, promoted_at FROM versions').all()).to.deep.equal([{ device_id: null, base: null, promoted_at: null }]);
      } finally {
        cols.close();
      }
      const lease = await dev.client.lease('old');
      expect(lease.version).to.equal(img.version);
      expect(lease.leaseId).to.not.equal(lease1.leaseId);
      const r = await lethe(['image', 'trust', 'old', dev.deviceId], s.env);
      expect(r.code, r.stderr).to.equal(0);
      const p = await lethe(['image', 'promote', 'old', String(img.version), '--json'], s.env);
      expect(JSON.parse(p.stdout)).to.deep.include({ error: { code: 'NOT_A_BRANCH', message: `old@${img.version} is not a device branch: an admin pushed it`, hint: "to make it current again, push it anew ('lethe image pull old@1', then 'lethe image push')" } });
    } finally {
      dev.close();
      await s.stop();
    }
  });
});
