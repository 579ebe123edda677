// Leases, key release and chunk serving (docs/escrow-protocol.md). Each of
// these commits its audit entry before anything leaves the server.
import { CHUNK_SIZE, type ChunkKind } from '../common/constants.js';
import { classOf } from '../policies/policy.js';
import type { Policy } from '../policies/schema.js';
import { AgentPolicy } from '../common/wire.js';
import type { ChunkCoord } from '../common/chunk.js';
import { b64u } from '../common/crypto.js';
import { iso } from '../common/duration.js';
import { LetheError } from '../common/errors.js';
import { inTx, newId, type Ctx } from './context.js';
import { ensureTerms, wrapNewKey } from './keyring.js';
import type { DeviceRow } from './devices.js';
import { chunkCount, chunkRows, getImage, getVersion, policyOf, readBlobs, sizeOf, versionLock, type ChunkRow } from './images.js';
import { manifest, packedManifest } from './manifests.js';
import { endLeases, mustGetDevice } from './devices.js';
import { assertSealAllowed, CeilingReached, ceilingRefused, keyCeiling, perCommittedVersion } from './device-policy.js';
import { resumeVersion } from './branches.js';

interface LeaseRow {
  id: string;
  device_id: string;
  image_id: string;
  version: number;
  created_at: number;
  expires_at: number;
  ended_at: number | null;
  write_gen: number | null;
}

export async function assign(ctx: Ctx, deviceId: string, imageName: string) {
  await mustGetDevice(ctx, deviceId);
  const img = await getImage(ctx, imageName);
  const now = ctx.now();
  await inTx(ctx, async (ctx) => {
    const r = await ctx.db.run('INSERT INTO assignments(device_id, image_id, assigned_at) VALUES (?, ?, ?) ON CONFLICT DO NOTHING', deviceId, img.id, now);
    if (r.changes === 1) await ctx.audit.append('assign', deviceId, { image: imageName }, now);
  });
  return { device: deviceId, image: imageName };
}

export async function unassign(ctx: Ctx, deviceId: string, imageName: string) {
  await mustGetDevice(ctx, deviceId);
  const img = await getImage(ctx, imageName);
  const now = ctx.now();
  await inTx(ctx, async (ctx) => {
    const r = await ctx.db.run('DELETE FROM assignments WHERE device_id = ? AND image_id = ?', deviceId, img.id);
    await endLeases(ctx, 'device_id = ? AND image_id = ?', [deviceId, img.id], now);
    if (r.changes === 1) await ctx.audit.append('unassign', deviceId, { image: imageName }, now);
  });
  return { device: deviceId, image: imageName };
}

async function isAssigned(ctx: Ctx, deviceId: string, imageId: string): Promise<boolean> {
  return (await ctx.db.get('SELECT 1 AS x FROM assignments WHERE device_id = ? AND image_id = ?', deviceId, imageId)) !== undefined;
}

async function assertAssigned(ctx: Ctx, d: DeviceRow, imageId: string, name: string): Promise<void> {
  if (!(await isAssigned(ctx, d.id, imageId))) {
    throw new LetheError('NOT_ASSIGNED', `image '${name}' is not assigned to this device`, {
      hint: `IT assigns it with 'lethe admin assign ${d.id} ${name}'`,
    });
  }
}

/** The generations a lease's version (committed) has normal chunks of. */
const normalGens = perCommittedVersion(async (ctx, imageId, version) =>
  (await ctx.db.all<{ gen: number }>("SELECT DISTINCT gen FROM chunks WHERE image_id = ? AND version = ? AND cls = 'normal' ORDER BY gen", imageId, version)).map((g) => g.gen),
);

async function classKeys(ctx: Ctx, d: DeviceRow, imageId: string, version: number) {
  const all = [...new Set([...(await normalGens(ctx, imageId, version)), version])].sort((a, b) => a - b);
  const id = Buffer.from(imageId, 'hex');
  const out: { gen: number; sealed: string }[] = [];
  for (const gen of all) {
    const v = (await ctx.db.get<{ key_wrapped: Buffer }>('SELECT key_wrapped FROM versions WHERE image_id = ? AND version = ?', imageId, gen))!;
    await ensureTerms(ctx, v.key_wrapped);
    const vk = ctx.escrow.versionKey(v.key_wrapped, id, gen);
    out.push({ gen, sealed: b64u.encode(ctx.escrow.sealedClassKey(vk, d.box_pk)) });
  }
  return out;
}

