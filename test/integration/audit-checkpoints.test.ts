// Issue #14: the audit log's integrity must not rest on whoever holds the database.
// A signed checkpoint is mandatory at the head and at every interval, the verifying
// key is pinned outside the data dir, and devices and exports anchor the head.
import { expect } from 'chai';
import { sqliteFilesOnly } from '../helpers/pg.js';
import Database from 'better-sqlite3';
import fs from 'node:fs';
import path from 'node:path';
import { AUDIT_CHECKPOINT_EVERY, AUDIT_GENESIS_HASH } from '../../common/constants.js';
import { checkpointMessage, checkpointSigned, entryHash } from '../../common/audit-hash.js';
import { b64u, sha256, sign, signKeyPair } from '../../common/crypto.js';
import { keepCheckpoint, readCheckpoint } from '../../agent/keys/anchor.js';
import { agentInProcess, assign, enrolledDevice, pushImage, type TestDevice } from '../helpers/fixtures.js';
import { TEST_PASSPHRASE, lethe, startServer, tmpDir, waitFor, type ServerProc } from '../helpers/proc.js';

interface Verified {
  ok: boolean;
  entries: number;
  firstBad: number | null;
  reason?: string;
  checkpoints: number;
  key: string;
  anchor?: number;
}

type Row = { seq: number; ts: string; type: string; device: string | null; data: string; hash: string };

/** A copy of the data dir's config and database, for attacks that verify offline (`--data`). */
function copyDataDir(s: ServerProc): string {
  const dir = path.join(tmpDir('lethe-audit-copy-'), 'data');
  fs.mkdirSync(dir);
  fs.copyFileSync(path.join(s.dir, 'config.json'), path.join(dir, 'config.json'));
  const live = new Database(path.join(s.dir, 'lethe.db'), { readonly: true });
  live.exec(`VACUUM INTO '${path.join(dir, 'lethe.db')}'`);
  live.close();
  return dir;
}

/** Renumbers the entries 1, 2, … and recomputes every hash with the real hash function. */
function rehash(db: Database.Database): void {
  const rows = db.prepare('SELECT * FROM audit ORDER BY seq').all() as Row[];
  db.prepare('DELETE FROM audit').run();
  const ins = db.prepare('INSERT INTO audit(seq, ts, type, device, data, hash) VALUES (?, ?, ?, ?, ?, ?)');
  let prev = AUDIT_GENESIS_HASH;
  rows.forEach((r, i) => {
    prev = entryHash(prev, { seq: i + 1, ts: r.ts, type: r.type, device: r.device, data: JSON.parse(r.data) });
    ins.run(i + 1, r.ts, r.type, r.device, r.data, prev);
  });
}

/** What a holder of `secretKey` can do: replace every checkpoint with fresh ones (each interval and the head). */
function resign(db: Database.Database, secretKey: Uint8Array): void {
  db.prepare('DELETE FROM checkpoints').run();
  const rows = db.prepare('SELECT seq, hash FROM audit ORDER BY seq').all() as { seq: number; hash: string }[];
  const ins = db.prepare('INSERT INTO checkpoints(seq, hash, signature) VALUES (?, ?, ?)');
  for (const r of rows) {
    if (r.seq % AUDIT_CHECKPOINT_EVERY === 0 || r.seq === rows.length) ins.run(r.seq, r.hash, b64u.encode(sign(secretKey, checkpointMessage(r.seq, r.hash))));
  }
}

