// Who may connect to the agent's NBD export. The export is the VM's disk in
// plaintext and NBD has no authentication, so the unix socket (0600, in the device
// home) is not enough on its own: any program of the user could read the disk
// through it. By default only the QEMU this agent started is served, told apart by
// the pid the kernel records when it connects (SO_PEERCRED). A connection made
// before that QEMU was spawned cannot be from it and is refused, not held: the
// agent records QEMU's pid when spawn() returns, before QEMU can connect.
// `--nbd-peers user` opts in to any process of the agent's user (qemu-io, nbdcopy,
// nbdinfo, a QEMU of one's own).
import type { PeerCredentials } from '../../../native/index.js';
import { runningQemuPids } from '../../vm/qemu.js';

export const NBD_PEERS = ['qemu', 'user'] as const;
export type NbdPeers = (typeof NBD_PEERS)[number];

/** The NbdServer allowPeer check for `peers`: null lets the peer in, otherwise why not. */
export function nbdPeerCheck(peers: NbdPeers, qemuPids: () => Set<number> = runningQemuPids, uid = process.getuid?.() ?? -1) {
  return (p: PeerCredentials): string | null => {
    if (p.uid !== uid) return `it runs as uid ${p.uid}, not as this agent's uid ${uid}`;
    if (peers === 'user' || qemuPids().has(p.pid)) return null;
    return "it is not the QEMU this agent started (to let this user's programs such as qemu-io or nbdcopy connect, run the agent with --nbd-peers user)";
  };
}
