// A version's manifest, signed by the server's Ed25519 key: the JSON of format 1 (admin
// pulls, older agents) and the packed format 2 agents ask for (common/manifest.ts).
import { canonical } from '../common/audit-hash.js';
import { CHUNK_SIZE, MANIFEST_CONTEXT, type ChunkKind, type Sensitivity } from '../common/constants.js';
import { b64u, sha256, sign } from '../common/crypto.js';
import { encodeManifest, type ChunkRowOf } from '../common/manifest.js';
import type { Ctx } from './context.js';
import type { ChunkRow, ImageRow, VersionRow } from './images.js';

/** The manifest of a version, signed by the server's Ed25519 key. */
export async function manifest(ctx: Ctx, img: ImageRow, v: VersionRow) {
  const rows = await ctx.db.all<ChunkRow>('SELECT kind, idx, gen, cls, ct_sha256 FROM chunks WHERE image_id = ? AND version = ? ORDER BY kind, idx', img.id, v.version);
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

/** The manifest of a version as a device reads it (format 2, common/manifest.ts): packed records, signed by the server's key. */
export async function packedManifest(ctx: Ctx, img: ImageRow, v: VersionRow): Promise<Buffer> {
  const rows = await ctx.db.all<ChunkRow>('SELECT kind, idx, gen, cls, ct_sha256 FROM chunks WHERE image_id = ? AND version = ? ORDER BY kind, idx', img.id, v.version);
  const chunks: Record<ChunkKind, ChunkRowOf[]> = { disk: [], mem: [], state: [] };
  for (const r of rows) chunks[r.kind].push({ idx: r.idx, gen: r.gen, cls: r.cls, sha: r.ct_sha256 });
  const head = { format: 2, image: img.name, imageId: img.id, version: v.version, sizes: { disk: v.disk_size, mem: v.mem_size, state: v.state_size }, chunkSizes: CHUNK_SIZE };
  return encodeManifest(head, chunks, ctx.data.signingKey);
}
