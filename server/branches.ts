// Device branches and trusted tracers (docs/branches.md; DESIGN invariant 11):
// a device's check-in makes a version only that device resumes, until an admin
// promotes it or the image's policy says it has a single user; a device's
// first-touch trace reaches other devices only once an admin trusts it.
import { LetheError } from '../common/errors.js';
import type { Ctx } from './context.js';
import { q } from './db.js';
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
function descendsFrom(ctx: Ctx, imageId: string, deviceId: string, head: number, shared: number): boolean {
  const link = q(ctx.db, 'SELECT device_id, base FROM versions WHERE image_id = ? AND version = ?');
  let v = head;
  // Bases are older versions, so the walk ends.
  for (;;) {
    if (v === shared) return true;
    const row = link.get(imageId, v) as BranchLink | undefined;
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
export function resumeVersion(ctx: Ctx, deviceId: string, img: ImageRow): VersionRow {
  const shared = currentVersion(ctx, img);
  const head = q(ctx.db, "SELECT version FROM versions WHERE image_id = ? AND device_id = ? AND state = 'committed' ORDER BY version DESC LIMIT 1")
    .get(img.id, deviceId) as { version: number } | undefined;
  if (!head || head.version === shared.version) return shared;
  return descendsFrom(ctx, img.id, deviceId, head.version, shared.version) ? getVersion(ctx, img, head.version) : shared;
}

/**
 * Makes a device branch the image's shared version, which every assigned
 * device's next lease starts from. Audited as `version.promote` with the device
 * it came from; promoting the version that is already current changes nothing.
 * Throws UNKNOWN_VERSION, VERSION_DRAFT (not checked in yet) or NOT_A_BRANCH (an
 * admin's push, shared when committed). Call inside no transaction.
 */
export function promoteVersion(ctx: Ctx, name: string, version: number, auto = false) {
  const img = getImage(ctx, name);
  const v = getVersion(ctx, img, version) as VersionRow & BranchLink;
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
  ctx.db.transaction(() => {
    makeShared(ctx, img, version, v.device_id!, v.base, now, auto);
  })();
  return { image: name, version, device: v.device_id, previous, changed: true };
}

/** Sets the shared version and audits it; call inside the caller's transaction. */
export function makeShared(ctx: Ctx, img: ImageRow, version: number, deviceId: string, base: number | null, now: number, auto: boolean): void {
  q(ctx.db, 'UPDATE versions SET promoted_at = ? WHERE image_id = ? AND version = ?').run(now, img.id, version);
  q(ctx.db, 'UPDATE images SET current_version = ? WHERE id = ?').run(version, img.id);
  ctx.audit.append(
    'version.promote',
    deviceId,
    { image: img.name, version, device: deviceId, base, previous: img.current_version, ...(auto ? { auto: true } : {}) },
    now,
  );
}

/** Trusts (or stops trusting) a device's traces for every device on the image; audited when it changes anything. */
export function setTrusted(ctx: Ctx, name: string, deviceId: string, trusted: boolean) {
  mustGetDevice(ctx, deviceId);
  const img = getImage(ctx, name);
  const now = ctx.now();
  let changed = false;
  ctx.db.transaction(() => {
    const r = trusted
      ? q(ctx.db, 'INSERT OR IGNORE INTO trusted_tracers(image_id, device_id, trusted_at) VALUES (?, ?, ?)').run(img.id, deviceId, now)
      : q(ctx.db, 'DELETE FROM trusted_tracers WHERE image_id = ? AND device_id = ?').run(img.id, deviceId);
    changed = r.changes === 1;
    if (changed) ctx.audit.append(trusted ? 'image.trust' : 'image.untrust', deviceId, { image: name }, now);
  })();
  return { image: name, device: deviceId, trusted, changed };
}