async function leaseResponse(ctx: Ctx, d: DeviceRow, l: LeaseRow, name: string, policy: Policy) {
  return {
    leaseId: l.id,
    image: name,
    imageId: l.image_id,
    version: l.version,
    expiresAt: iso(l.expires_at),
    renewAfter: iso(ctx.now() + policy.renewAfterMs),
    ttlSeconds: Math.round((l.expires_at - ctx.now()) / 1000),
    classKeys: await classKeys(ctx, d, l.image_id, l.version),
    ...(l.write_gen !== null ? { writeGen: l.write_gen } : {}),
    evictIdleSeconds: policy.evictIdleMs / 1000,
    policy: AgentPolicy.parse(policy),
  };
}


export async function grantLease(ctx: Ctx, d: DeviceRow, imageName: string) {
  const img = await getImage(ctx, imageName);
  await assertAssigned(ctx, d, img.id, imageName);
  // The shared version, or this device's own branch of it (docs/branches.md).
  const v = await resumeVersion(ctx, d.id, img);
  const policy = policyOf(img);
  assertSealAllowed(d, policy, imageName);
  const now = ctx.now();
  const lease: LeaseRow = {
    id: newId('lease'),
    device_id: d.id,
    image_id: img.id,
    version: v.version,
    created_at: now,
    expires_at: now + policy.leaseTtlMs,
    ended_at: null,
    write_gen: null,
  };
  await inTx(ctx, async (ctx) => {
    await ctx.db.run('INSERT INTO leases(id, device_id, image_id, version, created_at, expires_at) VALUES (?, ?, ?, ?, ?, ?)', lease.id, d.id, img.id, v.version, now, lease.expires_at);
    // Writes this device made under an earlier lease on the same version (not yet
    // checked in) carry over: the new lease adopts that draft.
    const draft = await ctx.db.get<{ version: number }>(
      "SELECT v.version FROM versions v JOIN leases l ON l.id = v.lease_id WHERE v.image_id = ? AND v.state = 'draft' AND l.device_id = ? AND l.version = ?",
      img.id,
      d.id,
      v.version,
    );
    if (draft) {
      // The new lease's agent numbers its check-in parts from 1 again.
      await ctx.db.run('UPDATE versions SET lease_id = ?, checkin_part = 0 WHERE image_id = ? AND version = ?', lease.id, img.id, draft.version);
      await ctx.db.run('UPDATE leases SET write_gen = ? WHERE id = ?', draft.version, lease.id);
      lease.write_gen = draft.version;
    }
    await ctx.audit.append('lease.grant', d.id, { lease: lease.id, image: imageName, version: v.version, expiresAt: iso(lease.expires_at) }, now);
  });
  ctx.metrics.inc('lethe_leases_granted_total');
  return leaseResponse(ctx, d, lease, imageName, policy);
}

/**
 * The device's lease if it is live; throws UNKNOWN_LEASE, NOT_ASSIGNED (the
 * image was unassigned since: audited as `lease.refused`, the device ends the
 * lease at this answer) or LEASE_EXPIRED otherwise.
 */
/** A lease as liveLease finds it, with its image's name and stored policy. */
type LiveLease = LeaseRow & { name: string; image_policy: string | null };

export async function liveLease(ctx: Ctx, d: DeviceRow, leaseId: string): Promise<LiveLease> {
  const l = await ctx.db.get<LiveLease & { assigned: number | null }>(
    `SELECT l.*, i.name, i.policy AS image_policy, (SELECT 1 FROM assignments a WHERE a.device_id = l.device_id AND a.image_id = l.image_id) AS assigned
       FROM leases l JOIN images i ON i.id = l.image_id WHERE l.id = ? AND l.device_id = ?`,
    leaseId,
    d.id,
  );
  if (!l) throw new LetheError('UNKNOWN_LEASE', `no lease '${leaseId}' for this device`);
  if (l.assigned === null) {
    const now = ctx.now();
    await ctx.audit.append('lease.refused', d.id, { lease: l.id, image: l.name, version: l.version, code: 'NOT_ASSIGNED' }, now);
    throw new LetheError('NOT_ASSIGNED', `image '${l.name}' is no longer assigned to this device: lease '${leaseId}' has ended`, {
      hint: `drop its keys; IT assigns it again with 'lethe admin assign ${d.id} ${l.name}'`,
    });
  }
  if (l.ended_at !== null || l.expires_at <= ctx.now()) {
    throw new LetheError('LEASE_EXPIRED', `lease '${leaseId}' has ended`, { hint: 'ask for a new lease' });
  }
  return l;
}

