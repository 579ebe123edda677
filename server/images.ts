// Images: named series of versions; each version is a manifest of encrypted
// chunks (docs/chunk-format.md). An admin uploads plaintext over TLS; the
// server encrypts it with the version's keys, skips zero chunks, and keeps an
// unchanged chunk under the generation that first wrote it.
import { randomBytes } from 'node:crypto';
import { CHUNK_KINDS, CHUNK_SIZE, KEY_BYTES, MANIFEST_CONTEXT, MEM_CHUNK_SIZE, type ChunkKind, type Sensitivity } from '../common/constants.js';
import { canonical } from '../common/audit-hash.js';
import { encryptChunk, isZero, type ChunkCoord } from '../common/chunk.js';
import { b64u, keyedHash, secureBuffer, sha256, sign, wipe } from '../common/crypto.js';
import { iso } from '../common/duration.js';
import { LetheError } from '../common/errors.js';
import { classOf, parsePolicy, storedPolicy } from '../policies/policy.js';
import type { Policy } from '../policies/schema.js';
import type { Ctx } from './context.js';
import { q } from './db.js';

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

export function getImage(ctx: Ctx, name: string): ImageRow {
  const img = q(ctx.db, 'SELECT * FROM images WHERE name = ?').get(name) as ImageRow | undefined;
  if (!img) throw new LetheError('UNKNOWN_IMAGE', `no image '${name}'`, { hint: "list images with 'lethe image ls'" });
  return img;
}

export function getVersion(ctx: Ctx, img: ImageRow, version: number): VersionRow {
  const v = q(ctx.db, 'SELECT * FROM versions WHERE image_id = ? AND version = ?').get(img.id, version) as
    | VersionRow
    | undefined;
  if (!v || v.state === 'removed') throw new LetheError('UNKNOWN_VERSION', `image '${img.name}' has no version ${version}`);
  return v;
}

export function currentVersion(ctx: Ctx, img: ImageRow): VersionRow {
  if (img.current_version === null) {
    throw new LetheError('UNKNOWN_VERSION', `image '${img.name}' has no committed version yet`, {
      hint: "push one with 'lethe image push'",
    });
  }
  return getVersion(ctx, img, img.current_version);
}

export const policyOf = (img: ImageRow): Policy => storedPolicy(img.policy);

export function createImage(ctx: Ctx, name: string, policy?: string) {
  parsePolicy(policy, 'policy');
  if (q(ctx.db, 'SELECT 1 FROM images WHERE name = ?').get(name)) {
    throw new LetheError('CONFLICT', `image '${name}' already exists`);
  }
  const id = randomBytes(16);
  const now = ctx.now();
  ctx.db.transaction(() => {
    q(ctx.db, 'INSERT INTO images(id, name, created_at, policy, dedup_key_wrapped) VALUES (?, ?, ?, ?, ?)')
      .run(id.toString('hex'), name, now, policy ?? null, ctx.escrow.newWrappedKey(id, 0, 'dedup'));
    ctx.audit.append('image.create', null, { image: name, imageId: id.toString('hex') }, now);
  })();
  return { name, imageId: id.toString('hex') };
}

/** Opens a draft version that starts as a copy of the current one (or empty). */
export function createVersion(ctx: Ctx, name: string, sizes: { disk: number; mem: number; state: number }) {
  const img = getImage(ctx, name);
  if (sizes.mem % MEM_CHUNK_SIZE !== 0) {
    throw new LetheError('BAD_REQUEST', `memory size ${sizes.mem} is not a multiple of ${MEM_CHUNK_SIZE}`);
  }
  const draft = q(ctx.db, "SELECT version FROM versions WHERE image_id = ? AND state = 'draft' AND lease_id IS NULL").get(img.id) as
    | { version: number }
    | undefined;
  if (draft) {
    // Resuming an interrupted push: the draft is reused if the sizes match.
    const v = getVersion(ctx, img, draft.version);
    if (v.disk_size === sizes.disk && v.mem_size === sizes.mem && v.state_size === sizes.state) {
      return { image: name, version: v.version, resumed: true };
    }
    ctx.db.transaction(() => {
      q(ctx.db, 'DELETE FROM chunks WHERE image_id = ? AND version = ?').run(img.id, v.version);
      q(ctx.db, 'DELETE FROM versions WHERE image_id = ? AND version = ?').run(img.id, v.version);
    })();
    // Only the draft itself wrote blobs of its generation.
    q(ctx.store, 'DELETE FROM blobs WHERE image_id = ? AND gen = ?').run(img.id, v.version);
  }
  const last = q(ctx.db, 'SELECT MAX(version) AS v FROM versions WHERE image_id = ?').get(img.id) as { v: number | null };
  const version = (last.v ?? 0) + 1;
  const imageId = Buffer.from(img.id, 'hex');
  ctx.db.transaction(() => {
    q(ctx.db, 
        "INSERT INTO versions(image_id, version, state, created_at, key_wrapped, disk_size, mem_size, state_size) VALUES (?, ?, 'draft', ?, ?, ?, ?, ?)",
      )
      .run(img.id, version, ctx.now(), ctx.escrow.newWrappedKey(imageId, version, 'version'), sizes.disk, sizes.mem, sizes.state);
    if (img.current_version !== null) {
      q(ctx.db, 
          'INSERT INTO chunks(image_id, version, kind, idx, gen, cls, ct_sha256, dedup_hash) SELECT image_id, ?, kind, idx, gen, cls, ct_sha256, dedup_hash FROM chunks WHERE image_id = ? AND version = ?',
        )
        .run(version, img.id, img.current_version);
    }
  })();
  return { image: name, version, resumed: false };
}