describe('audit checkpoints, pinned key and anchors (issue #14)', function () {
  // Edits or copies the data dir's SQLite files; the fleet suite checks the chain on PostgreSQL.
  before(function () {
    sqliteFilesOnly(this);
  });
  this.timeout(180_000);
  let s: ServerProc;
  let victim: TestDevice;
  let anchorSeq: number;

  before(async () => {
    s = await startServer();
    await pushImage(s, 'anchored', { chunks: 2 });
    victim = await enrolledDevice(s, 'victim');
    await assign(s, victim.deviceId, 'anchored');
    const lease = await victim.client.lease('anchored');
    for (let i = 0; i < AUDIT_CHECKPOINT_EVERY; i++) await victim.client.keys(lease.leaseId, [{ kind: 'mem', index: 2 * (i % 2) }]);
    // The device's heartbeat brings the signed head; the CLI keeps it in the device home.
    const hb = await lethe(['heartbeat', '--home', victim.home, '--json', '--passphrase-fd', '0'], {}, TEST_PASSPHRASE);
    expect(hb.code, hb.stderr).to.equal(0);
    anchorSeq = readCheckpoint(victim.home)!.seq;
    for (let i = 0; i < 3; i++) await victim.client.keys(lease.leaseId, [{ kind: 'mem', index: 0 }]);
    for (const cmd of ['revoke', 'wipe']) {
      const r = await lethe(['admin', cmd, victim.deviceId], s.env);
      expect(r.code, r.stderr).to.equal(0);
    }
    await victim.client.heartbeat(); // wipe.delivered
  });
  after(async () => {
    victim?.close();
    await s?.stop();
  });

  const verify = async (extra: string[] = [], env = s.env) => {
    const r = await lethe(['audit', 'verify', '--json', ...extra], env);
    return { ...r, body: JSON.parse(r.stdout) as Verified };
  };
  const liveDb = () => new Database(path.join(s.dir, 'lethe.db'));

  it('an untouched log has a signed checkpoint at every interval and at the head, checked with the pinned key', async () => {
    const r = await verify();
    expect(r.code, r.stderr).to.equal(0);
    expect(r.body).to.include({ ok: true, key: 'pinned' });
    expect(r.body.entries).to.be.greaterThan(AUDIT_CHECKPOINT_EVERY);
    expect(r.body.checkpoints).to.equal(Math.floor(r.body.entries / AUDIT_CHECKPOINT_EVERY) + 1);
    expect(r.stderr).to.equal('');
    const unpinned = await verify([], { ...s.env, LETHE_AUDIT_KEY: undefined } as unknown as Record<string, string>);
    expect(unpinned.body).to.include({ ok: true, key: 'server' });
    expect(unpinned.stderr).to.contain("lethe: warning: no pinned audit key (--audit-key, $LETHE_AUDIT_KEY): the signatures were checked with the server's own key");
  });

  it("issue #14: the reviewer's rewrite (checkpoints deleted, revoke and wipe.delivered removed, chain re-hashed) fails naming the missing checkpoint", async () => {
    const dir = copyDataDir(s);
    const db = new Database(path.join(dir, 'lethe.db'));
    db.prepare('DELETE FROM checkpoints').run();
    const removed = db.prepare("DELETE FROM audit WHERE type IN ('device.revoke', 'wipe.delivered')").run();
    expect(removed.changes).to.equal(2);
    rehash(db);
    db.close();
    const r = await verify(['--data', dir]);
    expect(r.code).to.equal(1);
    expect(r.body).to.include({ ok: false, firstBad: AUDIT_CHECKPOINT_EVERY, reason: `no signed checkpoint at entry ${AUDIT_CHECKPOINT_EVERY}` });
  });

  it('a deleted interval checkpoint fails verify', async () => {
    const db = liveDb();
    const row = db.prepare('SELECT * FROM checkpoints WHERE seq = ?').get(AUDIT_CHECKPOINT_EVERY);
    expect(row).to.not.equal(undefined);
    db.prepare('DELETE FROM checkpoints WHERE seq = ?').run(AUDIT_CHECKPOINT_EVERY);
    try {
      const r = await verify();
      expect(r.code).to.equal(1);
      expect(r.body).to.include({ ok: false, firstBad: AUDIT_CHECKPOINT_EVERY, reason: `no signed checkpoint at entry ${AUDIT_CHECKPOINT_EVERY}` });
    } finally {
      db.prepare('INSERT INTO checkpoints(seq, hash, signature) VALUES (@seq, @hash, @signature)').run(row);
      db.close();
    }
    expect((await verify()).body.ok).to.equal(true);
  });

  it('an unsigned head fails verify', async () => {
    const db = liveDb();
    const head = db.prepare('SELECT seq FROM audit ORDER BY seq DESC LIMIT 1').get() as { seq: number };
    const row = db.prepare('SELECT * FROM checkpoints WHERE seq = ?').get(head.seq);
    db.prepare('DELETE FROM checkpoints WHERE seq = ?').run(head.seq);
    try {
      const r = await verify();
      expect(r.code).to.equal(1);
      expect(r.body).to.include({ ok: false, firstBad: head.seq, reason: `the head (entry ${head.seq}) is not signed` });
    } finally {
      db.prepare('INSERT INTO checkpoints(seq, hash, signature) VALUES (@seq, @hash, @signature)').run(row);
      db.close();
    }
    expect((await verify()).body.ok).to.equal(true);
  });

  it('the server appends nothing on top of a head cut back outside it (AUDIT_UNAVAILABLE)', async () => {
    const db = liveDb();
    const head = db.prepare('SELECT * FROM audit ORDER BY seq DESC LIMIT 1').get() as Row;
    const cp = db.prepare('SELECT * FROM checkpoints WHERE seq = ?').get(head.seq);
    db.prepare('DELETE FROM audit WHERE seq = ?').run(head.seq);
    db.prepare('DELETE FROM checkpoints WHERE seq = ?').run(head.seq);
    try {
      const e = await enrolledDevice(s, 'bystander').then(
        () => undefined,
        (err: unknown) => err as { code: string; status: number; message: string },
      );
      expect(e).to.include({
        code: 'AUDIT_UNAVAILABLE',
        status: 503,
        message: `the head (entry ${head.seq - 1}) is not signed: the log was changed outside the server; nothing was released`,
      });
      expect((db.prepare('SELECT MAX(seq) AS n FROM audit').get() as { n: number }).n).to.equal(head.seq - 1);
    } finally {
      db.prepare('INSERT INTO audit(seq, ts, type, device, data, hash) VALUES (@seq, @ts, @type, @device, @data, @hash)').run(head);
      db.prepare('INSERT INTO checkpoints(seq, hash, signature) VALUES (@seq, @hash, @signature)').run(cp);
      db.close();
    }
  });

  it("a log re-signed with a key swapped into the data dir passes only without the pinned key", async () => {
    const dir = copyDataDir(s);
    const db = new Database(path.join(dir, 'lethe.db'));
    db.prepare("DELETE FROM audit WHERE type = 'device.revoke'").run();
    rehash(db);
    // A key that begins with '-', as one in 64 does: the CLI must not read it as options.
    let forger = signKeyPair();
    while (!b64u.encode(forger.publicKey).startsWith('-')) forger = signKeyPair();
    resign(db, forger.secretKey);
    db.close();
    const config = JSON.parse(fs.readFileSync(path.join(dir, 'config.json'), 'utf8')) as Record<string, unknown>;
    fs.writeFileSync(path.join(dir, 'config.json'), JSON.stringify({ ...config, auditKey: b64u.encode(forger.publicKey) }));
    const unpinned = await verify(['--data', dir], { LETHE_AUDIT_KEY: undefined } as unknown as Record<string, string>);
    expect(unpinned.body).to.include({ ok: true, key: 'server' });
    const pinned = await verify(['--data', dir, '--audit-key', s.auditKey]);
    expect(pinned.code).to.equal(1);
    expect(pinned.body).to.include({ ok: false, firstBad: null, reason: "the server's signing key is not the pinned audit key", key: 'pinned' });
    const online = await verify(['--audit-key', b64u.encode(forger.publicKey)]);
    expect(online.code).to.equal(1);
    expect(online.body).to.include({ ok: false, reason: "the server's signing key is not the pinned audit key" });
  });

  it("the heartbeat reply carries a checkpoint that verifies under the device's pinned key, and the device keeps the newest", async () => {
    const info = JSON.parse(fs.readFileSync(path.join(victim.home, 'device.json'), 'utf8')) as { serverSignPublicKey: string };
    expect(info.serverSignPublicKey).to.equal(s.auditKey);
    const kept = readCheckpoint(victim.home)!;
    expect(checkpointSigned(b64u.decode(info.serverSignPublicKey), kept)).to.equal(true);
    const db = liveDb();
    const entry = db.prepare('SELECT hash FROM audit WHERE seq = ?').get(kept.seq) as { hash: string };
    const interval = db.prepare('SELECT seq, hash, signature FROM checkpoints WHERE seq = ?').get(AUDIT_CHECKPOINT_EVERY) as { seq: number };
    db.close();
    expect(kept.hash).to.equal(entry.hash);
    const hb = await victim.client.heartbeat();
    expect(hb.checkpoint!.seq).to.be.greaterThan(kept.seq);
    expect(checkpointSigned(b64u.decode(info.serverSignPublicKey), hb.checkpoint!)).to.equal(true);
    // An older head, a forged one, or another hash at the same entry does not replace it.
    expect(keepCheckpoint(victim.home, info.serverSignPublicKey, interval)).to.equal(
      `the server's audit head (entry ${interval.seq}) is behind the checkpoint this device keeps (entry ${kept.seq}): its log was cut`,
    );
    const forged = signKeyPair();
    const fake = { seq: kept.seq + 100, hash: 'a'.repeat(64), signature: b64u.encode(sign(forged.secretKey, checkpointMessage(kept.seq + 100, 'a'.repeat(64)))) };
    expect(keepCheckpoint(victim.home, info.serverSignPublicKey, fake)).to.contain('is not signed by the key pinned at enrollment');
    expect(readCheckpoint(victim.home)).to.deep.equal(kept);
  });

  it('--against a device-held checkpoint finds a tail cut back to an interval checkpoint', async () => {
    const dir = copyDataDir(s);
    const db = new Database(path.join(dir, 'lethe.db'));
    db.prepare('DELETE FROM audit WHERE seq > ?').run(AUDIT_CHECKPOINT_EVERY);
    db.prepare('DELETE FROM checkpoints WHERE seq > ?').run(AUDIT_CHECKPOINT_EVERY);
    db.close();
    // Signatures alone cannot tell: the cut log ends on a signed checkpoint.
    expect((await verify(['--data', dir])).body).to.include({ ok: true, entries: AUDIT_CHECKPOINT_EVERY });
    const r = await verify(['--data', dir, '--against', path.join(victim.home, 'checkpoint.json')]);
    expect(r.code).to.equal(1);
    expect(r.body).to.include({
      ok: false,
      firstBad: AUDIT_CHECKPOINT_EVERY + 1,
      reason: `entry ${AUDIT_CHECKPOINT_EVERY + 1} is missing (the log was cut before anchored entry ${anchorSeq})`,
    });
  });

  it('--against a device-held or exported checkpoint finds an entry rewritten before it by a holder of the signing key', async () => {
    const exported = path.join(tmpDir('lethe-export-'), 'head.json');
    const ex = await lethe(['audit', 'checkpoint', '--export', '--out', exported], s.env);
    expect(ex.code, ex.stderr).to.equal(0);
    const head = JSON.parse(fs.readFileSync(exported, 'utf8')) as { seq: number };
    const intact = await verify(['--against', exported]);
    expect(intact.body).to.include({ ok: true, anchor: head.seq });

    const dir = copyDataDir(s);
    const db = new Database(path.join(dir, 'lethe.db'));
    db.prepare("UPDATE audit SET data = '{}' WHERE seq = 100").run();
    rehash(db);
    const signing = fs.readFileSync(path.join(s.dir, 'signing.key'));
    resign(db, signing);
    db.close();
    expect((await verify(['--data', dir])).body.ok).to.equal(true);
    for (const [file, seq] of [
      [path.join(victim.home, 'checkpoint.json'), anchorSeq],
      [exported, head.seq],
    ] as const) {
      const r = await verify(['--data', dir, '--against', file]);
      expect(r.code).to.equal(1);
      expect(r.body).to.include({ ok: false, firstBad: seq, reason: `entry ${seq} differs from the anchored checkpoint (the log was rewritten up to it)` });
    }
  });

  it("an admin's revoke names its actor in the audit entry", async () => {
    const db = liveDb();
    const rows = db.prepare("SELECT type, data FROM audit WHERE device = ? AND type IN ('device.revoke', 'device.wipe', 'assign') ORDER BY seq").all(victim.deviceId) as { type: string; data: string }[];
    const tokenEntry = db.prepare("SELECT data FROM audit WHERE type = 'enroll.token' LIMIT 1").get() as { data: string };
    const keys = db.prepare("SELECT data FROM audit WHERE type = 'keys.release' LIMIT 1").get() as { data: string };
    db.close();
    const actor = `token:${sha256(s.adminToken).toString('hex').slice(0, 8)}`;
    expect(rows.map((r) => r.type)).to.deep.equal(['assign', 'device.revoke', 'device.wipe']);
    for (const r of rows) expect(JSON.parse(r.data)).to.include({ actor });
    expect(JSON.parse(tokenEntry.data)).to.include({ actor });
    expect(JSON.parse(keys.data)).to.not.have.property('actor');
  });
});

