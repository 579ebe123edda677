// Where the built test guest lives, read without building: an agent resuming the
// guest needs only its kernel and initramfs, and checking the build (build.ts) asks
// apt-cache for package versions, about two seconds a call, on every resume.
import fs from 'node:fs';
import path from 'node:path';
import { fileURLToPath } from 'node:url';

export const ROOT = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '..');
export const DEFAULT_GUEST_DIR = path.join(ROOT, 'build', 'guest');
export const GUEST_FILES = { vmlinux: 'vmlinux', initramfs: 'initramfs.cpio.gz', disk: 'data.ext4', busybox: 'busybox' } as const;

/**
 * The kernel and initramfs of the guest built in `dir`, or undefined when it has not
 * been built (or its manifest is missing). A resume does not need the newest build:
 * the guest's kernel and memory come from the snapshot, QEMU loads these only to
 * lay out the same devices.
 */
export function builtGuestBoot(dir = DEFAULT_GUEST_DIR): { vmlinux: string; initramfs: string } | undefined {
  const boot = { vmlinux: path.join(dir, GUEST_FILES.vmlinux), initramfs: path.join(dir, GUEST_FILES.initramfs) };
  const complete = [path.join(dir, 'manifest.json'), boot.vmlinux, boot.initramfs].every((f) => fs.existsSync(f));
  return complete ? boot : undefined;
}
