// A device's check-in: its written chunks become a new version (docs/branches.md), and at
// size the base's rows come over a page at a time (docs/fleet.md, "Check-ins at size").
import { CHUNK_SIZE, KEY_BYTES, type ChunkKind } from '../common/constants.js';
import { decryptChunkInto, isZero } from '../common/chunk.js';
import { keyedHash, secureBuffer, sha256, wipe } from '../common/crypto.js';
import { crashPoint } from '../common/crash-point.js';
import { LetheError } from '../common/errors.js';
import { inTx, type Ctx } from './context.js';
import type { Sql } from './db.js';
import { ensureTerms } from './keyring.js';
import type { DeviceRow } from './devices.js';
import { PUT_BLOB, PUT_CHUNK_ROW, getImage, getVersion, policyOf, sizeOf } from './images.js';
import { makeShared, resumeVersion } from './branches.js';
import { liveLease, writeCoords } from './leases.js';

/** The base's rows into a draft (the version, then the base's image and version), with more conditions to follow. */
const CARRY_ROWS =
  'INSERT INTO chunks(image_id, version, kind, idx, gen, cls, ct_sha256, dedup_hash) SELECT image_id, CAST(? AS INTEGER), kind, idx, gen, cls, ct_sha256, dedup_hash FROM chunks WHERE image_id = ? AND version = ?';
/** Indexes of one kind that carryOver copies in one statement. */
export const CARRY_PAGE = 16_384;

/**
 * Copies the rows of the base's disk and guest RAM that the draft has not staged into
 * the draft, CARRY_PAGE indexes at a time, each page its own transaction, with other
 * requests let in between: in the commit, one statement copying all of them held a
 * SQLite server's only connection, and so every request, for 4.4 s at 200 GiB. A row
 * copied here is the base's own (a committed version's rows never change, and a draft
 * keeps its base: a new lease adopts it only on the same version), and a row the
 * device stages later replaces it (PUT_CHUNK_ROW), so a commit that fails after this
 * leaves a draft that commits the same. Not durable by itself: the commit's flush
 * carries it. The state, which a suspend replaces whole, comes over in the commit.
 */
async function carryOver(ctx: Ctx, imageId: string, base: number, gen: number): Promise<void> {
  for (const kind of ['disk', 'mem'] as const) {
    const top = (await ctx.db.get<{ n: number | null }>('SELECT MAX(idx) AS n FROM chunks WHERE image_id = ? AND version = ? AND kind = ?', imageId, base, kind))?.n;
    for (let lo = 0; top != null && lo <= top; lo += CARRY_PAGE) {
      const page = `${CARRY_ROWS} AND kind = ? AND idx >= CAST(? AS INTEGER) AND idx < CAST(? AS INTEGER) ON CONFLICT DO NOTHING`;
      await ctx.db.tx((t) => t.run(page, gen, imageId, base, kind, lo, lo + CARRY_PAGE), { durable: false });
      // SQLite answers at once, in the same turn: let other requests in between pages.
      await new Promise((r) => setImmediate(r));
    }
  }
}

/**
 * Check-in: the device's dirty chunks (encrypted on the device under write
 * keys) become a new version, a branch only this device resumes until an admin
 * promotes it (or at once under a `users: single` policy; docs/branches.md).
 * Each blob must decrypt under the key the server derives for its coordinates
 * before anything of its request is stored. A device sends its chunks in one or
 * more requests; the one marked `final` carries unchanged chunks over from the
 * lease's version (which must still be the one this device resumes) and commits.
 */
export function checkin(ctx: Ctx, d: DeviceRow, leaseId: string, items: { kind: ChunkKind; index: number; data: Buffer }[], final: boolean, part?: number) {
  // One request of a lease's check-in at a time in this process: the last part reads what
  // the draft staged before its commit, and a part staged in between would be missed.
  const turn = (checkinTurns.get(leaseId) ?? Promise.resolve()).then(() => checkinNow(ctx, d, leaseId, items, final, part));
  const settled = turn.then(
    () => undefined,
    () => undefined,
  );
  checkinTurns.set(leaseId, settled);
  void settled.then(() => checkinTurns.get(leaseId) === settled && checkinTurns.delete(leaseId));
  return turn;
}

/** The check-in request of each lease that the next one waits for. */
const checkinTurns = new Map<string, Promise<void>>();

/** The draft this part writes into, and the part's number, if the device gave one. */
type PartOf = { imageId: string; name: string; gen: number; leaseId: string; part?: number };

