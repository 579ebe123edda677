// Images: named series of versions; each version is a manifest of encrypted
// chunks (docs/chunk-format.md). An admin uploads plaintext over TLS; the
// server encrypts it with the version's keys, skips zero chunks, and keeps an
// unchanged chunk under the generation that first wrote it.
import { randomBytes } from 'node:crypto';
import { CHUNK_KINDS, CHUNK_SIZE, KEY_BYTES, MEM_CHUNK_SIZE, type ChunkKind, type Sensitivity } from '../common/constants.js';
import { encryptChunk, isZero, type ChunkCoord } from '../common/chunk.js';
import { b64u, keyedHash, secureBuffer, sha256, wipe } from '../common/crypto.js';
import { iso } from '../common/duration.js';
import { LetheError } from '../common/errors.js';
import { classOf, parsePolicy, storedPolicy } from '../policies/policy.js';
import type { Policy } from '../policies/schema.js';
import { crashPoint } from '../common/crash-point.js';
import { inTx, type Ctx } from './context.js';
import { ensureTerms, wrapNewKey } from './keyring.js';
import { endLeases, issueCommand } from './devices.js';

export interface ImageRow {
  id: string;
  name: string;
  created_at: number;
  policy: string | null;
  dedup_key_wrapped: Buffer;
  current_version: number | null;
}

export interface VersionRow {
  image_id: string;
  version: number;
  state: 'draft' | 'committed' | 'removed';
  created_at: number;
  committed_at: number | null;
  key_wrapped: Buffer;
  disk_size: number;
  mem_size: number;
  state_size: number;
  lease_id: string | null;
  /** A device branch: the device whose check-in made it, and the version its lease was on (docs/branches.md). */
  device_id: string | null;
  base: number | null;
  promoted_at: number | null;
}

export interface ChunkRow {
  kind: ChunkKind;
  idx: number;
  gen: number;
  cls: Sensitivity;
  ct_sha256: Buffer;
}

export const sizeOf = (v: VersionRow, kind: ChunkKind): number =>
  kind === 'disk' ? v.disk_size : kind === 'mem' ? v.mem_size : v.state_size;

export function chunkCount(size: number, kind: ChunkKind): number {
  return Math.ceil(size / CHUNK_SIZE[kind]);
}

/** Stores one chunk's ciphertext (replacing what the coordinates held). */
export const PUT_BLOB =
  'INSERT INTO blobs(image_id, gen, kind, idx, data) VALUES (?, ?, ?, ?, ?) ON CONFLICT (image_id, gen, kind, idx) DO UPDATE SET data = excluded.data';
/** Stores one chunk's row in a version (replacing what the version held there). */
export const PUT_CHUNK_ROW =
  'INSERT INTO chunks(image_id, version, kind, idx, gen, cls, ct_sha256, dedup_hash) VALUES (?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT (image_id, version, kind, idx) DO UPDATE SET gen = excluded.gen, cls = excluded.cls, ct_sha256 = excluded.ct_sha256, dedup_hash = excluded.dedup_hash';

/** The lock under which an image's next version number is chosen (every replica). */
export const versionLock = (imageId: string) => `lethe.versions:${imageId}`;

export async function getImage(ctx: Ctx, name: string): Promise<ImageRow> {
  const img = await ctx.db.get<ImageRow>('SELECT * FROM images WHERE name = ?', name);
  if (!img) throw new LetheError('UNKNOWN_IMAGE', `no image '${name}'`, { hint: "list images with 'lethe image ls'" });
  return img;
}

export async function getVersion(ctx: Ctx, img: ImageRow, version: number): Promise<VersionRow> {
  const v = await ctx.db.get<VersionRow>('SELECT * FROM versions WHERE image_id = ? AND version = ?', img.id, version);
  if (!v || v.state === 'removed') throw new LetheError('UNKNOWN_VERSION', `image '${img.name}' has no version ${version}`);
  return v;
}

export async function currentVersion(ctx: Ctx, img: ImageRow): Promise<VersionRow> {
  if (img.current_version === null) {
    throw new LetheError('UNKNOWN_VERSION', `image '${img.name}' has no committed version yet`, {
      hint: "push one with 'lethe image push'",
    });
  }
  return getVersion(ctx, img, img.current_version);
}

export const policyOf = (img: ImageRow): Policy => storedPolicy(img.policy);