export async function renewLease(ctx: Ctx, d: DeviceRow, leaseId: string) {
  const l = await liveLease(ctx, d, leaseId);
  const img = await getImage(ctx, l.name);
  await assertAssigned(ctx, d, img.id, l.name);
  const policy = policyOf(img);
  assertSealAllowed(d, policy, l.name);
  const now = ctx.now();
  l.expires_at = now + policy.leaseTtlMs;
  await inTx(ctx, async (ctx) => {
    // Not past an end another request (a revoke, an unassignment, a check-in) gave it meanwhile.
    const r = await ctx.db.run('UPDATE leases SET expires_at = ? WHERE id = ? AND ended_at IS NULL', l.expires_at, l.id);
    if (r.changes !== 1) throw new LetheError('LEASE_EXPIRED', `lease '${leaseId}' has ended`, { hint: 'ask for a new lease' });
    await ctx.audit.append('lease.renew', d.id, { lease: l.id, image: l.name, version: l.version, expiresAt: iso(l.expires_at) }, now);
  });
  return leaseResponse(ctx, d, l, l.name, policy);
}

export async function leaseManifest(ctx: Ctx, d: DeviceRow, leaseId: string) {
  const l = await liveLease(ctx, d, leaseId);
  const img = await getImage(ctx, l.name);
  return manifest(ctx, img, await getVersion(ctx, img, l.version));
}

/** The lease's manifest in format 2 (common/manifest.ts), as agents ask for it. */
export async function leaseManifestPacked(ctx: Ctx, d: DeviceRow, leaseId: string): Promise<Buffer> {
  const l = await liveLease(ctx, d, leaseId);
  const img = await getImage(ctx, l.name);
  return packedManifest(ctx, img, await getVersion(ctx, img, l.version));
}

/** Compresses chunk lists for the audit log: {"mem": [[0, 63], [70, 70]]}. */
export function ranges(refs: { kind: ChunkKind; index: number }[]): Record<string, [number, number][]> {
  const out: Record<string, [number, number][]> = {};
  const byKind = new Map<string, number[]>();
  for (const r of refs) (byKind.get(r.kind) ?? byKind.set(r.kind, []).get(r.kind)!).push(r.index);
  for (const [kind, idx] of byKind) {
    idx.sort((a, b) => a - b);
    const rs: [number, number][] = [];
    for (const i of idx) {
      const last = rs[rs.length - 1];
      if (last && i <= last[1] + 1) last[1] = Math.max(last[1], i);
      else rs.push([i, i]);
    }
    out[kind] = rs;
  }
  return out;
}

async function resolve(ctx: Ctx, l: LeaseRow, refs: { kind: ChunkKind; index: number }[]): Promise<ChunkRow[]> {
  const rows = await chunkRows(ctx, l.image_id, l.version, refs);
  return refs.map((r, i) => {
    const row = rows[i];
    if (!row) {
      throw new LetheError('UNKNOWN_CHUNK', `${r.kind} chunk ${r.index} is not stored (a zero chunk, or past the end)`, {
        hint: 'zero chunks are not stored: the manifest lists every stored chunk',
      });
    }
    return row;
  });
}

/**
 * The generation a lease's device-written chunks are encrypted for: a draft
 * version made for this lease on its first write, committed by check-in.
 */
async function writeGen(ctx: Ctx, l: LeaseRow & { name: string }): Promise<number> {
  if (l.write_gen !== null) return l.write_gen;
  const img = await getImage(ctx, l.name);
  const base = await getVersion(ctx, img, l.version);
  const imageId = Buffer.from(img.id, 'hex');
  return inTx(ctx, async (ctx) => {
    // Version numbers of an image are handed out one at a time, whichever replica asks.
    await ctx.db.lock(versionLock(img.id));
    // Another request of the same lease (on any replica) may have made the draft meanwhile.
    const stored = await ctx.db.get<{ write_gen: number | null }>('SELECT write_gen FROM leases WHERE id = ?', l.id);
    if (stored?.write_gen != null) return (l.write_gen = stored.write_gen);
    const last = (await ctx.db.get<{ v: number }>('SELECT MAX(version) AS v FROM versions WHERE image_id = ?', img.id))!;
    const gen = last.v + 1;
    await ctx.db.run(
      "INSERT INTO versions(image_id, version, state, created_at, key_wrapped, disk_size, mem_size, state_size, lease_id, device_id, base) VALUES (?, ?, 'draft', ?, ?, ?, ?, ?, ?, ?, ?)",
      img.id,
      gen,
      ctx.now(),
      await wrapNewKey(ctx, imageId, gen, 'version'),
      base.disk_size,
      base.mem_size,
      base.state_size,
      l.id,
      l.device_id,
      l.version,
    );
    await ctx.db.run('UPDATE leases SET write_gen = ? WHERE id = ?', gen, l.id);
    return (l.write_gen = gen);
  });
}