/**
 * First in each transaction that writes a part's blobs or rows: the draft is still its
 * lease's, and (for a numbered part) holds this part's number. A device numbers the parts
 * of a lease's check-ins, rising, and the draft keeps the highest it took: the part's
 * first transaction (`take`) raises it to the part's own, and is refused if the draft
 * took that number or a later one; the others find it still there. Turns keep a lease's
 * requests in order within one server; this keeps them in order across replicas, where a
 * request a balancer gave up on may still run on one while the device's next check-in
 * goes to another, and would otherwise put older content over newer. The update locks
 * the version's row, so a later part taking its number waits for this transaction, or
 * this one finds it taken. A part without a number (an agent from before) is only checked
 * to be its lease's draft's.
 */
async function holdPart(db: Sql, p: PartOf, take: boolean): Promise<void> {
  const numbered = p.part === undefined ? '' : take ? ' AND checkin_part < ?' : ' AND checkin_part = ?';
  const r = await db.run(
    `UPDATE versions SET checkin_part = ${take && p.part !== undefined ? '?' : 'checkin_part'} WHERE image_id = ? AND version = ? AND state = 'draft' AND (lease_id = ? OR lease_id IS NULL)${numbered}`,
    ...(take && p.part !== undefined ? [p.part] : []),
    p.imageId,
    p.gen,
    p.leaseId,
    ...(p.part === undefined ? [] : [p.part]),
  );
  if (r.changes === 1) return;
  const v = await db.get<{ state: string; lease_id: string | null; n: number }>('SELECT state, lease_id, checkin_part AS n FROM versions WHERE image_id = ? AND version = ?', p.imageId, p.gen);
  if (v && v.state === 'draft' && (v.lease_id === p.leaseId || v.lease_id === null)) {
    throw new LetheError('CONFLICT', `check-in part ${p.part} came after part ${Number(v.n)} of this lease; nothing of this request was stored`, {
      hint: 'a request that outlived a later one; the later one stands',
    });
  }
  // A newer lease of this device adopted the draft (a last part's copy takes seconds at size): it is that lease's to commit.
  throw new LetheError('CONFLICT', `version ${p.gen} of ${p.name} is no longer this lease's draft; nothing of this request was stored`);
}