export async function createImage(ctx: Ctx, name: string, policy?: string) {
  parsePolicy(policy, 'policy');
  const exists = () => new LetheError('CONFLICT', `image '${name}' already exists`);
  if (await ctx.db.get('SELECT 1 AS x FROM images WHERE name = ?', name)) throw exists();
  const id = randomBytes(16);
  const now = ctx.now();
  await inTx(ctx, async (ctx) => {
    // The name is unique: of two replicas creating it at once, one gets CONFLICT.
    const r = await ctx.db.run(
      'INSERT INTO images(id, name, created_at, policy, dedup_key_wrapped) VALUES (?, ?, ?, ?, ?) ON CONFLICT DO NOTHING',
      id.toString('hex'),
      name,
      now,
      policy ?? null,
      await wrapNewKey(ctx, id, 0, 'dedup'),
    );
    if (r.changes !== 1) throw exists();
    await ctx.audit.append('image.create', null, { image: name, imageId: id.toString('hex') }, now);
  });
  return { name, imageId: id.toString('hex') };
}

/** Opens a draft version that starts as a copy of the current one (or empty). */
export async function createVersion(ctx: Ctx, name: string, sizes: { disk: number; mem: number; state: number }) {
  const img = await getImage(ctx, name);
  if (sizes.mem % MEM_CHUNK_SIZE !== 0) {
    throw new LetheError('BAD_REQUEST', `memory size ${sizes.mem} is not a multiple of ${MEM_CHUNK_SIZE}`);
  }
  const draft = await ctx.db.get<{ version: number }>("SELECT version FROM versions WHERE image_id = ? AND state = 'draft' AND lease_id IS NULL", img.id);
  if (draft) {
    // Resuming an interrupted push: the draft is reused if the sizes match.
    const v = await getVersion(ctx, img, draft.version);
    if (v.disk_size === sizes.disk && v.mem_size === sizes.mem && v.state_size === sizes.state) {
      return { image: name, version: v.version, resumed: true };
    }
    await inTx(ctx, async (ctx) => {
      await ctx.db.run('DELETE FROM chunks WHERE image_id = ? AND version = ?', img.id, v.version);
      await ctx.db.run('DELETE FROM versions WHERE image_id = ? AND version = ?', img.id, v.version);
    });
    // Only the draft itself wrote blobs of its generation.
    await ctx.store.run('DELETE FROM blobs WHERE image_id = ? AND gen = ?', img.id, v.version);
  }
  const imageId = Buffer.from(img.id, 'hex');
  const version = await inTx(ctx, async (ctx) => {
    await ctx.db.lock(versionLock(img.id));
    const last = (await ctx.db.get<{ v: number | null }>('SELECT MAX(version) AS v FROM versions WHERE image_id = ?', img.id))!;
    const version = (last.v ?? 0) + 1;
    await ctx.db.run(
      "INSERT INTO versions(image_id, version, state, created_at, key_wrapped, disk_size, mem_size, state_size) VALUES (?, ?, 'draft', ?, ?, ?, ?, ?)",
      img.id,
      version,
      ctx.now(),
      await wrapNewKey(ctx, imageId, version, 'version'),
      sizes.disk,
      sizes.mem,
      sizes.state,
    );
    if (img.current_version !== null) {
      await ctx.db.run(
        'INSERT INTO chunks(image_id, version, kind, idx, gen, cls, ct_sha256, dedup_hash) SELECT image_id, CAST(? AS INTEGER), kind, idx, gen, cls, ct_sha256, dedup_hash FROM chunks WHERE image_id = ? AND version = ?',
        version,
        img.id,
        img.current_version,
      );
    }
    return version;
  });
  return { image: name, version, resumed: false };
}

async function draftVersion(ctx: Ctx, img: ImageRow, version: number): Promise<VersionRow> {
  const v = await getVersion(ctx, img, version);
  if (v.state !== 'draft') throw new LetheError('CONFLICT', `version ${version} of '${img.name}' is committed and cannot change`);
  return v;
}

export type PutResult = 'new' | 'unchanged' | 'zero';

/**
 * Stores plaintext chunks of a draft in one transaction per database: zero
 * chunks are dropped, a chunk whose keyed hash and class match what the draft
 * already holds is kept (with its generation), anything else is encrypted
 * under this version's key. Validates every chunk before storing any.
 */
