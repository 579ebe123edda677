// Leases, key release and chunk serving (docs/escrow-protocol.md). Each of
// these commits its audit entry before anything leaves the server.
import { CHUNK_SIZE, KEY_BYTES, type ChunkKind } from '../common/constants.js';
import { classOf } from '../policies/policy.js';
import type { Policy } from '../policies/schema.js';
import { AgentPolicy } from '../common/wire.js';
import { decryptChunkInto, isZero, type ChunkCoord } from '../common/chunk.js';
import { b64u, keyedHash, secureBuffer, sha256, wipe } from '../common/crypto.js';
import { iso } from '../common/duration.js';
import { LetheError } from '../common/errors.js';
import { newId, type Ctx } from './context.js';
import type { DeviceRow } from './devices.js';
import { chunkCount, chunkRow, getImage, getVersion, manifest, policyOf, readBlob, sizeOf, type ChunkRow } from './images.js';
import { mustGetDevice } from './devices.js';
import { assertSealAllowed, keyCeiling } from './device-policy.js';
import { makeShared, resumeVersion } from './branches.js';
import { q } from './db.js';

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

export function assign(ctx: Ctx, deviceId: string, imageName: string) {
  mustGetDevice(ctx, deviceId);
  const img = getImage(ctx, imageName);
  const now = ctx.now();
  ctx.db.transaction(() => {
    const r = q(ctx.db, 'INSERT OR IGNORE INTO assignments(device_id, image_id, assigned_at) VALUES (?, ?, ?)')
      .run(deviceId, img.id, now);
    if (r.changes === 1) ctx.audit.append('assign', deviceId, { image: imageName }, now);
  })();
  return { device: deviceId, image: imageName };
}

export function unassign(ctx: Ctx, deviceId: string, imageName: string) {
  mustGetDevice(ctx, deviceId);
  const img = getImage(ctx, imageName);
  const now = ctx.now();
  ctx.db.transaction(() => {
    const r = q(ctx.db, 'DELETE FROM assignments WHERE device_id = ? AND image_id = ?').run(deviceId, img.id);
    q(ctx.db, 'UPDATE leases SET ended_at = ? WHERE device_id = ? AND image_id = ? AND ended_at IS NULL')
      .run(now, deviceId, img.id);
    if (r.changes === 1) ctx.audit.append('unassign', deviceId, { image: imageName }, now);
  })();
  return { device: deviceId, image: imageName };
}

function assertAssigned(ctx: Ctx, d: DeviceRow, imageId: string, name: string): void {
  if (!q(ctx.db, 'SELECT 1 FROM assignments WHERE device_id = ? AND image_id = ?').get(d.id, imageId)) {
    throw new LetheError('NOT_ASSIGNED', `image '${name}' is not assigned to this device`, {
      hint: `IT assigns it with 'lethe admin assign ${d.id} ${name}'`,
    });
  }
}

function classKeys(ctx: Ctx, d: DeviceRow, imageId: string, version: number) {
  const gens = q(ctx.db, "SELECT DISTINCT gen FROM chunks WHERE image_id = ? AND version = ? AND cls = 'normal' ORDER BY gen")
    .all(imageId, version) as { gen: number }[];
  const all = new Set([...gens.map((g) => g.gen), version]);
  const id = Buffer.from(imageId, 'hex');
  return [...all].sort((a, b) => a - b).map((gen) => {
    const v = q(ctx.db, 'SELECT key_wrapped FROM versions WHERE image_id = ? AND version = ?').get(imageId, gen) as {
      key_wrapped: Buffer;
    };
    const vk = ctx.escrow.versionKey(v.key_wrapped, id, gen);
    return { gen, sealed: b64u.encode(ctx.escrow.sealedClassKey(vk, d.box_pk)) };
  });
}

function leaseResponse(ctx: Ctx, d: DeviceRow, l: LeaseRow, name: string, policy: Policy) {
  return {
    leaseId: l.id,
    image: name,
    imageId: l.image_id,
    version: l.version,
    expiresAt: iso(l.expires_at),
    renewAfter: iso(ctx.now() + policy.renewAfterMs),
    ttlSeconds: Math.round((l.expires_at - ctx.now()) / 1000),
    classKeys: classKeys(ctx, d, l.image_id, l.version),
    ...(l.write_gen !== null ? { writeGen: l.write_gen } : {}),
    evictIdleSeconds: policy.evictIdleMs / 1000,
    policy: AgentPolicy.parse(policy),
  };
}


