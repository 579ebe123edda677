// A check-in at size: the commit carries the base's rows over a page at a time, before
// its transaction (server/checkin.ts, carryOver). A base of more rows than a page comes
// over whole, the chunk the device wrote in its place, and nothing else changes.
import { expect } from 'chai';
import { randomBytes } from 'node:crypto';
import { startAgent } from '../../agent/daemon/start.js';
import { CHUNK_SIZE } from '../../common/constants.js';
import { sha256 } from '../../common/crypto.js';
import { LetheError } from '../../common/errors.js';
import { parseChunkFrames } from '../../common/frames.js';
import { CARRY_PAGE } from '../../server/checkin.js';
import { agentInProcess, assign, deviceAudit, enrolledDevice, pushImage, rejects, testUnlock, withDeviceClient } from '../helpers/fixtures.js';
import { lethe, startServer, waitFor, type ServerProc } from '../helpers/proc.js';
import { serverDb } from '../helpers/server-db.js';

describe('a check-in on a version of more rows than a page (real server process)', function () {
  this.timeout(120_000);
  let s: ServerProc;
  before(async () => (s = await startServer()));
  after(async () => await s?.stop());

  it("carries every row of the base over, the written chunk's in its place, a zeroed chunk's gone", async () => {
    await pushImage(s, 'wide', { chunks: 2 });
    // Rows past the pushed ones, straight into the database: two pages and a part.
    const first = 100;
    const extra = 2 * CARRY_PAGE + 5;
    const db = await serverDb(s);
    let imageId = '';
    let base = 0;
    try {
      const img = (await db.sql.get<{ id: string; current_version: number }>("SELECT id, current_version FROM images WHERE name = 'wide'"))!;
      [imageId, base] = [img.id, img.current_version];
      await db.sql.tx(async (t) => {
        for (let at = 0; at < extra; at += 500) {
          const n = Math.min(500, extra - at);
          const params: unknown[] = [];
          for (let i = 0; i < n; i++) params.push(img.id, base, 'disk', first + at + i, base, (at + i) % 3 === 0 ? 'sensitive' : 'normal', randomBytes(32), randomBytes(32));
          await t.run(`INSERT INTO chunks(image_id, version, kind, idx, gen, cls, ct_sha256, dedup_hash) VALUES ${Array(n).fill('(?, ?, ?, ?, ?, ?, ?, ?)').join(', ')}`, ...params);
        }
        await t.run('UPDATE versions SET disk_size = ? WHERE image_id = ? AND version = ?', (first + extra) * CHUNK_SIZE.disk, img.id, base);
      });
    } finally {
      await db.close();
    }
    const d = await enrolledDevice(s, 'wide-laptop');
    await assign(s, d.deviceId, 'wide');
    d.close();
    const agent = await startAgent({ home: d.home, image: 'wide', cacheBytes: 1 << 24, heartbeatMs: 30_000, prefetch: false, nbd: null, log: () => {}, unlock: testUnlock(), push: false });
    let version: number;
    const written = first + CARRY_PAGE + 3; // in the second page
    const zeroed = first + 2 * CARRY_PAGE + 1; // in the third: staged as a tombstone, then no row at all
    try {
      await agent.lease.whenActive();
      await agent.core.write('disk', written, randomBytes(CHUNK_SIZE.disk));
      await agent.core.write('disk', zeroed, Buffer.alloc(CHUNK_SIZE.disk));
      version = (await withDeviceClient(d.home, (c) => agent.core.checkin(c))).version;
    } finally {
      agent.stop();
      await agent.done.catch(() => {});
    }
    const after = await serverDb(s);
    try {
      type Row = { kind: string; idx: number; gen: number; cls: string; ct_sha256: Buffer; dedup_hash: Buffer };
      const rows = (v: number) => after.sql.all<Row>('SELECT kind, idx, gen, cls, ct_sha256, dedup_hash FROM chunks WHERE image_id = ? AND version = ? ORDER BY kind, idx', imageId, v);
      const [was, now] = [await rows(base), await rows(version)];
      expect(now.length, "the base's rows but the zeroed one's").to.equal(was.length - 1);
      expect(now.some((r) => r.kind === 'disk' && r.idx === zeroed)).to.equal(false);
      const gone = was.findIndex((w) => w.kind === 'disk' && w.idx === zeroed);
      let differ = 0;
      for (const [i, r] of now.entries()) {
        const b = was[i >= gone ? i + 1 : i];
        if (r.kind === 'disk' && r.idx === written) {
          expect(r.gen, "the written chunk's row is the new version's").to.equal(version);
          continue;
        }
        if (r.kind !== b.kind || r.idx !== b.idx || r.gen !== b.gen || r.cls !== b.cls || !r.ct_sha256.equals(b.ct_sha256) || !r.dedup_hash.equals(b.dedup_hash)) differ++;
      }
      expect(differ, 'rows other than the written one that differ from the base').to.equal(0);
      expect(now.some((r) => r.kind === 'disk' && r.idx === written)).to.equal(true);
      const entry = (await deviceAudit(s, d.deviceId)).find((e) => e.type === 'checkin');
      expect(entry?.data, 'the audit entry counts the one chunk stored').to.include({ version, stored: 1 });
    } finally {
      await after.close();
    }
  });

  it("commits nothing once the draft is no longer the lease's (a newer lease of the device adopted it)", async () => {
    const { agent, home } = await agentInProcess(s, 'taken', { chunks: 2 });
    try {
      await agent.core.write('disk', 1, randomBytes(CHUNK_SIZE.disk));
      // As a lease granted during the check-in's last part would leave it.
      const db = await serverDb(s);
      let draft: number;
      try {
        draft = (await db.sql.get<{ version: number }>("SELECT v.version FROM versions v JOIN images i ON i.id = v.image_id WHERE i.name = 'taken' AND v.state = 'draft'"))!.version;
        await db.sql.run("UPDATE versions SET lease_id = 'a-newer-lease' WHERE version = ? AND state = 'draft'", draft);
      } finally {
        await db.close();
      }
      const e = await rejects(withDeviceClient(home, (c) => agent.core.checkin(c)));
      expect(e.code).to.equal('CONFLICT');
      const after = await serverDb(s);
      try {
        const v = await after.sql.get<{ state: string }>("SELECT v.state FROM versions v JOIN images i ON i.id = v.image_id WHERE i.name = 'taken' AND v.version = ?", draft);
        expect(v?.state, 'the draft stays a draft').to.equal('draft');
      } finally {
        await after.close();
      }
    } finally {
      agent.stop();
      await agent.done.catch(() => {});
    }
  });

  it('removing a version removes the drafts on it, and the blobs their carried rows kept go', async () => {
    const { agent, home, img: first } = await agentInProcess(s, 'gone', { chunks: 2 });
    let draft: number;
    try {
      await agent.core.write('disk', 1, randomBytes(CHUNK_SIZE.disk));
      // A last part whose server dies after the copy leaves the part's blob and the base's rows in the draft
      // (its own row would have come in the commit).
      await s.stop();
      s = await s.restart(undefined, { LETHE_CRASH_AT: 'checkin.carried-over:1' });
      await rejects(withDeviceClient(home, (c) => agent.core.checkin(c)));
      expect(await waitFor(async () => s.proc.signalCode ?? undefined, 30_000, 'the server to die at checkin.carried-over')).to.equal('SIGKILL');
      s = await s.restart(undefined, {});
      const db = await serverDb(s);
      try {
        draft = (await db.sql.get<{ version: number }>("SELECT v.version FROM versions v JOIN images i ON i.id = v.image_id WHERE i.name = 'gone' AND v.state = 'draft'"))!.version;
        const carried = await db.sql.get<{ n: number }>('SELECT COUNT(*) AS n FROM chunks c JOIN images i ON i.id = c.image_id WHERE i.name = ? AND c.version = ?', 'gone', draft);
        expect(Number(carried?.n), "the base's rows of disk and guest RAM, two each").to.equal(4);
      } finally {
        await db.close();
      }
    } finally {
      agent.stop();
      await agent.done.catch(() => {});
    }
    await pushImage(s, 'gone', { chunks: 2 }); // new bytes: nothing of the first version is shared
    const r = await lethe(['image', 'rm', `gone@${first.version}`, '--json'], s.env);
    expect(r.code, r.stderr).to.equal(0);
    const out = JSON.parse(r.stdout) as { draftsRemoved?: number[]; chunksFreed: number };
    expect(out.draftsRemoved).to.deep.equal([draft]);
    const after = await serverDb(s);
    try {
      const rows = await after.sql.get<{ n: number }>("SELECT COUNT(*) AS n FROM chunks c JOIN images i ON i.id = c.image_id WHERE i.name = 'gone' AND c.version IN (?, ?)", first.version, draft);
      expect(rows?.n, "the version's rows and the draft's").to.equal(0);
      const v = await after.sql.get<{ state: string }>("SELECT v.state FROM versions v JOIN images i ON i.id = v.image_id WHERE i.name = 'gone' AND v.version = ?", draft);
      expect(v?.state).to.equal('removed');
      // The audit log says which drafts went with the version.
      const rm = await after.sql.get<{ data: string }>("SELECT data FROM audit WHERE type = 'image.rm' ORDER BY seq DESC LIMIT 1");
      expect(JSON.parse(rm!.data)).to.deep.include({ image: 'gone', version: first.version, drafts: [draft] });
    } finally {
      await after.close();
    }
    // Each stored chunk of the first version (2 a kind), and the one the draft stored.
    expect(out.chunksFreed).to.equal(7);
  });

  it('refuses a part numbered at or below one the draft took: the later content stands, its row and its blob', async () => {
    const { agent, home } = await agentInProcess(s, 'fenced', { chunks: 2 });
    // What the agent would send for its dirty chunks now, kept here instead (the check-in fails).
    const frames = async (): Promise<Buffer> => {
      let sent: Buffer | undefined;
      const kept = new LetheError('INTERNAL', 'kept by the test');
      expect(await rejects(agent.core.checkin({ checkin: async (_lease, f) => ((sent = f), Promise.reject(kept)) }))).to.equal(kept);
      return sent!;
    };
    let version: number;
    let newer: Buffer;
    try {
      await agent.core.write('disk', 1, randomBytes(CHUNK_SIZE.disk));
      const late = await frames(); // a request that outlives the next check-in, on another replica
      await agent.core.write('disk', 1, randomBytes(CHUNK_SIZE.disk));
      const current = await frames();
      newer = parseChunkFrames(current)[0].data;
      const leaseId = agent.lease.leaseId();
      version = await withDeviceClient(home, async (c) => {
        await c.checkin(leaseId, current, false, 2);
        for (const part of [1, 2]) {
          const e = await rejects(c.checkin(leaseId, late, false, part));
          expect(e.code, `part ${part}`).to.equal('CONFLICT');
          expect(e.message).to.equal(`check-in part ${part} came after part 2 of this lease; nothing of this request was stored`);
        }
        return (await c.checkin(leaseId, Buffer.alloc(0), true, 3)).version;
      });
    } finally {
      agent.stop();
      await agent.done.catch(() => {});
    }
    const db = await serverDb(s);
    try {
      const row = await db.sql.get<{ ct_sha256: Buffer }>("SELECT c.ct_sha256 FROM chunks c JOIN images i ON i.id = c.image_id WHERE i.name = 'fenced' AND c.version = ? AND c.kind = 'disk' AND c.idx = 1", version);
      const imageId = (await db.sql.get<{ id: string }>("SELECT id FROM images WHERE name = 'fenced'"))!.id;
      const blob = await db.store.get<{ data: Buffer }>("SELECT data FROM blobs WHERE image_id = ? AND gen = ? AND kind = 'disk' AND idx = 1", imageId, version);
      expect(Buffer.from(row!.ct_sha256).equals(sha256(newer)), 'the row names the later blob').to.equal(true);
      expect(Buffer.from(blob!.data).equals(newer), 'the store holds the later blob').to.equal(true);
    } finally {
      await db.close();
    }
  });
});