export async function putChunks(ctx: Ctx, name: string, version: number, items: { kind: ChunkKind; index: number; data: Buffer }[]) {
  const img = await getImage(ctx, name);
  const v = await draftVersion(ctx, img, version);
  for (const { kind, index, data } of items) {
    const size = sizeOf(v, kind);
    const count = chunkCount(size, kind);
    if (index >= count) {
      throw new LetheError('BAD_REQUEST', `${kind} chunk ${index} is past the end (the ${kind} has ${count} chunks)`);
    }
    const expect = Math.min(CHUNK_SIZE[kind], size - index * CHUNK_SIZE[kind]);
    if (data.length !== expect && data.length !== 0) {
      throw new LetheError('BAD_REQUEST', `${kind} chunk ${index} is ${data.length} bytes, expected ${expect}`);
    }
  }
  const imageId = Buffer.from(img.id, 'hex');
  const policy = policyOf(img);
  await ensureTerms(ctx, img.dedup_key_wrapped, v.key_wrapped);
  const dedupKey = ctx.escrow.dedupKey(img.dedup_key_wrapped, imageId);
  const versionKey = ctx.escrow.versionKey(v.key_wrapped, imageId, version);
  const existing = await chunkRows(ctx, img.id, version, items);
  const key = secureBuffer(KEY_BYTES);
  const results: PutResult[] = [];
  const rows: unknown[][] = [];
  const blobs: unknown[][] = [];
  try {
    for (const [i, { kind, index, data }] of items.entries()) {
      if (data.length === 0 || isZero(data)) {
        rows.push([kind, index]);
        results.push('zero');
        continue;
      }
      const dedup = keyedHash(dedupKey, data);
      const cls = classOf(policy, kind, index * CHUNK_SIZE[kind], data.length);
      const have = existing[i];
      if (have && have.cls === cls && have.dedup_hash.equals(dedup)) {
        results.push('unchanged');
        continue;
      }
      const coord: ChunkCoord = { imageId, gen: version, kind, index, cls };
      ctx.escrow.chunkKeyInto(key, versionKey, coord);
      const blob = encryptChunk(key, coord, data);
      blobs.push([img.id, version, kind, index, blob]);
      rows.push([kind, index, cls, sha256(blob), dedup]);
      results.push('new');
    }
  } finally {
    wipe(key);
  }
  // Blobs first: a crash between the two leaves an unreferenced blob, never a row without one.
  await ctx.store.tx(async (t) => {
    for (const b of blobs) await t.run(PUT_BLOB, ...b);
  });
  crashPoint('push.chunk-stored');
  await ctx.db.tx(async (t) => {
    for (const r of rows) {
      if (r.length === 2) await t.run('DELETE FROM chunks WHERE image_id = ? AND version = ? AND kind = ? AND idx = ?', img.id, version, r[0], r[1]);
      else await t.run(PUT_CHUNK_ROW, img.id, version, r[0], r[1], version, r[2], r[3], r[4]);
    }
  });
  const count = (k: PutResult) => results.filter((r) => r === k).length;
  return { new: count('new'), unchanged: count('unchanged'), zero: count('zero') };
}

/** The keyed hashes of a draft's (or version's) stored chunks, so a pusher can skip what is there. */
export async function chunkHashes(ctx: Ctx, name: string, version: number) {
  const img = await getImage(ctx, name);
  await getVersion(ctx, img, version);
  const out: Record<ChunkKind, [number, string][]> = { disk: [], mem: [], state: [] };
  const rows = await ctx.db.all<{ kind: ChunkKind; idx: number; dedup_hash: Buffer }>(
    'SELECT kind, idx, dedup_hash FROM chunks WHERE image_id = ? AND version = ? ORDER BY kind, idx',
    img.id,
    version,
  );
  for (const r of rows) out[r.kind].push([r.idx, r.dedup_hash.toString('base64url')]);
  return out;
}

/** The per-image dedup key, for an admin's pusher to compute the same keyed hashes. */
export async function dedupKeyFor(ctx: Ctx, name: string): Promise<string> {
  const img = await getImage(ctx, name);
  await ensureTerms(ctx, img.dedup_key_wrapped);
  return b64u.encode(ctx.escrow.dedupKey(img.dedup_key_wrapped, Buffer.from(img.id, 'hex')));
}