export function grantLease(ctx: Ctx, d: DeviceRow, imageName: string) {
  const img = getImage(ctx, imageName);
  assertAssigned(ctx, d, img.id, imageName);
  // The shared version, or this device's own branch of it (docs/branches.md).
  const v = resumeVersion(ctx, d.id, img);
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
  ctx.db.transaction(() => {
    q(ctx.db, 'INSERT INTO leases(id, device_id, image_id, version, created_at, expires_at) VALUES (?, ?, ?, ?, ?, ?)')
      .run(lease.id, d.id, img.id, v.version, now, lease.expires_at);
    // Writes this device made under an earlier lease on the same version (not yet
    // checked in) carry over: the new lease adopts that draft.
    const draft = q(ctx.db, 
        "SELECT v.version FROM versions v JOIN leases l ON l.id = v.lease_id WHERE v.image_id = ? AND v.state = 'draft' AND l.device_id = ? AND l.version = ?",
      )
      .get(img.id, d.id, v.version) as { version: number } | undefined;
    if (draft) {
      q(ctx.db, 'UPDATE versions SET lease_id = ? WHERE image_id = ? AND version = ?').run(lease.id, img.id, draft.version);
      q(ctx.db, 'UPDATE leases SET write_gen = ? WHERE id = ?').run(draft.version, lease.id);
      lease.write_gen = draft.version;
    }
    ctx.audit.append('lease.grant', d.id, { lease: lease.id, image: imageName, version: v.version, expiresAt: iso(lease.expires_at) }, now);
  })();
  ctx.metrics.inc('lethe_leases_granted_total');
  return leaseResponse(ctx, d, lease, imageName, policy);
}

/**
 * The device's lease if it is live; throws UNKNOWN_LEASE, NOT_ASSIGNED (the
 * image was unassigned since: audited as `lease.refused`, the device ends the
 * lease at this answer) or LEASE_EXPIRED otherwise.
 */
export function liveLease(ctx: Ctx, d: DeviceRow, leaseId: string): LeaseRow & { name: string } {
  const l = q(ctx.db, 'SELECT l.*, i.name FROM leases l JOIN images i ON i.id = l.image_id WHERE l.id = ? AND l.device_id = ?')
    .get(leaseId, d.id) as (LeaseRow & { name: string }) | undefined;
  if (!l) throw new LetheError('UNKNOWN_LEASE', `no lease '${leaseId}' for this device`);
  if (!q(ctx.db, 'SELECT 1 FROM assignments WHERE device_id = ? AND image_id = ?').get(d.id, l.image_id)) {
    const now = ctx.now();
    ctx.db.transaction(() => ctx.audit.append('lease.refused', d.id, { lease: l.id, image: l.name, version: l.version, code: 'NOT_ASSIGNED' }, now))();
    throw new LetheError('NOT_ASSIGNED', `image '${l.name}' is no longer assigned to this device: lease '${leaseId}' has ended`, {
      hint: `drop its keys; IT assigns it again with 'lethe admin assign ${d.id} ${l.name}'`,
    });
  }
  if (l.ended_at !== null || l.expires_at <= ctx.now()) {
    throw new LetheError('LEASE_EXPIRED', `lease '${leaseId}' has ended`, { hint: 'ask for a new lease' });
  }
  return l;
}

export function renewLease(ctx: Ctx, d: DeviceRow, leaseId: string) {
  const l = liveLease(ctx, d, leaseId);
  const img = getImage(ctx, l.name);
  assertAssigned(ctx, d, img.id, l.name);
  const policy = policyOf(img);
  assertSealAllowed(d, policy, l.name);
  const now = ctx.now();
  l.expires_at = now + policy.leaseTtlMs;
  ctx.db.transaction(() => {
    q(ctx.db, 'UPDATE leases SET expires_at = ? WHERE id = ?').run(l.expires_at, l.id);
    ctx.audit.append('lease.renew', d.id, { lease: l.id, image: l.name, version: l.version, expiresAt: iso(l.expires_at) }, now);
  })();
  return leaseResponse(ctx, d, l, l.name, policy);
}