/**
 * For writes: the coordinates new device-written content of each chunk gets —
 * generation = the lease's write generation, class = the stored chunk's, or
 * the policy's for a chunk that is zero so far.
 */
export async function writeCoords(ctx: Ctx, l: LeaseRow & { name: string }, refs: { kind: ChunkKind; index: number }[]): Promise<ChunkRow[]> {
  const img = await getImage(ctx, l.name);
  const policy = policyOf(img);
  const gen = await writeGen(ctx, l);
  // Bounds are the draft's: a suspend gives it a new state size.
  const draft = await getVersion(ctx, img, gen);
  const base = await getVersion(ctx, img, l.version);
  for (const r of refs) {
    const count = chunkCount(sizeOf(draft, r.kind), r.kind);
    if (r.index >= count) {
      throw new LetheError('UNKNOWN_CHUNK', `${r.kind} chunk ${r.index} is past the end (the ${r.kind} has ${count} chunks)`);
    }
  }
  const storedRows = await chunkRows(ctx, l.image_id, l.version, refs);
  return refs.map((r, i) => {
    const replaced = r.kind === 'state' && draft.state_size !== base.state_size;
    const stored = replaced ? undefined : storedRows[i];
    const cls = stored?.cls ?? classOf(policy, r.kind, r.index * CHUNK_SIZE[r.kind], CHUNK_SIZE[r.kind]);
    return { kind: r.kind, idx: r.index, gen, cls, ct_sha256: Buffer.alloc(0) };
  });
}

/**
 * Gives the lease's draft a new device-state size (a suspend writes a whole new
 * state); the draft's state then replaces the base's at check-in.
 */
async function setDraftStateSize(ctx: Ctx, l: LeaseRow & { name: string }, size: number): Promise<void> {
  const gen = await writeGen(ctx, l);
  await ctx.db.run('UPDATE versions SET state_size = ? WHERE image_id = ? AND version = ?', size, l.image_id, gen);
  // State chunks an earlier part of a check-in staged past the new end (a larger state, written before) would be committed past it.
  await ctx.db.run("DELETE FROM chunks WHERE image_id = ? AND version = ? AND kind = 'state' AND idx >= ?", l.image_id, gen, chunkCount(size, 'state'));
}

/** Committed versions' wrapped keys kept by wrappedVersionKeys, at most. */
const WRAPPED_KEYS_MAX = 4096;
const committedWrapped = new Map<string, Buffer>();

/**
 * The wrapped keys of an image's versions `gens`. A committed version's key no
 * longer changes but for a rotation's rewrap (the same key, wrapped under a new
 * term), so this process keeps them: one whose term the escrow no longer holds is
 * read again. A draft's are always read: a discarded draft's number can come
 * back with a new key.
 */
async function wrappedVersionKeys(ctx: Ctx, imageId: string, gens: number[]): Promise<Map<number, Buffer>> {
  const out = new Map<number, Buffer>();
  const missing: number[] = [];
  for (const gen of gens) {
    const hit = committedWrapped.get(`${imageId}/${gen}`);
    if (hit && ctx.escrow.hasTerms(hit)) out.set(gen, hit);
    else missing.push(gen);
  }
  if (missing.length === 0) return out;
  for (const w of await ctx.db.all<{ version: number; key_wrapped: Buffer; state: string }>(
    `SELECT version, key_wrapped, state FROM versions WHERE image_id = ? AND version IN (${missing.map(() => '?').join(', ')})`,
    imageId,
    ...missing,
  )) {
    out.set(w.version, w.key_wrapped);
    if (w.state !== 'committed') continue;
    if (committedWrapped.size >= WRAPPED_KEYS_MAX) committedWrapped.delete(committedWrapped.keys().next().value!);
    committedWrapped.set(`${imageId}/${w.version}`, w.key_wrapped);
  }
  return out;
}