async function checkinNow(ctx: Ctx, d: DeviceRow, leaseId: string, items: { kind: ChunkKind; index: number; data: Buffer }[], final: boolean, part?: number) {
  const l = await liveLease(ctx, d, leaseId);
  if (l.write_gen === null) throw new LetheError('BAD_REQUEST', 'nothing to check in: this lease wrote no chunks');
  const img = await getImage(ctx, l.name);
  const resumes = (await resumeVersion(ctx, d.id, img)).version;
  if (resumes !== l.version) {
    throw new LetheError('CONFLICT', `${l.name} moved on to version ${resumes} since this lease (on ${l.version}) began`, {
      hint: 'the writes stay in the device cache; IT decides which version wins',
    });
  }
  const gen = l.write_gen;
  const draft = await getVersion(ctx, img, gen);
  const imageId = Buffer.from(img.id, 'hex');
  const coords = await writeCoords(ctx, l, items);
  await ensureTerms(ctx, draft.key_wrapped, img.dedup_key_wrapped);
  const vk = ctx.escrow.versionKey(draft.key_wrapped, imageId, gen);
  const dedupKey = ctx.escrow.dedupKey(img.dedup_key_wrapped, imageId);
  const key = secureBuffer(KEY_BYTES);
  const rows: { kind: ChunkKind; idx: number; cls: string; blob: Buffer; dedup: Buffer | null }[] = [];
  try {
    items.forEach((it, i) => {
      const c = coords[i];
      const coord = { imageId, gen, kind: c.kind, index: c.idx, cls: c.cls };
      ctx.escrow.chunkKeyInto(key, vk, coord);
      const plain = Buffer.alloc(Math.min(CHUNK_SIZE[c.kind], sizeOf(draft, c.kind) - c.idx * CHUNK_SIZE[c.kind]));
      try {
        decryptChunkInto(plain, key, coord, it.data);
      } catch {
        throw new LetheError('TAMPERED', `checked-in ${c.kind} chunk ${c.idx} does not decrypt under its key; nothing of this request was accepted`);
      }
      rows.push({ kind: c.kind, idx: c.idx, cls: c.cls, blob: it.data, dedup: isZero(plain) ? null : keyedHash(dedupKey, plain) });
      wipe(plain);
    });
  } finally {
    wipe(key);
  }
  const mine: PartOf = { imageId: img.id, name: l.name, gen, leaseId: l.id, part };
  // On PostgreSQL the blobs share the database, and the part is taken in their transaction.
  // A SQLite server's blobs are in a file of their own: it takes the part before them (it is
  // one process, whose turns keep a lease's requests in order).
  const shared = ctx.store === ctx.db;
  if (!shared) await holdPart(ctx.db, mine, true);
  await ctx.store.tx(async (t) => {
    if (shared) await holdPart(t, mine, true);
    for (const r of rows) if (r.dedup) await t.run(PUT_BLOB, img.id, gen, r.kind, r.idx, r.blob);
  });
  crashPoint('checkin.blobs-stored');
  // The rows the draft staged, read while it holds only those (a failed commit may have
  // carried rows over already, which gen tells apart): once carryOver is done, a query for
  // them would read every row of the disk. Each says whether it is a tombstone.
  const own = new Map<string, boolean>();
  if (final) {
    const staged = await ctx.db.all<{ kind: ChunkKind; idx: number; n: number }>('SELECT kind, idx, LENGTH(ct_sha256) AS n FROM chunks WHERE image_id = ? AND version = ? AND gen = ?', img.id, gen, gen);
    for (const r of staged) own.set(`${r.kind}/${r.idx}`, Number(r.n) === 0);
    await carryOver(ctx, img.id, l.version, gen);
    crashPoint('checkin.carried-over');
  }
  const now = ctx.now();
  const single = policyOf(img).imageUsers === 'single';
  await inTx(ctx, async (ctx) => {
    await holdPart(ctx.db, mine, false);
    // Staged rows of the draft; a zero chunk is staged as a tombstone (empty hash).
    for (const r of rows) {
      await ctx.db.run(PUT_CHUNK_ROW, img.id, gen, r.kind, r.idx, gen, r.cls, r.dedup ? sha256(r.blob) : Buffer.alloc(0), r.dedup ?? Buffer.alloc(0));
      if (final) own.set(`${r.kind}/${r.idx}`, !r.dedup);
    }
    if (!final) return;
    // A draft with its own state size replaced the state whole: none of the base's carries over.
    const base = await getVersion(ctx, img, l.version);
    let keepState = draft.state_size === base.state_size ? 1 : 0;
    const newState = await ctx.db.get<{ n: number }>("SELECT COUNT(*) AS n FROM chunks WHERE image_id = ? AND version = ? AND kind = 'state'", img.id, gen);
    if (!keepState && newState!.n === 0) {
      // The draft got a new state size, but none of that state came: the device's suspend ended (a
      // crash, say) before it wrote the state. The base's stays, at its size.
      await ctx.db.run('UPDATE versions SET state_size = ? WHERE image_id = ? AND version = ?', base.state_size, img.id, gen);
      keepState = 1;
    }
    // The disk and guest RAM came over before (carryOver); the state comes now, if it stays.
    if (keepState) await ctx.db.run(`${CARRY_ROWS} AND kind = 'state' ON CONFLICT DO NOTHING`, gen, img.id, l.version);
    // The tombstones go, one by one (a statement that looked for them would read every row),
    // and only as tombstones: a row since staged with content stays, and counts.
    let staged = 0;
    for (const [k, tombstone] of own) {
      const [kind, idx] = k.split('/');
      const gone = tombstone && (await ctx.db.run('DELETE FROM chunks WHERE image_id = ? AND version = ? AND kind = ? AND idx = ? AND LENGTH(ct_sha256) = 0', img.id, gen, kind, Number(idx))).changes > 0;
      if (!gone) staged++;
    }
    // A branch of this device on the lease's version (a draft made by an older server has neither set).
    // holdPart, first in this transaction, found the draft still this lease's, and holds its row.
    await ctx.db.run("UPDATE versions SET state = 'committed', committed_at = ?, lease_id = NULL, device_id = ?, base = ? WHERE image_id = ? AND version = ?", now, d.id, l.version, img.id, gen);
    await ctx.db.run('UPDATE leases SET ended_at = ? WHERE id = ?', now, l.id);
    await ctx.audit.append('checkin', d.id, { lease: l.id, image: l.name, base: l.version, version: gen, stored: staged }, now);
    if (single) await makeShared(ctx, img, gen, d.id, l.version, now, true);
  });
  return { image: l.name, version: gen, chunks: rows.length, committed: final, ...(final ? { shared: single } : {}) };
}
