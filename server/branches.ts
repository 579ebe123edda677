// Device branches and trusted tracers (docs/branches.md; DESIGN invariant 11):
// a device's check-in makes a version only that device resumes, until an admin
// promotes it or the image's policy says it has a single user; a device's
// first-touch trace reaches other devices only once an admin trusts it.
import { LetheError } from '../common/errors.js';
import { inTx, type Ctx } from './context.js';
import { mustGetDevice } from './devices.js';
import { currentVersion, getImage, getVersion, type ImageRow, type VersionRow } from './images.js';

interface BranchLink {
  device_id: string | null;
  base: number | null;
}

/**
 * True when `head` descends from `shared` through this device's own check-ins
 * only: `head` is `shared`, or each version back from it was checked in by the
 * device on a lease of the one before, down to `shared`.
 */
async function descendsFrom(ctx: Ctx, imageId: string, deviceId: string, head: number, shared: number): Promise<boolean> {
  let v = head;
  // Bases are older versions, so the walk ends.
  for (;;) {
    if (v === shared) return true;
    const row = await ctx.db.get<BranchLink>('SELECT device_id, base FROM versions WHERE image_id = ? AND version = ?', imageId, v);
    if (!row || row.device_id !== deviceId || row.base === null || row.base >= v) return false;
    v = row.base;
  }
}

/**
 * The version a device's next lease on the image starts from: its newest
 * committed branch when that descends from the image's shared (current)
 * version, else the shared version. A newer shared version (an admin's push,
 * or a promotion) therefore wins over a branch made on an older one; the
 * branch stays listed and can still be promoted. Throws UNKNOWN_VERSION when
 * the image has no committed version.
 */
export async function resumeVersion(ctx: Ctx, deviceId: string, img: ImageRow): Promise<VersionRow> {
  const shared = await currentVersion(ctx, img);
  const head = await ctx.db.get<{ version: number }>(
    "SELECT version FROM versions WHERE image_id = ? AND device_id = ? AND state = 'committed' ORDER BY version DESC LIMIT 1",
    img.id,
    deviceId,
  );
  if (!head || head.version === shared.version) return shared;
  return (await descendsFrom(ctx, img.id, deviceId, head.version, shared.version)) ? getVersion(ctx, img, head.version) : shared;
}

/**
 * Makes a device branch the image's shared version, which every assigned
 * device's next lease starts from. Audited as `version.promote` with the device
 * it came from; promoting the version that is already current changes nothing.
 * Throws UNKNOWN_VERSION, VERSION_DRAFT (not checked in yet) or NOT_A_BRANCH (an
 * admin's push, shared when committed). Call inside no transaction.
 */
export async function promoteVersion(ctx: Ctx, name: string, version: number, auto = false) {
  const img = await getImage(ctx, name);
  const v = (await getVersion(ctx, img, version)) as VersionRow & BranchLink;
  if (v.state === 'draft') {
    throw new LetheError('VERSION_DRAFT', `${name}@${version} is a draft: its device has not checked it in`, {
      hint: "promote a committed version; 'lethe image ls' lists them",
    });
  }
  if (v.device_id === null) {
    throw new LetheError('NOT_A_BRANCH', `${name}@${version} is not a device branch: an admin pushed it`, {
      hint: `to make it current again, push it anew ('lethe image pull ${name}@${version}', then 'lethe image push')`,
    });
  }
  const previous = img.current_version;
  if (previous === version) return { image: name, version, device: v.device_id, previous, changed: false };
  const now = ctx.now();
  await inTx(ctx, (ctx) => makeShared(ctx, img, version, v.device_id!, v.base, now, auto));
  return { image: name, version, device: v.device_id, previous, changed: true };
}

/** Sets the shared version and audits it; call inside the caller's transaction. */
export async function makeShared(ctx: Ctx, img: ImageRow, version: number, deviceId: string, base: number | null, now: number, auto: boolean): Promise<void> {
  await ctx.db.run('UPDATE versions SET promoted_at = ? WHERE image_id = ? AND version = ?', now, img.id, version);
  await ctx.db.run('UPDATE images SET current_version = ? WHERE id = ?', version, img.id);
  await ctx.audit.append(
    'version.promote',
    deviceId,
    { image: img.name, version, device: deviceId, base, previous: img.current_version, ...(auto ? { auto: true } : {}) },
    now,
  );
}

/** Trusts (or stops trusting) a device's traces for every device on the image; audited when it changes anything. */
export async function setTrusted(ctx: Ctx, name: string, deviceId: string, trusted: boolean) {
  await mustGetDevice(ctx, deviceId);
  const img = await getImage(ctx, name);
  const now = ctx.now();
  let changed = false;
  await inTx(ctx, async (ctx) => {
    const r = trusted
      ? await ctx.db.run('INSERT INTO trusted_tracers(image_id, device_id, trusted_at) VALUES (?, ?, ?) ON CONFLICT DO NOTHING', img.id, deviceId, now)
      : await ctx.db.run('DELETE FROM trusted_tracers WHERE image_id = ? AND device_id = ?', img.id, deviceId);
    changed = r.changes === 1;
    if (changed) await ctx.audit.append(trusted ? 'image.trust' : 'image.untrust', deviceId, { image: name }, now);
  });
  return { image: name, device: deviceId, trusted, changed };
}
