// Constants named after the specs in docs/. Specification constants change the
// wire or at-rest format and need a new format version; implementation constants
// may be tuned freely.

// ---- specification: chunks (docs/chunk-format.md) ----
export const CHUNK_FORMAT_VERSION = 1;
export const DISK_CHUNK_SIZE = 128 * 1024;
export const MEM_CHUNK_SIZE = 4 * 1024;
export const STATE_CHUNK_SIZE = 128 * 1024;
export const CHUNK_KINDS = ['disk', 'mem', 'state'] as const;
export type ChunkKind = (typeof CHUNK_KINDS)[number];
export const KIND_CODE: Record<ChunkKind, number> = { disk: 1, mem: 2, state: 3 };
export const CHUNK_SIZE: Record<ChunkKind, number> = {
  disk: DISK_CHUNK_SIZE,
  mem: MEM_CHUNK_SIZE,
  state: STATE_CHUNK_SIZE,
};
export const SENSITIVITY_CLASSES = ['sensitive', 'normal'] as const;
export type Sensitivity = (typeof SENSITIVITY_CLASSES)[number];
export const CLASS_CODE: Record<Sensitivity, number> = { normal: 1, sensitive: 2 };

// ---- specification: policy values (docs/policies.md) ----
export const MEMORY_MODES = ['all', 'hinted', 'none'] as const;
export const FREE_PAGE_ACTIONS = ['evict', 'keep'] as const;
export const EXPIRY_ACTIONS = ['evict-sensitive', 'evict-all', 'suspend'] as const;
export const WIPE_ACTIONS = ['evict-all', 'poweroff'] as const;
export const PREFETCH_ORDERS = ['trace', 'address', 'none'] as const;
/** Who an image is for: `single` promotes a device's check-in to the shared version at once (docs/branches.md). */
export const IMAGE_USERS = ['shared', 'single'] as const;

// ---- specification: sealed device keys (docs/device-keys.md) ----
/** How a device's identity keys are kept at rest; reported at enrollment, checked by policy. */
export const SEAL_KINDS = ['tpm', 'passphrase', 'none'] as const;
export type SealKind = (typeof SEAL_KINDS)[number];
export const SEALED_KEY_MAGIC = 'LETHEKEY';
export const SEALED_KEY_VERSION = 1;
export const SEAL_CODE: Record<Exclude<SealKind, 'none'>, number> = { passphrase: 1, tpm: 2 };
/** Additional data of a sealed key: header ‖ this ‖ the key's name ("sign" or "box"). */
export const AD_SEALED_KEY = 'lethe/v1/device-key\0';
/** The message the TPM's HMAC key signs to give the key-encryption key. */
export const TPM_KEK_CONTEXT = 'lethe/v1/tpm-kek\0';

export const KEY_BYTES = 32;
export const NONCE_BYTES = 24;
export const TAG_BYTES = 16;
/** format byte + nonce + tag */
export const CHUNK_OVERHEAD = 1 + NONCE_BYTES + TAG_BYTES;

// Domain strings for BLAKE2b key derivation; each ends in NUL so no prefix of
// one is another.
export const KDF_CLASS = 'lethe/v1/class-key\0';
export const KDF_CHUNK_NORMAL = 'lethe/v1/chunk-key/normal\0';
export const KDF_CHUNK_SENSITIVE = 'lethe/v1/chunk-key/sensitive\0';
export const AD_CHUNK = 'lethe/v1/chunk\0';
export const AD_VERSION_KEY = 'lethe/v1/version-key\0';
export const MANIFEST_CONTEXT = 'LETHE-MANIFEST-V1';

// ---- specification: signed device requests (docs/escrow-protocol.md) ----
export const SIG_CONTEXT = 'LETHE-REQ-V1';
export const HDR_DEVICE = 'x-lethe-device';
export const HDR_TIMESTAMP = 'x-lethe-timestamp';
export const HDR_NONCE = 'x-lethe-nonce';
export const HDR_SIGNATURE = 'x-lethe-signature';
/** A signed request older or newer than this (ms) is refused as stale. */
export const SIG_WINDOW_MS = 60_000;
export const ENROLL_TOKEN_PREFIX = 'lethe-enroll-';
export const ADMIN_TOKEN_PREFIX = 'lethe-admin-';

