-- Lethe server schema, SQLite: the shape of every table at the first versioned
-- migration. Applied to an empty database, and (IF NOT EXISTS) to one made before
-- migrations were versioned, whose missing columns are then added (server/migrate.ts).
CREATE TABLE IF NOT EXISTS settings (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS enroll_tokens (
  secret_sha256 TEXT PRIMARY KEY,
  created_at INTEGER NOT NULL,
  expires_at INTEGER NOT NULL,
  used_at INTEGER,
  device_id TEXT
);
CREATE TABLE IF NOT EXISTS devices (
  id TEXT PRIMARY KEY,
  name TEXT NOT NULL,
  sign_pk BLOB NOT NULL,
  box_pk BLOB NOT NULL,
  enrolled_at INTEGER NOT NULL,
  last_seen INTEGER,
  revoked_at INTEGER,
  wipe_requested_at INTEGER,
  wiped_at INTEGER,
  -- when the revoked device said it erased its keys and cache (POST /v1/device/revoke/ack)
  revoke_acked_at INTEGER
);
CREATE TABLE IF NOT EXISTS images (
  id TEXT PRIMARY KEY,
  name TEXT NOT NULL UNIQUE,
  created_at INTEGER NOT NULL,
  policy TEXT,
  dedup_key_wrapped BLOB NOT NULL,
  current_version INTEGER
);
CREATE TABLE IF NOT EXISTS versions (
  image_id TEXT NOT NULL REFERENCES images(id),
  version INTEGER NOT NULL,
  -- 'removed': gone for admins and devices; its key stays while later versions use chunks it wrote
  state TEXT NOT NULL CHECK (state IN ('draft', 'committed', 'removed')),
  created_at INTEGER NOT NULL,
  committed_at INTEGER,
  key_wrapped BLOB NOT NULL,
  disk_size INTEGER NOT NULL,
  mem_size INTEGER NOT NULL,
  state_size INTEGER NOT NULL,
  -- set for a draft that holds a device's writes (check-in), not an admin push
  lease_id TEXT,
  -- a device branch (docs/branches.md): the device whose check-in made it, the
  -- version its lease was on, and when an admin (or a single-user policy) made it shared
  device_id TEXT,
  base INTEGER,
  promoted_at INTEGER,
  PRIMARY KEY (image_id, version)
);
CREATE TABLE IF NOT EXISTS chunks (
  image_id TEXT NOT NULL,
  version INTEGER NOT NULL,
  kind TEXT NOT NULL,
  idx INTEGER NOT NULL,
  gen INTEGER NOT NULL,
  cls TEXT NOT NULL,
  ct_sha256 BLOB NOT NULL,
  dedup_hash BLOB NOT NULL,
  PRIMARY KEY (image_id, version, kind, idx)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS assignments (
  device_id TEXT NOT NULL REFERENCES devices(id),
  image_id TEXT NOT NULL REFERENCES images(id),
  assigned_at INTEGER NOT NULL,
  PRIMARY KEY (device_id, image_id)
);
CREATE TABLE IF NOT EXISTS leases (
  id TEXT PRIMARY KEY,
  device_id TEXT NOT NULL REFERENCES devices(id),
  image_id TEXT NOT NULL REFERENCES images(id),
  version INTEGER NOT NULL,
  created_at INTEGER NOT NULL,
  expires_at INTEGER NOT NULL,
  ended_at INTEGER,
  -- the draft version this lease's device-written chunks are encrypted for (see leases.ts writeGen)
  write_gen INTEGER
);
CREATE TABLE IF NOT EXISTS commands (
  id TEXT PRIMARY KEY,
  device_id TEXT NOT NULL REFERENCES devices(id),
  type TEXT NOT NULL,
  issued_at INTEGER NOT NULL,
  delivered_at INTEGER,
  acked_at INTEGER,
  result TEXT
);
CREATE TABLE IF NOT EXISTS audit (
  seq INTEGER PRIMARY KEY,
  ts TEXT NOT NULL,
  type TEXT NOT NULL,
  device TEXT,
  data TEXT NOT NULL,
  hash TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS audit_device ON audit(device, seq);
-- First-touch orders of guest memory pages, one per lease (docs/prefetch.md);
-- the newest few per image are kept. data: little-endian uint32 page indices.
CREATE TABLE IF NOT EXISTS traces (
  id INTEGER PRIMARY KEY,
  image_id TEXT NOT NULL REFERENCES images(id) ON DELETE CASCADE,
  version INTEGER NOT NULL,
  device_id TEXT NOT NULL REFERENCES devices(id),
  lease_id TEXT NOT NULL UNIQUE,
  created_at INTEGER NOT NULL,
  pages INTEGER NOT NULL,
  data BLOB NOT NULL
);
CREATE INDEX IF NOT EXISTS traces_image ON traces(image_id, id);
-- The key ceiling (docs/escrow-protocol.md): when each device was last given each
-- sensitive chunk key of an image, and how many distinct ones in its current window.
CREATE TABLE IF NOT EXISTS key_releases (
  device_id TEXT NOT NULL,
  image_id TEXT NOT NULL,
  kind TEXT NOT NULL,
  idx INTEGER NOT NULL,
  released_at INTEGER NOT NULL,
  PRIMARY KEY (device_id, image_id, kind, idx)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS key_windows (
  device_id TEXT NOT NULL,
  image_id TEXT NOT NULL,
  started_at INTEGER NOT NULL,
  keys INTEGER NOT NULL,
  PRIMARY KEY (device_id, image_id)
);
-- Devices whose first-touch traces count toward an image's prefetch order for
-- every device on it (docs/prefetch.md); any other device's trace is its own.
CREATE TABLE IF NOT EXISTS trusted_tracers (
  image_id TEXT NOT NULL REFERENCES images(id) ON DELETE CASCADE,
  device_id TEXT NOT NULL REFERENCES devices(id),
  trusted_at INTEGER NOT NULL,
  PRIMARY KEY (image_id, device_id)
);
CREATE TABLE IF NOT EXISTS checkpoints (
  seq INTEGER PRIMARY KEY,
  hash TEXT NOT NULL,
  signature TEXT NOT NULL
);
