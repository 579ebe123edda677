// Master-key rotation without decrypting a chunk (docs/fleet.md, Key rotation).
// The master key (a file every replica holds) wraps the keyring's term keys,
// stored in the database; the newest term wraps image and version keys. A
// rotation adds a term, rewraps every image key under it and deletes the older
// terms: the keys themselves, and so every chunk key, stay the same.
import { randomKey, wipe } from '../common/crypto.js';
import { inTx, type Ctx } from './context.js';
import { termOf } from './escrow.js';

/** Serialises rotations with every wrap of a new key, on every replica. */
const KEYRING_LOCK = 'lethe.keyring';

/** Loads the keyring from the database into the escrow. */
export async function loadKeyring(ctx: Ctx): Promise<void> {
  ctx.escrow.setKeyring(await ctx.db.all<{ term: number; wrapped: Buffer }>('SELECT term, wrapped FROM master_keys ORDER BY term'));
}

/** Makes sure the escrow can unwrap `wrapped` (another replica may have rotated since). */
export async function ensureTerms(ctx: Ctx, ...wrapped: Buffer[]): Promise<void> {
  if (!ctx.escrow.hasTerms(...wrapped)) await loadKeyring(ctx);
}

/** A fresh key wrapped under the keyring's current term; call inside the transaction that stores it. */
export async function wrapNewKey(ctx: Ctx, imageId: Buffer, gen: number, purpose: 'version' | 'dedup'): Promise<Buffer> {
  await ctx.db.lock(KEYRING_LOCK);
  await loadKeyring(ctx);
  return ctx.escrow.newWrappedKey(imageId, gen, purpose);
}

/**
 * Adds a keyring term, rewraps every image's dedup key and every version key
 * under it, and deletes the older terms; audited as `master.rotate`.
 */
export async function rotateMaster(ctx: Ctx) {
  const now = ctx.now();
  try {
    const r = await inTx(ctx, async (ctx) => {
      await ctx.db.lock(KEYRING_LOCK);
      await loadKeyring(ctx);
      const previous = ctx.escrow.currentTerm;
      const term = previous + 1;
      const key = randomKey();
      try {
        await ctx.db.run('INSERT INTO master_keys(term, wrapped, created_at) VALUES (?, ?, ?)', term, ctx.escrow.wrapTermKey(term, key), now);
      } finally {
        wipe(key);
      }
      await loadKeyring(ctx);
      const images = await ctx.db.all<{ id: string; dedup_key_wrapped: Buffer }>('SELECT id, dedup_key_wrapped FROM images');
      for (const img of images) {
        const wrapped = ctx.escrow.rewrap(img.dedup_key_wrapped, Buffer.from(img.id, 'hex'), 0, 'dedup');
        await ctx.db.run('UPDATE images SET dedup_key_wrapped = ? WHERE id = ?', wrapped, img.id);
      }
      const versions = await ctx.db.all<{ image_id: string; version: number; key_wrapped: Buffer }>('SELECT image_id, version, key_wrapped FROM versions');
      for (const v of versions) {
        const wrapped = ctx.escrow.rewrap(v.key_wrapped, Buffer.from(v.image_id, 'hex'), v.version, 'version');
        await ctx.db.run('UPDATE versions SET key_wrapped = ? WHERE image_id = ? AND version = ?', wrapped, v.image_id, v.version);
      }
      const retired = await ctx.db.run('DELETE FROM master_keys WHERE term <> ?', term);
      await ctx.audit.append('master.rotate', null, { term, previous, images: images.length, versions: versions.length, termsRetired: retired.changes }, now);
      return { term, previous, images: images.length, versions: versions.length, termsRetired: retired.changes };
    });
    return r;
  } finally {
    // As committed (or, after a failure, as before): the retired terms' keys are wiped.
    await loadKeyring(ctx);
    ctx.escrow.dropCache();
  }
}

export { termOf };