// ---- specification: audit (docs/audit-log.md) ----
export const AUDIT_GENESIS_HASH = '0'.repeat(64);
export const AUDIT_CHECKPOINT_EVERY = 256;
export const CHECKPOINT_CONTEXT = 'LETHE-AUDIT-CHECKPOINT-V1';

// ---- implementation ----
// What the agent locks in memory (sodium_malloc); `lethe audit host` checks the limit against them.
/** Locked reply buffers for NBD reads up to this size; a longer read (rare) gets its own. */
export const DISK_REPLY_BUFFER_BYTES = 256 * 1024;
/** 32 × 256 KiB = 8 MiB of locked reply buffers, shared by every NBD connection. */
export const DISK_REPLY_BUFFERS = 32;
/**
 * One locked buffer of the largest NBD payload (32 MiB), made the first time an NBD
 * read or write payload is longer than a reply buffer, or finds none free within
 * 100 ms; such requests take it in turn.
 */
export const DISK_LARGE_BUFFER_BYTES = 32 * 1024 * 1024;
/**
 * The NBD read proxy (native/nbd-proxy.cc): it answers reads up to DISK_REPLY_BUFFER_BYTES
 * from 4 locked reply buffers shared by every connection (a read that finds none free
 * within 10 ms goes to JavaScript), and passes payloads through two locked 16 KiB
 * buffers per connection. Each connection has NBD_PROXY_READERS requests threads, each
 * with a page of locked scratch: one connection's reads (nbdcopy gives a disk of up to
 * 128 MiB to one connection) are decrypted on two cores.
 */
export const NBD_PROXY_REPLY_BUFFERS = 4;
/**
 * Locked buffers of DISK_REPLY_BUFFER_BYTES the NBD read proxies share for writes'
 * payloads: a proxy thread reads a write's payload into a free one and lends it to
 * JavaScript, which writes from it and gives it back. One connection holds at most
 * half of them; a write that finds none it may take comes through the socket pair and
 * a reply buffer, as before. As many as writes keep the sealing threads busy while
 * more arrive.
 */
export const NBD_PROXY_WRITE_BUFFERS = 16;
export const NBD_PROXY_COPY_BYTES = 16 * 1024;
export const NBD_PROXY_READERS = 2;
/** 16 × 128 KiB locked transit buffers; a 17th concurrent chunk operation waits. */
export const DISK_TRANSIT_BUFFERS = 16;
/** Locked page buffers for serving guest RAM faults. */
export const FAULT_PAGE_BUFFERS = 32;
/** Keys per key-ring slab (4 pages: an mprotect pair on it costs ~4 µs). */
export const KEY_SLAB_SLOTS = 512;
/** At most this many keys: a 2 GiB guest's pages, each with a read and a write key. */
export const KEY_RING_MAX_KEYS = 1 << 20;
// Not locked: ciphertext only.
/** Disk chunk blobs kept in memory once their tag is checked (--disk-memory-cache): 256 MiB by default. */
export const DISK_CHECKED_BYTES = 256 * 1024 * 1024;
/** Disk chunks whose 4 KiB piece digests are kept (agent/chunks/piece-digests.ts): an 8 GiB disk's, about 35 MiB. */
export const DISK_PIECE_CHUNKS = 65_536;
export const DEFAULT_LISTEN = '127.0.0.1:7443';
export const DEFAULT_ENROLL_TTL_S = 3600;
export const MAX_JSON_BODY = 1024 * 1024;
export const MAX_CHUNK_BODY = DISK_CHUNK_SIZE + 1024;
export const MAX_BATCH = 1024;
/** A batch upload of plaintext chunks (admin push). */
export const MAX_UPLOAD_BODY = 8 * 1024 * 1024 + 64 * 1024;
/** Built-in lease policy until an image carries its own. */
export const DEFAULT_LEASE_TTL_S = 900;
/** A key ceiling given as a share never goes below this many distinct keys (small images). */
export const KEY_CEILING_FLOOR = 1024;
/** Built-in key ceiling: this share of an image's sensitive chunks, distinct, per device per window. */
export const DEFAULT_KEY_CEILING_SHARE = 0.95;
export const DEFAULT_KEY_WINDOW_S = 300;
/** Built-in eviction policy: sensitive guest pages resident this long are evicted. */
export const DEFAULT_EVICT_IDLE_S = 60;