/** Releases chunk keys, sealed together to the device; audited first. */
export async function releaseKeys(
  ctx: Ctx,
  d: DeviceRow,
  leaseId: string,
  refs: { kind: ChunkKind; index: number }[],
  write = false,
  stateSize?: number,
) {
  const l = await liveLease(ctx, d, leaseId);
  if (stateSize !== undefined && !write) throw new LetheError('BAD_REQUEST', 'stateSize is for write keys only (write: true)');
  const now = ctx.now();
  const entry = (rows: ChunkRow[]) => ({
    lease: l.id,
    image: l.name,
    version: l.version,
    count: rows.length,
    sensitive: rows.filter((r) => r.cls === 'sensitive').length,
    chunks: ranges(refs),
    ...(write ? { write } : {}),
    ...(stateSize !== undefined ? { stateSize } : {}),
  });
  // Past its key ceiling the device gets nothing: the transaction rolls back, and the
  // alarm, not a release, is audited. A draft's new state size stands or falls with
  // the entry that records it, in one transaction; any other entry goes by group
  // commit with other requests' once the transaction is done. No key leaves before
  // its entry is committed, and that commit's flush carries the transaction's (the
  // ceiling's marks, a new draft): so the transaction need not wait for its own.
  const rows = await inTx(ctx, async (ctx) => {
    if (stateSize !== undefined) await setDraftStateSize(ctx, l, stateSize);
    const rows = write ? await writeCoords(ctx, l, refs) : await resolve(ctx, l, refs);
    if (!write) await keyCeiling(ctx, d, l, rows, now);
    if (stateSize !== undefined) await ctx.audit.append('keys.release', d.id, entry(rows), now);
    return rows;
  }, { durable: stateSize !== undefined }).catch((e) => {
    if (e instanceof CeilingReached) return e;
    throw e;
  });
  if (rows instanceof CeilingReached) throw await ceilingRefused(ctx, d, l, rows, now);
  if (stateSize === undefined) await ctx.audit.commit('keys.release', d.id, entry(rows), now);
  const id = Buffer.from(l.image_id, 'hex');
  const coords = rows.map((r): ChunkCoord => ({ imageId: id, gen: r.gen, kind: r.kind, index: r.idx, cls: r.cls }));
  // One lookup per generation per request. Safe while a request touches fewer
  // generations than the escrow caches (256): no key used here can be evicted
  // (and wiped) before the request is done; past that, look up per key.
  const gens = [...new Set(rows.map((r) => r.gen))];
  const wrapped = await wrappedVersionKeys(ctx, l.image_id, gens);
  await ensureTerms(ctx, ...wrapped.values());
  const memo = new Map<number, Uint8Array>();
  const lookup = (gen: number) => ctx.escrow.versionKey(wrapped.get(gen)!, id, gen);
  const versionKeyOf =
    gens.length <= 64
      ? (gen: number) => memo.get(gen) ?? memo.set(gen, lookup(gen)).get(gen)!
      : lookup;
  const sealed = ctx.escrow.sealedChunkKeys(coords, versionKeyOf, d.box_pk);
  ctx.metrics.inc('lethe_keys_released_total', {}, rows.length);
  return {
    sealed: b64u.encode(sealed),
    chunks: rows.map((r) => ({ kind: r.kind, index: r.idx, gen: r.gen, cls: r.cls })),
  };
}

/** Ciphertext of chunks, audited first; the device decrypts with keys it holds. */
export async function serveChunks(ctx: Ctx, d: DeviceRow, leaseId: string, refs: { kind: ChunkKind; index: number }[]) {
  const l = await liveLease(ctx, d, leaseId);
  const rows = await resolve(ctx, l, refs);
  const blobs = await readBlobs(ctx, l.image_id, rows);
  const bytes = blobs.reduce((n, b) => n + b.length, 0);
  await ctx.audit.commit(
    'chunks.serve',
    d.id,
    { lease: l.id, image: l.name, version: l.version, count: rows.length, bytes, chunks: ranges(refs) },
    ctx.now(),
  );
  ctx.metrics.inc('lethe_chunks_served_total', {}, rows.length);
  ctx.metrics.inc('lethe_chunk_bytes_served_total', {}, bytes);
  return rows.map((r, i) => ({ row: r, blob: blobs[i] }));
}