export async function setPolicy(ctx: Ctx, name: string, policy: string | null) {
  parsePolicy(policy, 'policy');
  const img = await getImage(ctx, name);
  const changed = (img.policy ?? null) !== policy;
  if (changed) {
    await inTx(ctx, async (ctx) => {
      const now = ctx.now();
      await ctx.db.run('UPDATE images SET policy = ? WHERE id = ?', policy, img.id);
      // A device running the image takes the new policy now (it renews at once), not at its next renewal.
      // (Its commands before the audit entry: no device row is locked while holding the chain's lock.)
      const running = await ctx.db.all<{ device_id: string }>(
        'SELECT DISTINCT device_id FROM leases WHERE image_id = ? AND ended_at IS NULL AND expires_at > ? ORDER BY device_id',
        img.id,
        now,
      );
      for (const r of running) await issueCommand(ctx, r.device_id, 'policy', { image: name }, now);
      await ctx.audit.append('image.policy', null, { image: name }, now);
    });
  }
  return { image: name, changed };
}

/**
 * Ciphertext and key of each chunk, for an admin's verify or pull. Audited:
 * keys leave the server.
 */
export async function exportChunks(ctx: Ctx, name: string, version: number, refs: { kind: ChunkKind; index: number }[]) {
  const img = await getImage(ctx, name);
  await getVersion(ctx, img, version);
  const imageId = Buffer.from(img.id, 'hex');
  const found = await chunkRows(ctx, img.id, version, refs);
  const rows = refs.map((r, i) => {
    const row = found[i];
    if (!row) throw new LetheError('UNKNOWN_CHUNK', `${r.kind} chunk ${r.index} is not stored in ${name}@${version}`);
    return row;
  });
  await ctx.audit.append('image.export', null, { image: name, version, count: rows.length }, ctx.now());
  const blobs = await readBlobs(ctx, img.id, rows);
  const wrapped = new Map<number, Buffer>();
  for (const gen of new Set(rows.map((r) => r.gen))) {
    wrapped.set(gen, (await ctx.db.get<{ key_wrapped: Buffer }>('SELECT key_wrapped FROM versions WHERE image_id = ? AND version = ?', img.id, gen))!.key_wrapped);
  }
  await ensureTerms(ctx, ...wrapped.values());
  const parts: Buffer[] = [];
  const key = secureBuffer(KEY_BYTES);
  try {
    for (const [i, r] of rows.entries()) {
      const blob = blobs[i];
      const vk = ctx.escrow.versionKey(wrapped.get(r.gen)!, imageId, r.gen);
      ctx.escrow.chunkKeyInto(key, vk, { imageId, gen: r.gen, kind: r.kind, index: r.idx, cls: r.cls });
      const len = Buffer.alloc(4);
      len.writeUInt32BE(blob.length);
      parts.push(len, blob, Buffer.from(key));
    }
  } finally {
    wipe(key);
  }
  return Buffer.concat(parts);
}

/** Removes a whole image, or one version that is not the current one; frees blobs nothing refers to. */
export async function removeImage(ctx: Ctx, name: string, version?: number) {
  const img = await getImage(ctx, name);
  const now = ctx.now();
  if (version !== undefined) {
    await getVersion(ctx, img, version);
    if (img.current_version === version) {
      throw new LetheError('CONFLICT', `${name}@${version} is the current version`, {
        hint: `push a newer version first, or remove the whole image with 'lethe image rm ${name}'`,
      });
    }
  }
  let drafts: number[] = [];
  await inTx(ctx, async (ctx) => {
    if (version === undefined) {
      // Its leases end with it (a running device is told at once, the others at their next renewal); their history stays in the audit log.
      await endLeases(ctx, 'image_id = ?', [img.id], now);
      await ctx.db.run('DELETE FROM leases WHERE image_id = ?', img.id);
      await ctx.db.run('DELETE FROM assignments WHERE image_id = ?', img.id);
      await ctx.db.run('DELETE FROM chunks WHERE image_id = ?', img.id);
      await ctx.db.run('DELETE FROM versions WHERE image_id = ?', img.id);
      await ctx.db.run('DELETE FROM images WHERE id = ?', img.id);
    } else {
      await endLeases(ctx, 'image_id = ? AND version = ?', [img.id, version], now);
      // A device's draft on it can never be committed now (a check-in needs a live lease on
      // its base, and only such a lease adopts it): it goes too. Its rows, carried over from
      // this version by a last part that failed, would keep this version's blobs.
      drafts = (await ctx.db.all<{ version: number }>("SELECT version FROM versions WHERE image_id = ? AND state = 'draft' AND base = ?", img.id, version)).map((d) => d.version);
      for (const v of [version, ...drafts]) {
        await ctx.db.run('DELETE FROM chunks WHERE image_id = ? AND version = ?', img.id, v);
        await ctx.db.run("UPDATE versions SET state = 'removed', lease_id = NULL WHERE image_id = ? AND version = ?", img.id, v);
      }
    }
    await ctx.audit.append('image.rm', null, { image: name, ...(version === undefined ? {} : { version }), ...(drafts.length > 0 ? { drafts } : {}) }, now);
  });
  // Garbage: blobs of generations that no remaining chunk row refers to.
  const live = new Set(
    (await ctx.db.all<{ kind: string; idx: number; gen: number }>('SELECT DISTINCT kind, idx, gen FROM chunks WHERE image_id = ?', img.id)).map(
      (r) => `${r.kind}/${r.idx}/${r.gen}`,
    ),
  );
  const all = await ctx.store.all<{ kind: string; idx: number; gen: number }>('SELECT kind, idx, gen FROM blobs WHERE image_id = ?', img.id);
  let freed = 0;
  await ctx.store.tx(async (t) => {
    for (const b of all) {
      if (!live.has(`${b.kind}/${b.idx}/${b.gen}`)) {
        await t.run('DELETE FROM blobs WHERE image_id = ? AND gen = ? AND kind = ? AND idx = ?', img.id, b.gen, b.kind, b.idx);
        freed++;
      }
    }
  });
  return { image: name, ...(version === undefined ? {} : { version }), ...(drafts.length > 0 ? { draftsRemoved: drafts } : {}), chunksFreed: freed };
}

