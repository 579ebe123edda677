// The set-up every suite that resumes the test guest shares: boot the guest under
// TCG and save it (`lethe vm snapshot`), push it to a real server as one or more
// images, each with its policy, then drop the plaintext source: from then on the
// devices see only ciphertext.
import fs from 'node:fs';
import path from 'node:path';
import { expect } from 'chai';
import { lethe, tmpDir, type ServerProc } from './proc.js';

export interface VmSnapshot {
  dir: string;
  /** The planted marker the workload writes into its sensitive pages. */
  marker: Buffer;
}

/** 128 MiB of guest RAM with a 16 MiB workload that verifies every page each `intervalS` (the guest's default without). */
export async function snapshotGuest(prefix: string, o: { intervalS?: number } = {}): Promise<VmSnapshot> {
  const dir = path.join(tmpDir(prefix), 'snap');
  const interval = o.intervalS === undefined ? [] : ['--interval', `${o.intervalS}s`];
  const shot = await lethe(['vm', 'snapshot', '--out', dir, '--mem', '128M', '--workload-mib', '16', ...interval, '--accel', 'tcg', '--json']);
  expect(shot.code, shot.stderr).to.equal(0);
  return { dir, marker: Buffer.from(JSON.parse(shot.stdout).marker as string) };
}

export interface DebianSnapshot extends VmSnapshot {
  /** The comment of the key ssh-agent holds (guest-driver/debian/guest/agents-start). */
  sshMarker: Buffer;
  bootToReadySeconds: number;
}

/**
 * The Debian 12 guest (docs/debian-guest.md): 256 MiB of RAM, a 16 MiB workload, the
 * user's ssh-agent listing its keys every `sshEveryS`, the driver restarted every
 * `guestdRestartsS` (never without).
 */
export async function snapshotDebian(prefix: string, o: { sshEveryS: number; guestdRestartsS?: number }): Promise<DebianSnapshot> {
  const dir = path.join(tmpDir(prefix), 'snap');
  const restarts = o.guestdRestartsS === undefined ? [] : ['--guestd-restarts', `${o.guestdRestartsS}s`];
  const args = ['vm', 'snapshot', '--guest', 'debian', '--out', dir, '--mem', '256M', '--workload-mib', '16', '--ssh-every', `${o.sshEveryS}s`, ...restarts];
  const shot = await lethe([...args, '--accel', 'tcg', '--timeout', '10m', '--json']);
  expect(shot.code, shot.stderr).to.equal(0);
  const out = JSON.parse(shot.stdout) as { marker: string; sshMarker: string; bootToReadySeconds: number };
  return { dir, marker: Buffer.from(out.marker), sshMarker: Buffer.from(out.sshMarker), bootToReadySeconds: out.bootToReadySeconds };
}

/** Pushes the snapshot as image `name`, under `policy` (YAML text) when given. */
export async function pushSnapshot(s: ServerProc, snap: VmSnapshot, name: string, policy?: string): Promise<void> {
  const files = ['--disk', path.join(snap.dir, 'disk.raw'), '--memory', path.join(snap.dir, 'ram.bin'), '--state', path.join(snap.dir, 'state.bin')];
  let policyArgs: string[] = [];
  if (policy !== undefined) {
    const file = path.join(path.dirname(snap.dir), `${name}.policy.yaml`);
    fs.writeFileSync(file, policy);
    policyArgs = ['--policy', file];
  }
  const r = await lethe(['image', 'push', name, ...files, ...policyArgs], s.env);
  expect(r.code, r.stderr).to.equal(0);
}

/** The plaintext source goes: what the devices get is the server's ciphertext. */
export function dropSnapshot(snap: VmSnapshot): void {
  fs.rmSync(path.dirname(snap.dir), { recursive: true, force: true });
}