export function leaseManifest(ctx: Ctx, d: DeviceRow, leaseId: string) {
  const l = liveLease(ctx, d, leaseId);
  const img = getImage(ctx, l.name);
  return manifest(ctx, img, getVersion(ctx, img, l.version));
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

function resolve(ctx: Ctx, l: LeaseRow, refs: { kind: ChunkKind; index: number }[]): ChunkRow[] {
  return refs.map((r) => {
    const row = chunkRow(ctx, l.image_id, l.version, r.kind, r.index);
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
function writeGen(ctx: Ctx, l: LeaseRow & { name: string }): number {
  if (l.write_gen !== null) return l.write_gen;
  const img = getImage(ctx, l.name);
  const base = getVersion(ctx, img, l.version);
  const imageId = Buffer.from(img.id, 'hex');
  ctx.db.transaction(() => {
    const last = q(ctx.db, 'SELECT MAX(version) AS v FROM versions WHERE image_id = ?').get(img.id) as { v: number };
    const gen = last.v + 1;
    q(ctx.db, 
        "INSERT INTO versions(image_id, version, state, created_at, key_wrapped, disk_size, mem_size, state_size, lease_id, device_id, base) VALUES (?, ?, 'draft', ?, ?, ?, ?, ?, ?, ?, ?)",
      )
      .run(img.id, gen, ctx.now(), ctx.escrow.newWrappedKey(imageId, gen, 'version'), base.disk_size, base.mem_size, base.state_size, l.id, l.device_id, l.version);
    q(ctx.db, 'UPDATE leases SET write_gen = ? WHERE id = ?').run(gen, l.id);
    l.write_gen = gen;
  })();
  return l.write_gen!;
}

/**
 * For writes: the coordinates new device-written content of each chunk gets —
 * generation = the lease's write generation, class = the stored chunk's, or
 * the policy's for a chunk that is zero so far.
 */
function writeCoords(ctx: Ctx, l: LeaseRow & { name: string }, refs: { kind: ChunkKind; index: number }[]): ChunkRow[] {
  const img = getImage(ctx, l.name);
  const policy = policyOf(img);
  const gen = writeGen(ctx, l);
  // Bounds are the draft's: a suspend gives it a new state size.
  const draft = getVersion(ctx, img, gen);
  const base = getVersion(ctx, img, l.version);
  return refs.map((r) => {
    const count = chunkCount(sizeOf(draft, r.kind), r.kind);
    if (r.index >= count) {
      throw new LetheError('UNKNOWN_CHUNK', `${r.kind} chunk ${r.index} is past the end (the ${r.kind} has ${count} chunks)`);
    }
    const replaced = r.kind === 'state' && draft.state_size !== base.state_size;
    const stored = replaced ? undefined : chunkRow(ctx, l.image_id, l.version, r.kind, r.index);
    const cls = stored?.cls ?? classOf(policy, r.kind, r.index * CHUNK_SIZE[r.kind], CHUNK_SIZE[r.kind]);
    return { kind: r.kind, idx: r.index, gen, cls, ct_sha256: Buffer.alloc(0) };
  });
}

/**
 * Gives the lease's draft a new device-state size (a suspend writes a whole new
 * state); the draft's state then replaces the base's at check-in.
 */
function setDraftStateSize(ctx: Ctx, l: LeaseRow & { name: string }, size: number): void {
  const gen = writeGen(ctx, l);
  q(ctx.db, 'UPDATE versions SET state_size = ? WHERE image_id = ? AND version = ?').run(size, l.image_id, gen);
}

/** Releases chunk keys, sealed together to the device; audited first. */
export function releaseKeys(
  ctx: Ctx,
  d: DeviceRow,
  leaseId: string,
  refs: { kind: ChunkKind; index: number }[],
  write = false,
  stateSize?: number,
) {
  const l = liveLease(ctx, d, leaseId);
  if (stateSize !== undefined && !write) throw new LetheError('BAD_REQUEST', 'stateSize is for write keys only (write: true)');
  const now = ctx.now();
  // The draft's new state size, the checks against it and the audit entry stand or fall together.
  const rows = ctx.db.transaction(() => {
    if (stateSize !== undefined) setDraftStateSize(ctx, l, stateSize);
    const rows = write ? writeCoords(ctx, l, refs) : resolve(ctx, l, refs);
    // Past its key ceiling the device gets nothing; the alarm, not a release, is audited.
    const refused = write ? undefined : keyCeiling(ctx, d, l, rows, now);
    if (refused) return refused;
    const sensitive = rows.filter((r) => r.cls === 'sensitive').length;
    ctx.audit.append(
      'keys.release',
      d.id,
      {
        lease: l.id,
        image: l.name,
        version: l.version,
        count: rows.length,
        sensitive,
        chunks: ranges(refs),
        ...(write ? { write } : {}),
        ...(stateSize !== undefined ? { stateSize } : {}),
      },
      now,
    );
    return rows;
  })();
  if (rows instanceof LetheError) throw rows;
  const id = Buffer.from(l.image_id, 'hex');
  const wrapped = q(ctx.db, 'SELECT key_wrapped FROM versions WHERE image_id = ? AND version = ?');
  const coords = rows.map((r): ChunkCoord => ({ imageId: id, gen: r.gen, kind: r.kind, index: r.idx, cls: r.cls }));
  // One lookup per generation per request. Safe while a request touches fewer
  // generations than the escrow caches (256): no key used here can be evicted
  // (and wiped) before the request is done; past that, look up per key.
  const gens = new Set(rows.map((r) => r.gen));
  const memo = new Map<number, Uint8Array>();
  const lookup = (gen: number) => ctx.escrow.versionKey((wrapped.get(l.image_id, gen) as { key_wrapped: Buffer }).key_wrapped, id, gen);
  const versionKeyOf =
    gens.size <= 64
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
export function serveChunks(ctx: Ctx, d: DeviceRow, leaseId: string, refs: { kind: ChunkKind; index: number }[]) {
  const l = liveLease(ctx, d, leaseId);
  const rows = resolve(ctx, l, refs);
  const blobs = rows.map((r) => readBlob(ctx, l.image_id, r));
  const bytes = blobs.reduce((n, b) => n + b.length, 0);
  ctx.db.transaction(() => {
    ctx.audit.append(
      'chunks.serve',
      d.id,
      { lease: l.id, image: l.name, version: l.version, count: rows.length, bytes, chunks: ranges(refs) },
      ctx.now(),
    );
  })();
  ctx.metrics.inc('lethe_chunks_served_total', {}, rows.length);
  ctx.metrics.inc('lethe_chunk_bytes_served_total', {}, bytes);
  return rows.map((r, i) => ({ row: r, blob: blobs[i] }));
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
export function checkin(ctx: Ctx, d: DeviceRow, leaseId: string, items: { kind: ChunkKind; index: number; data: Buffer }[], final: boolean) {
  const l = liveLease(ctx, d, leaseId);
  if (l.write_gen === null) throw new LetheError('BAD_REQUEST', 'nothing to check in: this lease wrote no chunks');
  const img = getImage(ctx, l.name);
  const resumes = resumeVersion(ctx, d.id, img).version;
  if (resumes !== l.version) {
    throw new LetheError('CONFLICT', `${l.name} moved on to version ${resumes} since this lease (on ${l.version}) began`, {
      hint: 'the writes stay in the device cache; IT decides which version wins',
    });
  }
  const gen = l.write_gen;
  const draft = getVersion(ctx, img, gen);
  const imageId = Buffer.from(img.id, 'hex');
  const coords = writeCoords(ctx, l, items);
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
  ctx.store.transaction(() => {
    const put = q(ctx.store, 'INSERT OR REPLACE INTO blobs(image_id, gen, kind, idx, data) VALUES (?, ?, ?, ?, ?)');
    for (const r of rows) if (r.dedup) put.run(img.id, gen, r.kind, r.idx, r.blob);
  })();
  const now = ctx.now();
  const single = policyOf(img).imageUsers === 'single';
  ctx.db.transaction(() => {
    // Staged rows of the draft; a zero chunk is staged as a tombstone (empty hash).
    const put = q(ctx.db, 
      'INSERT OR REPLACE INTO chunks(image_id, version, kind, idx, gen, cls, ct_sha256, dedup_hash) VALUES (?, ?, ?, ?, ?, ?, ?, ?)',
    );
    for (const r of rows) {
      put.run(img.id, gen, r.kind, r.idx, gen, r.cls, r.dedup ? sha256(r.blob) : Buffer.alloc(0), r.dedup ?? Buffer.alloc(0));
    }
    if (!final) return;
    // A draft with its own state size replaced the state whole: none of the base's carries over.
    const base = getVersion(ctx, img, l.version);
    const keepState = draft.state_size === base.state_size ? 1 : 0;
    q(ctx.db, 
        "INSERT OR IGNORE INTO chunks(image_id, version, kind, idx, gen, cls, ct_sha256, dedup_hash) SELECT image_id, ?, kind, idx, gen, cls, ct_sha256, dedup_hash FROM chunks WHERE image_id = ? AND version = ? AND (kind != 'state' OR ?)",
      )
      .run(gen, img.id, l.version, keepState);
    q(ctx.db, 'DELETE FROM chunks WHERE image_id = ? AND version = ? AND LENGTH(ct_sha256) = 0').run(img.id, gen);
    // A branch of this device on the lease's version (a draft made by an older server has neither set).
    q(ctx.db, "UPDATE versions SET state = 'committed', committed_at = ?, lease_id = NULL, device_id = ?, base = ? WHERE image_id = ? AND version = ?")
      .run(now, d.id, l.version, img.id, gen);
    q(ctx.db, 'UPDATE leases SET ended_at = ? WHERE id = ?').run(now, l.id);
    const staged = (q(ctx.db, 'SELECT COUNT(*) AS n FROM chunks WHERE image_id = ? AND version = ? AND gen = ?').get(img.id, gen, gen) as { n: number }).n;
    ctx.audit.append('checkin', d.id, { lease: l.id, image: l.name, base: l.version, version: gen, stored: staged }, now);
    if (single) makeShared(ctx, img, gen, d.id, l.version, now, true);
  })();
  return { image: l.name, version: gen, chunks: rows.length, committed: final, ...(final ? { shared: single } : {}) };
}