/** Bytes the chunk store holds for an image (ciphertext, all generations). */
export async function storedBytes(ctx: Ctx, imageId: string): Promise<{ chunks: number; bytes: number }> {
  const r = (await ctx.store.get<{ n: number; b: number }>('SELECT COUNT(*) AS n, COALESCE(SUM(LENGTH(data)), 0) AS b FROM blobs WHERE image_id = ?', imageId))!;
  return { chunks: r.n, bytes: r.b };
}

export async function commitVersion(ctx: Ctx, name: string, version: number) {
  const img = await getImage(ctx, name);
  const v = await draftVersion(ctx, img, version);
  const now = ctx.now();
  const counts: Record<string, number> = {};
  await inTx(ctx, async (ctx) => {
    for (const kind of CHUNK_KINDS) {
      await ctx.db.run('DELETE FROM chunks WHERE image_id = ? AND version = ? AND kind = ? AND idx >= ?', img.id, version, kind, chunkCount(sizeOf(v, kind), kind));
      counts[kind] = (await ctx.db.get<{ n: number }>('SELECT COUNT(*) AS n FROM chunks WHERE image_id = ? AND version = ? AND kind = ?', img.id, version, kind))!.n;
    }
    const r = await ctx.db.run("UPDATE versions SET state = 'committed', committed_at = ? WHERE image_id = ? AND version = ? AND state = 'draft'", now, img.id, version);
    if (r.changes !== 1) throw new LetheError('CONFLICT', `version ${version} of '${name}' is committed and cannot change`);
    await ctx.db.run('UPDATE images SET current_version = ? WHERE id = ?', version, img.id);
    await ctx.audit.append('version.commit', null, { image: name, version, chunks: counts }, now);
  });
  return { image: name, version, chunks: counts };
}

export async function listImages(ctx: Ctx) {
  const imgs = await ctx.db.all<ImageRow>('SELECT * FROM images ORDER BY name');
  const out = [];
  for (const img of imgs) {
    const versions = await ctx.db.all<VersionRow>(
      "SELECT version, state, committed_at, disk_size, mem_size, state_size, device_id, base, promoted_at FROM versions WHERE image_id = ? AND state != 'removed' ORDER BY version",
      img.id,
    );
    const trusted = await ctx.db.all<{ device_id: string }>('SELECT device_id FROM trusted_tracers WHERE image_id = ? ORDER BY trusted_at, device_id', img.id);
    out.push({
      name: img.name,
      imageId: img.id,
      current: img.current_version,
      stored: await storedBytes(ctx, img.id),
      versions: versions.map((v) => ({
        version: v.version,
        state: v.state,
        committedAt: v.committed_at === null ? null : iso(v.committed_at),
        sizes: { disk: v.disk_size, mem: v.mem_size, state: v.state_size },
        // A device branch: whose, on which version, and when it was made shared (null: not yet).
        ...(v.device_id === null ? {} : { device: v.device_id, base: v.base, promotedAt: v.promoted_at === null ? null : iso(v.promoted_at) }),
      })),
      trustedTracers: trusted.map((r) => r.device_id),
    });
  }
  return out;
}

