// Images: named series of versions; each version is a manifest of encrypted
// chunks (docs/chunk-format.md). An admin uploads plaintext over TLS; the
// server encrypts it with the version's keys, skips zero chunks, and keeps an
// unchanged chunk under the generation that first wrote it.
import { randomBytes } from 'node:crypto';
import { CHUNK_KINDS, CHUNK_SIZE, MANIFEST_CONTEXT, MEM_CHUNK_SIZE, type ChunkKind, type Sensitivity } from '../common/constants.js';
import { canonical } from '../common/audit-hash.js';
import { encryptChunk, isZero, type ChunkCoord } from '../common/chunk.js';
import { b64u, keyedHash, sha256, sign, wipe } from '../common/crypto.js';
import { iso } from '../common/duration.js';
import { LetheError } from '../common/errors.js';
import { classOf, parsePolicy, type ServerPolicy } from '../policies/policy.js';
import type { Ctx } from './context.js';

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
  state: 'draft' | 'committed';
  created_at: number;
  committed_at: number | null;
  key_wrapped: Buffer;
  disk_size: number;
  mem_size: number;
  state_size: number;
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
  const img = ctx.db.prepare('SELECT * FROM images WHERE name = ?').get(name) as ImageRow | undefined;
  if (!img) throw new LetheError('UNKNOWN_IMAGE', `no image '${name}'`, { hint: "list images with 'lethe image ls'" });
  return img;
}