function draftVersion(ctx: Ctx, img: ImageRow, version: number): VersionRow {
  const v = getVersion(ctx, img, version);
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
export function putChunks(ctx: Ctx, name: string, version: number, items: { kind: ChunkKind; index: number; data: Buffer }[]) {
  const img = getImage(ctx, name);
  const v = draftVersion(ctx, img, version);
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
  const dedupKey = ctx.escrow.dedupKey(img.dedup_key_wrapped, imageId);
  const versionKey = ctx.escrow.versionKey(v.key_wrapped, imageId, version);
  const existing = q(ctx.db, 'SELECT dedup_hash, cls FROM chunks WHERE image_id = ? AND version = ? AND kind = ? AND idx = ?');
  const del = q(ctx.db, 'DELETE FROM chunks WHERE image_id = ? AND version = ? AND kind = ? AND idx = ?');
  const putRow = q(ctx.db, 
    'INSERT OR REPLACE INTO chunks(image_id, version, kind, idx, gen, cls, ct_sha256, dedup_hash) VALUES (?, ?, ?, ?, ?, ?, ?, ?)',
  );
  const putBlob = q(ctx.store, 'INSERT OR REPLACE INTO blobs(image_id, gen, kind, idx, data) VALUES (?, ?, ?, ?, ?)');
  const key = secureBuffer(KEY_BYTES);
  const results: PutResult[] = [];
  const rows: unknown[][] = [];
  const blobs: unknown[][] = [];
  try {
    for (const { kind, index, data } of items) {
      if (data.length === 0 || isZero(data)) {
        rows.push([kind, index]);
        results.push('zero');
        continue;
      }
      const dedup = keyedHash(dedupKey, data);
      const cls = classOf(policy, kind, index * CHUNK_SIZE[kind], data.length);
      const have = existing.get(img.id, version, kind, index) as { dedup_hash: Buffer; cls: string } | undefined;
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
  ctx.store.transaction(() => {
    for (const b of blobs) putBlob.run(...b);
  })();
  ctx.db.transaction(() => {
    for (const r of rows) {
      if (r.length === 2) del.run(img.id, version, r[0], r[1]);
      else putRow.run(img.id, version, r[0], r[1], version, r[2], r[3], r[4]);
    }
  })();
  const count = (k: PutResult) => results.filter((r) => r === k).length;
  return { new: count('new'), unchanged: count('unchanged'), zero: count('zero') };
}

/** The keyed hashes of a draft's (or version's) stored chunks, so a pusher can skip what is there. */
export function chunkHashes(ctx: Ctx, name: string, version: number) {
  const img = getImage(ctx, name);
  getVersion(ctx, img, version);
  const out: Record<ChunkKind, [number, string][]> = { disk: [], mem: [], state: [] };
  const rows = q(ctx.db, 'SELECT kind, idx, dedup_hash FROM chunks WHERE image_id = ? AND version = ? ORDER BY kind, idx')
    .all(img.id, version) as { kind: ChunkKind; idx: number; dedup_hash: Buffer }[];
  for (const r of rows) out[r.kind].push([r.idx, r.dedup_hash.toString('base64url')]);
  return out;
}

/** The per-image dedup key, for an admin's pusher to compute the same keyed hashes. */
export function dedupKeyFor(ctx: Ctx, name: string): string {
  const img = getImage(ctx, name);
  return b64u.encode(ctx.escrow.dedupKey(img.dedup_key_wrapped, Buffer.from(img.id, 'hex')));
}

export function setPolicy(ctx: Ctx, name: string, policy: string | null) {
  parsePolicy(policy, 'policy');
  const img = getImage(ctx, name);
  const changed = (img.policy ?? null) !== policy;
  if (changed) {
    ctx.db.transaction(() => {
      q(ctx.db, 'UPDATE images SET policy = ? WHERE id = ?').run(policy, img.id);
      ctx.audit.append('image.policy', null, { image: name }, ctx.now());
    })();
  }
  return { image: name, changed };
}

/**
 * Ciphertext and key of each chunk, for an admin's verify or pull. Audited:
 * keys leave the server.
 */
export function exportChunks(ctx: Ctx, name: string, version: number, refs: { kind: ChunkKind; index: number }[]) {
  const img = getImage(ctx, name);
  const v = getVersion(ctx, img, version);
  const imageId = Buffer.from(img.id, 'hex');
  const rows = refs.map((r) => {
    const row = chunkRow(ctx, img.id, version, r.kind, r.index);
    if (!row) throw new LetheError('UNKNOWN_CHUNK', `${r.kind} chunk ${r.index} is not stored in ${name}@${version}`);
    return row;
  });
  ctx.db.transaction(() => {
    ctx.audit.append('image.export', null, { image: name, version, count: rows.length }, ctx.now());
  })();
  const wrapped = q(ctx.db, 'SELECT key_wrapped FROM versions WHERE image_id = ? AND version = ?');
  const parts: Buffer[] = [];
  const key = secureBuffer(KEY_BYTES);
  try {
    for (const r of rows) {
      const blob = readBlob(ctx, img.id, r);
      const vk = ctx.escrow.versionKey((wrapped.get(img.id, r.gen) as { key_wrapped: Buffer }).key_wrapped, imageId, r.gen);
      ctx.escrow.chunkKeyInto(key, vk, { imageId, gen: r.gen, kind: r.kind, index: r.idx, cls: r.cls });
      const len = Buffer.alloc(4);
      len.writeUInt32BE(blob.length);
      parts.push(len, blob, Buffer.from(key));
    }
  } finally {
    wipe(key);
  }
  void v;
  return Buffer.concat(parts);
}

/** Removes a whole image, or one version that is not the current one; frees blobs nothing refers to. */
export function removeImage(ctx: Ctx, name: string, version?: number) {
  const img = getImage(ctx, name);
  const now = ctx.now();
  if (version !== undefined) {
    getVersion(ctx, img, version);
    if (img.current_version === version) {
      throw new LetheError('CONFLICT', `${name}@${version} is the current version`, {
        hint: `push a newer version first, or remove the whole image with 'lethe image rm ${name}'`,
      });
    }
  }
  ctx.db.transaction(() => {
    if (version === undefined) {
      // Its leases end with it (a device's next renewal is told so); their history stays in the audit log.
      q(ctx.db, 'DELETE FROM leases WHERE image_id = ?').run(img.id);
      q(ctx.db, 'DELETE FROM assignments WHERE image_id = ?').run(img.id);
      q(ctx.db, 'DELETE FROM chunks WHERE image_id = ?').run(img.id);
      q(ctx.db, 'DELETE FROM versions WHERE image_id = ?').run(img.id);
      q(ctx.db, 'DELETE FROM images WHERE id = ?').run(img.id);
    } else {
      q(ctx.db, 'UPDATE leases SET ended_at = ? WHERE image_id = ? AND version = ? AND ended_at IS NULL').run(now, img.id, version);
      q(ctx.db, 'DELETE FROM chunks WHERE image_id = ? AND version = ?').run(img.id, version);
      q(ctx.db, "UPDATE versions SET state = 'removed' WHERE image_id = ? AND version = ?").run(img.id, version);
    }
    ctx.audit.append('image.rm', null, { image: name, ...(version === undefined ? {} : { version }) }, now);
  })();
  // Garbage: blobs of generations that no remaining chunk row refers to.
  const live = new Set(
    (q(ctx.db, 'SELECT DISTINCT kind, idx, gen FROM chunks WHERE image_id = ?').all(img.id) as { kind: string; idx: number; gen: number }[]).map(
      (r) => `${r.kind}/${r.idx}/${r.gen}`,
    ),
  );
  const all = q(ctx.store, 'SELECT kind, idx, gen FROM blobs WHERE image_id = ?').all(img.id) as { kind: string; idx: number; gen: number }[];
  const drop = q(ctx.store, 'DELETE FROM blobs WHERE image_id = ? AND gen = ? AND kind = ? AND idx = ?');
  let freed = 0;
  ctx.store.transaction(() => {
    for (const b of all) {
      if (!live.has(`${b.kind}/${b.idx}/${b.gen}`)) {
        drop.run(img.id, b.gen, b.kind, b.idx);
        freed++;
      }
    }
  })();
  return { image: name, ...(version === undefined ? {} : { version }), chunksFreed: freed };
}

/** Bytes the chunk store holds for an image (ciphertext, all generations). */
export function storedBytes(ctx: Ctx, imageId: string): { chunks: number; bytes: number } {
  const r = q(ctx.store, 'SELECT COUNT(*) AS n, COALESCE(SUM(LENGTH(data)), 0) AS b FROM blobs WHERE image_id = ?').get(imageId) as {
    n: number;
    b: number;
  };
  return { chunks: r.n, bytes: r.b };
}

export function commitVersion(ctx: Ctx, name: string, version: number) {
  const img = getImage(ctx, name);
  const v = draftVersion(ctx, img, version);
  const now = ctx.now();
  const counts: Record<string, number> = {};
  ctx.db.transaction(() => {
    for (const kind of CHUNK_KINDS) {
      q(ctx.db, 'DELETE FROM chunks WHERE image_id = ? AND version = ? AND kind = ? AND idx >= ?')
        .run(img.id, version, kind, chunkCount(sizeOf(v, kind), kind));
      counts[kind] = (
        q(ctx.db, 'SELECT COUNT(*) AS n FROM chunks WHERE image_id = ? AND version = ? AND kind = ?').get(img.id, version, kind) as {
          n: number;
        }
      ).n;
    }
    q(ctx.db, "UPDATE versions SET state = 'committed', committed_at = ? WHERE image_id = ? AND version = ?").run(now, img.id, version);
    q(ctx.db, 'UPDATE images SET current_version = ? WHERE id = ?').run(version, img.id);
    ctx.audit.append('version.commit', null, { image: name, version, chunks: counts }, now);
  })();
  return { image: name, version, chunks: counts };
}

export function listImages(ctx: Ctx) {
  const imgs = q(ctx.db, 'SELECT * FROM images ORDER BY name').all() as ImageRow[];
  return imgs.map((img) => {
    const versions = q(ctx.db, 
        "SELECT version, state, committed_at, disk_size, mem_size, state_size, device_id, base, promoted_at FROM versions WHERE image_id = ? AND state != 'removed' ORDER BY version",
      )
      .all(img.id) as VersionRow[];
    const trusted = q(ctx.db, 'SELECT device_id FROM trusted_tracers WHERE image_id = ? ORDER BY trusted_at, device_id').all(img.id) as { device_id: string }[];
    return {
      name: img.name,
      imageId: img.id,
      current: img.current_version,
      stored: storedBytes(ctx, img.id),
      versions: versions.map((v) => ({
        version: v.version,
        state: v.state,
        committedAt: v.committed_at === null ? null : iso(v.committed_at),
        sizes: { disk: v.disk_size, mem: v.mem_size, state: v.state_size },
        // A device branch: whose, on which version, and when it was made shared (null: not yet).
        ...(v.device_id === null ? {} : { device: v.device_id, base: v.base, promotedAt: v.promoted_at === null ? null : iso(v.promoted_at) }),
      })),
      trustedTracers: trusted.map((r) => r.device_id),
    };
  });
}

/** The manifest of a version, signed by the server's Ed25519 key. */
export function manifest(ctx: Ctx, img: ImageRow, v: VersionRow) {
  const rows = q(ctx.db, 'SELECT kind, idx, gen, cls, ct_sha256 FROM chunks WHERE image_id = ? AND version = ? ORDER BY kind, idx')
    .all(img.id, v.version) as ChunkRow[];
  const chunks: Record<ChunkKind, [number, number, Sensitivity, string][]> = { disk: [], mem: [], state: [] };
  for (const r of rows) chunks[r.kind].push([r.idx, r.gen, r.cls, r.ct_sha256.toString('base64url')]);
  const body = {
    format: 1,
    image: img.name,
    imageId: img.id,
    version: v.version,
    sizes: { disk: v.disk_size, mem: v.mem_size, state: v.state_size },
    chunkSizes: CHUNK_SIZE,
    chunks,
  };
  const signature = b64u.encode(sign(ctx.data.signingKey, Buffer.from(`${MANIFEST_CONTEXT}\n${sha256(canonical(body)).toString('hex')}`)));
  return { ...body, signature };
}

export function chunkRow(ctx: Ctx, imageId: string, version: number, kind: ChunkKind, index: number): ChunkRow | undefined {
  return q(ctx.db, 'SELECT kind, idx, gen, cls, ct_sha256 FROM chunks WHERE image_id = ? AND version = ? AND kind = ? AND idx = ?')
    .get(imageId, version, kind, index) as ChunkRow | undefined;
}

export function readBlob(ctx: Ctx, imageId: string, row: ChunkRow): Buffer {
  const b = q(ctx.store, 'SELECT data FROM blobs WHERE image_id = ? AND gen = ? AND kind = ? AND idx = ?')
    .get(imageId, row.gen, row.kind, row.idx) as { data: Buffer } | undefined;
  if (!b) throw new LetheError('INTERNAL', `chunk store is missing ${row.kind} chunk ${row.idx} (generation ${row.gen})`);
  return b.data;
}
