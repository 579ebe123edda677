// The agent's one entry point for the CLI and the benchmarks. The agent's rooms
// (docs/architecture.md): daemon/ wires a running agent; chunks/ is the core over
// the ciphertext cache; remote/ talks to the server; keys/ holds the identity, the
// lease and the key ring; disk/ serves the VM's disk over NBD; memory/ serves and
// evicts guest RAM; vm/ runs QEMU. Anything outside agent/ that is not a test
// imports from here, so what the agent offers is this list.

// A running agent and its control socket.
export { startAgent, type AgentStatus, type RunningAgent } from './daemon/start.js';
export { control } from './daemon/control.js';

// The device's identity, its keys at rest, and what IT can order of it.
export { closeIdentity, defaultHome, enrollDevice, loadIdentity, revokedError, revokedMarker, type Identity } from './keys/identity.js';
export type { Argon2Cost } from './keys/seal.js';
export { fixedSecret, promptTty, readFd, secretFromChannels, type Unlock } from './keys/unlock.js';
export { tctiFrom } from './keys/tpm.js';
export { acknowledgeRevoke, eraseRevokedHome, pendingWipe, performWipe } from './keys/wipe.js';
export { keepCheckpoint } from './keys/anchor.js';
export { rotateKeys } from './keys/rotate-keys.js';

// The server, as a device sees it.
export { DeviceClient } from './remote/device-client.js';

// The disk export.
export type { NbdAddress } from './disk/nbd/server.js';
export { NBD_PEERS, type NbdPeers } from './disk/nbd/peers.js';
export { MAX_CONNECTIONS as NBD_MAX_CONNECTIONS } from './disk/nbd/protocol.js';

// QEMU.
export { ACCEL_CHOICES, Vm, chooseAccel, guestCmdline, makeRunDir, type Accel, type AccelChoice, type VmSpec } from './vm/qemu.js';

// The memory path's parts, for bench/memory-path.ts, which times them alone.
export { BufferPool } from './chunks/buffer-pool.js';
export { Evictor } from './memory/evictor.js';
export { servePage } from './memory/fault-service.js';

// The chunk map over a lease's manifest, for bench/manifest.ts, which times its install alone.
export { ChunkMap, readManifest } from './chunks/chunk-map.js';
// The chunk cache, for bench/cache-open.ts, which times opening its index at size.
export { ChunkCache } from './chunks/cache.js';
export type { Manifest } from './remote/device-client.js';