describe('the audit signing key kept apart, and an unsigned head at startup (issue #14)', function () {
  // Edits or copies the data dir's SQLite files; the fleet suite checks the chain on PostgreSQL.
  before(function () {
    sqliteFilesOnly(this);
  });
  this.timeout(180_000);
  let s: ServerProc;
  let keyFile: string;
  before(async () => {
    keyFile = path.join(tmpDir('lethe-signing-'), 'audit-signing.key');
    s = await startServer({ initArgs: ['--signing-key', keyFile], runArgs: ['--signing-key', keyFile] });
  });
  after(async () => {
    await s?.stop();
  });

  const run = (extra: string[]) => lethe(['server', 'run', '--data', s.dir, '--listen', '127.0.0.1:0', ...extra]);

  it('init writes the key to --signing-key, not the data dir; run needs that file and refuses another key', async () => {
    expect(fs.existsSync(path.join(s.dir, 'signing.key'))).to.equal(false);
    expect(fs.statSync(keyFile).mode & 0o777).to.equal(0o600);
    expect(b64u.encode(fs.readFileSync(keyFile).subarray(32))).to.equal(s.auditKey);
    const v = await lethe(['audit', 'verify', '--json'], s.env);
    expect(JSON.parse(v.stdout)).to.include({ ok: true, key: 'pinned' });
    await s.stop();
    const without = await run([]);
    expect(without.code).to.equal(2);
    expect(without.stderr).to.contain(`lethe: error: no audit signing key at '${path.join(s.dir, 'signing.key')}'\n`);
    const other = path.join(path.dirname(keyFile), 'other.key');
    fs.writeFileSync(other, signKeyPair().secretKey, { mode: 0o600 });
    const wrong = await run(['--signing-key', other]);
    expect(wrong.code).to.equal(2);
    expect(wrong.stderr).to.contain(`lethe: error: the signing key in '${other}' is not this data dir's (its audit key is ${s.auditKey})\n`);
    s = await s.restart();
  });

  it('a server whose head is unsigned refuses to start until --sign-head', async () => {
    await s.stop();
    const db = new Database(path.join(s.dir, 'lethe.db'));
    const head = db.prepare('SELECT seq FROM audit ORDER BY seq DESC LIMIT 1').get() as { seq: number };
    db.prepare('DELETE FROM checkpoints WHERE seq = ?').run(head.seq);
    db.close();
    const refused = await run(['--signing-key', keyFile]);
    expect(refused.code).to.equal(1);
    expect(refused.stderr).to.contain(`lethe: error: the head (entry ${head.seq}) is not signed: entries were cut or added outside the server\n`);
    s = await s.restart(['--signing-key', keyFile, '--sign-head']);
    expect(s.stderr()).to.contain(`lethe server: warning: the head (entry ${head.seq}) is not signed; signed it as it stands (--sign-head)\n`);
    const v = await lethe(['audit', 'verify', '--json'], s.env);
    expect(JSON.parse(v.stdout)).to.include({ ok: true });
  });

  it("the agent keeps its heartbeat's checkpoint in its home", async () => {
    const { agent, home } = await agentInProcess(s, 'anchored-agent', { chunks: 1 });
    try {
      const cp = await waitFor(async () => readCheckpoint(home), 10_000, 'checkpoint.json in the device home');
      expect(checkpointSigned(b64u.decode(s.auditKey), cp)).to.equal(true);
    } finally {
      agent.stop();
      await agent.done;
    }
  });
});
