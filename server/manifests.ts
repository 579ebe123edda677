// A version's manifest, signed by the server's Ed25519 key: the JSON of format 1 (admin
// pulls, older agents) and the packed format 2 agents ask for (common/manifest.ts).
//
// A disk of 200 GiB has 1.6 million chunk rows. Read as row objects they took the
// server 13 s, on its event loop, for every lease grant. Instead the database packs
// the records itself, a page of rows per query, and a committed version's signed
// manifest, which never changes, is kept in memory (docs/fleet.md, "Manifests at size").
import { canonical } from '../common/audit-hash.js';
import { CHUNK_KINDS, CHUNK_SIZE, MANIFEST_CONTEXT, type ChunkKind, type Sensitivity } from '../common/constants.js';
import { b64u, sha256, sign } from '../common/crypto.js';
import { MANIFEST_RECORD, classOfCode, encodeRecords, type ManifestHead } from '../common/manifest.js';
import type { Ctx } from './context.js';
import type { ImageRow, VersionRow } from './images.js';
import type { Sql } from './sql.js';

/** Rows a query packs: on SQLite a page holds the event loop 20–70 ms. */
export const MANIFEST_PAGE_ROWS = 16_384;

/** The signed packed manifests of committed versions this process keeps, by bytes (a 200 GiB disk's is 67 MB). */
export const MANIFEST_CACHE_BYTES = 256 * 1024 * 1024;

/** One page of a kind's records, packed by the database: u32 index, u32 generation, u8 class, SHA-256 (common/manifest.ts). */
const PAGE_SQL = {
  sqlite: `SELECT COUNT(*) AS n, MAX(idx) AS last,
      group_concat(printf('%08X%08X%02X', idx, gen, CASE cls WHEN 'normal' THEN 1 WHEN 'sensitive' THEN 2 ELSE 0 END) || hex(ct_sha256), '' ORDER BY idx) AS rec
    FROM (SELECT idx, gen, cls, ct_sha256 FROM chunks WHERE image_id = ? AND version = ? AND kind = ? AND idx > ? ORDER BY idx LIMIT ?)`,
  postgres: `SELECT COUNT(*)::int AS n, MAX(idx) AS last,
      string_agg(int4send(idx) || int4send(gen) || CASE cls WHEN 'normal' THEN '\\x01'::bytea WHEN 'sensitive' THEN '\\x02'::bytea ELSE '\\x00'::bytea END || ct_sha256, ''::bytea ORDER BY idx) AS rec
    FROM (SELECT idx, gen, cls, ct_sha256 FROM chunks WHERE image_id = ? AND version = ? AND kind = ? AND idx > CAST(? AS INTEGER) ORDER BY idx LIMIT CAST(? AS INTEGER)) s`,
};

/**
 * A version's stored chunks of each kind as format-2 records, in index order: a
 * buffer per page of rows, one query each. A committed version's rows do not change,
 * so its pages are read outside a transaction, between other requests; a draft's on
 * one snapshot.
 */
async function versionRecords(ctx: Ctx, imageId: string, v: VersionRow): Promise<Record<ChunkKind, Buffer[]>> {
  const out = {} as Record<ChunkKind, Buffer[]>;
  const read = async (t: Sql) => {
    for (const kind of CHUNK_KINDS) {
      const pages: Buffer[] = (out[kind] = []);
      for (let last = -1; ; ) {
        const p = await t.get<{ n: number; last: number | null; rec: string | Buffer | null }>(PAGE_SQL[t.dialect], imageId, v.version, kind, last, MANIFEST_PAGE_ROWS);
        if (!p || p.n === 0 || p.last === null || p.rec === null) break;
        pages.push(typeof p.rec === 'string' ? Buffer.from(p.rec, 'hex') : p.rec);
        if (p.n < MANIFEST_PAGE_ROWS) break;
        last = p.last;
        // SQLite answers at once, in the same turn: let other requests in between pages.
        await new Promise((r) => setImmediate(r));
      }
    }
  };
  await (v.state === 'committed' ? read(ctx.db) : ctx.db.snapshot(read));
  return out;
}

function head(img: ImageRow, v: VersionRow, format: number): ManifestHead {
  return { format, image: img.name, imageId: img.id, version: v.version, sizes: { disk: v.disk_size, mem: v.mem_size, state: v.state_size }, chunkSizes: CHUNK_SIZE };
}

/** The manifest of a version, signed by the server's Ed25519 key. */
export async function manifest(ctx: Ctx, img: ImageRow, v: VersionRow) {
  const records = await versionRecords(ctx, img.id, v);
  const chunks = {} as Record<ChunkKind, [number, number, Sensitivity, string][]>;
  for (const kind of CHUNK_KINDS) {
    const list: [number, number, Sensitivity, string][] = (chunks[kind] = []);
    for (const r of records[kind]) {
      for (let at = 0; at < r.length; at += MANIFEST_RECORD) {
        list.push([r.readUInt32BE(at), r.readUInt32BE(at + 4), classOfCode(r[at + 8]), b64u.encode(r.subarray(at + 9, at + MANIFEST_RECORD))]);
      }
    }
  }
  const body = { ...head(img, v, 1), chunks };
  const signature = b64u.encode(sign(ctx.data.signingKey, Buffer.from(`${MANIFEST_CONTEXT}\n${sha256(canonical(body)).toString('hex')}`)));
  return { ...body, signature };
}

/** Signed packed manifests of committed versions, least recently used first; one per data dir (signing key). */
const caches = new WeakMap<object, Map<string, Buffer>>();

/**
 * The manifest of a version as a device reads it (format 2, common/manifest.ts): packed
 * records, signed by the server's key. A committed version's never changes (its rows
 * are fixed, a removed one is not leased), so it is made once and kept, up to
 * MANIFEST_CACHE_BYTES; the key names the image and the commit too.
 */
export async function packedManifest(ctx: Ctx, img: ImageRow, v: VersionRow): Promise<Buffer> {
  let cache = caches.get(ctx.data);
  if (!cache) caches.set(ctx.data, (cache = new Map()));
  const key = `${img.id}/${v.version}/${v.committed_at}/${img.name}`;
  const kept = v.state === 'committed' ? cache.get(key) : undefined;
  if (kept) {
    cache.delete(key);
    cache.set(key, kept);
    ctx.metrics.inc('lethe_manifests_total', { from: 'memory' });
    return kept;
  }
  const out = encodeRecords(head(img, v, 2), await versionRecords(ctx, img.id, v), ctx.data.signingKey);
  ctx.metrics.inc('lethe_manifests_total', { from: 'database' });
  // A version removed while its pages were read may have lost rows in between: not kept.
  const still = v.state === 'committed' && (await ctx.db.get<{ state: string }>('SELECT state FROM versions WHERE image_id = ? AND version = ?', img.id, v.version));
  if (still && still.state === 'committed' && out.length <= MANIFEST_CACHE_BYTES) {
    cache.set(key, out);
    let bytes = 0;
    for (const b of cache.values()) bytes += b.length;
    for (const [k, b] of cache) {
      if (bytes <= MANIFEST_CACHE_BYTES) break;
      cache.delete(k);
      bytes -= b.length;
    }
  }
  return out;
}