export function getVersion(ctx: Ctx, img: ImageRow, version: number): VersionRow {
  const v = ctx.db.prepare('SELECT * FROM versions WHERE image_id = ? AND version = ?').get(img.id, version) as
    | VersionRow
    | undefined;
  if (!v) throw new LetheError('UNKNOWN_VERSION', `image '${img.name}' has no version ${version}`);
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

export const policyOf = (img: ImageRow): ServerPolicy => parsePolicy(img.policy, `policy of '${img.name}'`);

export function createImage(ctx: Ctx, name: string, policy?: string) {
  parsePolicy(policy, 'policy');
  if (ctx.db.prepare('SELECT 1 FROM images WHERE name = ?').get(name)) {
    throw new LetheError('CONFLICT', `image '${name}' already exists`);
  }
  const id = randomBytes(16);
  const now = ctx.now();
  ctx.db.transaction(() => {
    ctx.db
      .prepare('INSERT INTO images(id, name, created_at, policy, dedup_key_wrapped) VALUES (?, ?, ?, ?, ?)')
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
  const draft = ctx.db.prepare("SELECT version FROM versions WHERE image_id = ? AND state = 'draft'").get(img.id) as
    | { version: number }
    | undefined;
  if (draft) {
    // Resuming an interrupted push: the draft is reused if the sizes match.
    const v = getVersion(ctx, img, draft.version);
    if (v.disk_size === sizes.disk && v.mem_size === sizes.mem && v.state_size === sizes.state) {
      return { image: name, version: v.version, resumed: true };
    }
    ctx.db.transaction(() => {
      ctx.db.prepare('DELETE FROM chunks WHERE image_id = ? AND version = ?').run(img.id, v.version);
      ctx.db.prepare('DELETE FROM versions WHERE image_id = ? AND version = ?').run(img.id, v.version);
    })();
  }
  const last = ctx.db.prepare('SELECT MAX(version) AS v FROM versions WHERE image_id = ?').get(img.id) as { v: number | null };
  const version = (last.v ?? 0) + 1;
  const imageId = Buffer.from(img.id, 'hex');
  ctx.db.transaction(() => {
    ctx.db
      .prepare(
        "INSERT INTO versions(image_id, version, state, created_at, key_wrapped, disk_size, mem_size, state_size) VALUES (?, ?, 'draft', ?, ?, ?, ?, ?)",
      )
      .run(img.id, version, ctx.now(), ctx.escrow.newWrappedKey(imageId, version, 'version'), sizes.disk, sizes.mem, sizes.state);
    if (img.current_version !== null) {
      ctx.db
        .prepare(
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

/** Stores one plaintext chunk of a draft; returns whether it was new, unchanged or zero. */
export function putChunk(ctx: Ctx, name: string, version: number, kind: ChunkKind, index: number, plaintext: Buffer) {
  const img = getImage(ctx, name);
  const v = draftVersion(ctx, img, version);
  const size = sizeOf(v, kind);
  const count = chunkCount(size, kind);
  if (index >= count) {
    throw new LetheError('BAD_REQUEST', `${kind} chunk ${index} is past the end (the ${kind} has ${count} chunks)`);
  }
  const expect = Math.min(CHUNK_SIZE[kind], size - index * CHUNK_SIZE[kind]);
  if (plaintext.length !== expect) {
    throw new LetheError('BAD_REQUEST', `${kind} chunk ${index} is ${plaintext.length} bytes, expected ${expect}`);
  }
  const del = ctx.db.prepare('DELETE FROM chunks WHERE image_id = ? AND version = ? AND kind = ? AND idx = ?');
  if (isZero(plaintext)) {
    del.run(img.id, version, kind, index);
    return { stored: 'zero' as const };
  }
  const imageId = Buffer.from(img.id, 'hex');
  const dedup = keyedHash(ctx.escrow.dedupKey(img.dedup_key_wrapped, imageId), plaintext);
  const cls = classOf(policyOf(img), kind, index * CHUNK_SIZE[kind], plaintext.length);
  const existing = ctx.db
    .prepare('SELECT dedup_hash, cls FROM chunks WHERE image_id = ? AND version = ? AND kind = ? AND idx = ?')
    .get(img.id, version, kind, index) as { dedup_hash: Buffer; cls: string } | undefined;
  if (existing && existing.cls === cls && existing.dedup_hash.equals(dedup)) return { stored: 'unchanged' as const };

  const coord: ChunkCoord = { imageId, gen: version, kind, index, cls };
  const key = ctx.escrow.chunkKeyFor(ctx.escrow.versionKey(v.key_wrapped, imageId, version), coord);
  let blob: Buffer;
  try {
    blob = encryptChunk(key, coord, plaintext);
  } finally {
    wipe(key);
  }
  ctx.store
    .prepare('INSERT OR REPLACE INTO blobs(image_id, gen, kind, idx, data) VALUES (?, ?, ?, ?, ?)')
    .run(img.id, version, kind, index, blob);
  ctx.db
    .prepare('INSERT OR REPLACE INTO chunks(image_id, version, kind, idx, gen, cls, ct_sha256, dedup_hash) VALUES (?, ?, ?, ?, ?, ?, ?, ?)')
    .run(img.id, version, kind, index, version, cls, sha256(blob), dedup);
  return { stored: 'new' as const };
}

export function commitVersion(ctx: Ctx, name: string, version: number) {
  const img = getImage(ctx, name);
  const v = draftVersion(ctx, img, version);
  const now = ctx.now();
  const counts: Record<string, number> = {};
  ctx.db.transaction(() => {
    for (const kind of CHUNK_KINDS) {
      ctx.db
        .prepare('DELETE FROM chunks WHERE image_id = ? AND version = ? AND kind = ? AND idx >= ?')
        .run(img.id, version, kind, chunkCount(sizeOf(v, kind), kind));
      counts[kind] = (
        ctx.db.prepare('SELECT COUNT(*) AS n FROM chunks WHERE image_id = ? AND version = ? AND kind = ?').get(img.id, version, kind) as {
          n: number;
        }
      ).n;
    }
    ctx.db.prepare("UPDATE versions SET state = 'committed', committed_at = ? WHERE image_id = ? AND version = ?").run(now, img.id, version);
    ctx.db.prepare('UPDATE images SET current_version = ? WHERE id = ?').run(version, img.id);
    ctx.audit.append('version.commit', null, { image: name, version, chunks: counts }, now);
  })();
  return { image: name, version, chunks: counts };
}

export function listImages(ctx: Ctx) {
  const imgs = ctx.db.prepare('SELECT * FROM images ORDER BY name').all() as ImageRow[];
  return imgs.map((img) => {
    const versions = ctx.db
      .prepare('SELECT version, state, committed_at, disk_size, mem_size, state_size FROM versions WHERE image_id = ? ORDER BY version')
      .all(img.id) as VersionRow[];
    return {
      name: img.name,
      imageId: img.id,
      current: img.current_version,
      versions: versions.map((v) => ({
        version: v.version,
        state: v.state,
        committedAt: v.committed_at === null ? null : iso(v.committed_at),
        sizes: { disk: v.disk_size, mem: v.mem_size, state: v.state_size },
      })),
    };
  });
}

/** The manifest of a version, signed by the server's Ed25519 key. */
export function manifest(ctx: Ctx, img: ImageRow, v: VersionRow) {
  const rows = ctx.db
    .prepare('SELECT kind, idx, gen, cls, ct_sha256 FROM chunks WHERE image_id = ? AND version = ? ORDER BY kind, idx')
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
  return ctx.db
    .prepare('SELECT kind, idx, gen, cls, ct_sha256 FROM chunks WHERE image_id = ? AND version = ? AND kind = ? AND idx = ?')
    .get(imageId, version, kind, index) as ChunkRow | undefined;
}

export function readBlob(ctx: Ctx, imageId: string, row: ChunkRow): Buffer {
  const b = ctx.store
    .prepare('SELECT data FROM blobs WHERE image_id = ? AND gen = ? AND kind = ? AND idx = ?')
    .get(imageId, row.gen, row.kind, row.idx) as { data: Buffer } | undefined;
  if (!b) throw new LetheError('INTERNAL', `chunk store is missing ${row.kind} chunk ${row.idx} (generation ${row.gen})`);
  return b.data;
}