/** Chunks looked up per statement: well under either database's parameter limit. */
const ROWS_PER_QUERY = 256;

/** The stored row of each ref in a version (undefined where none is stored), in the refs' order. */
export async function chunkRows(
  ctx: Ctx,
  imageId: string,
  version: number,
  refs: readonly { kind: ChunkKind; index: number }[],
): Promise<((ChunkRow & { dedup_hash: Buffer }) | undefined)[]> {
  const found = new Map<string, ChunkRow & { dedup_hash: Buffer }>();
  if (ctx.db.dialect === 'postgres') {
    // One array parameter per kind: one plan, an index range per kind.
    for (const kind of new Set(refs.map((r) => r.kind))) {
      const idx = refs.filter((r) => r.kind === kind).map((r) => r.index);
      const rows = await ctx.db.all<ChunkRow & { dedup_hash: Buffer }>(
        'SELECT kind, idx, gen, cls, ct_sha256, dedup_hash FROM chunks WHERE image_id = ? AND version = ? AND kind = ? AND idx = ANY(CAST(? AS INTEGER[]))',
        imageId,
        version,
        kind,
        idx,
      );
      for (const r of rows) found.set(`${r.kind}/${r.idx}`, r);
    }
    return refs.map((r) => found.get(`${r.kind}/${r.index}`));
  }
  for (let i = 0; i < refs.length; i += ROWS_PER_QUERY) {
    const part = refs.slice(i, i + ROWS_PER_QUERY);
    const rows = await ctx.db.all<ChunkRow & { dedup_hash: Buffer }>(
      `SELECT kind, idx, gen, cls, ct_sha256, dedup_hash FROM chunks WHERE image_id = ? AND version = ? AND (kind, idx) IN (${part.map(() => '(?, CAST(? AS INTEGER))').join(', ')})`,
      imageId,
      version,
      ...part.flatMap((r) => [r.kind, r.index]),
    );
    for (const r of rows) found.set(`${r.kind}/${r.idx}`, r);
  }
  return refs.map((r) => found.get(`${r.kind}/${r.index}`));
}

/** The ciphertext of each row, in their order; a row without its blob is a server fault (INTERNAL). */
export async function readBlobs(ctx: Ctx, imageId: string, rows: readonly ChunkRow[]): Promise<Buffer[]> {
  const found = new Map<string, Buffer>();
  if (ctx.store.dialect === 'postgres') {
    const groups = new Map<string, ChunkRow[]>();
    for (const r of rows) (groups.get(`${r.gen}/${r.kind}`) ?? groups.set(`${r.gen}/${r.kind}`, []).get(`${r.gen}/${r.kind}`)!).push(r);
    for (const g of groups.values()) {
      const blobs = await ctx.store.all<{ gen: number; kind: string; idx: number; data: Buffer }>(
        'SELECT gen, kind, idx, data FROM blobs WHERE image_id = ? AND gen = ? AND kind = ? AND idx = ANY(CAST(? AS INTEGER[]))',
        imageId,
        g[0].gen,
        g[0].kind,
        g.map((r) => r.idx),
      );
      for (const b of blobs) found.set(`${b.gen}/${b.kind}/${b.idx}`, b.data);
    }
  }
  for (let i = 0; ctx.store.dialect === 'sqlite' && i < rows.length; i += ROWS_PER_QUERY) {
    const part = rows.slice(i, i + ROWS_PER_QUERY);
    const blobs = await ctx.store.all<{ gen: number; kind: string; idx: number; data: Buffer }>(
      `SELECT gen, kind, idx, data FROM blobs WHERE image_id = ? AND (gen, kind, idx) IN (${part.map(() => '(CAST(? AS INTEGER), ?, CAST(? AS INTEGER))').join(', ')})`,
      imageId,
      ...part.flatMap((r) => [r.gen, r.kind, r.idx]),
    );
    for (const b of blobs) found.set(`${b.gen}/${b.kind}/${b.idx}`, b.data);
  }
  return rows.map((row) => {
    const b = found.get(`${row.gen}/${row.kind}/${row.idx}`);
    if (!b) throw new LetheError('INTERNAL', `chunk store is missing ${row.kind} chunk ${row.idx} (generation ${row.gen})`);
    return b;
  });
}
