-- Lethe server schema, PostgreSQL: every table the SQLite backend has, with times
-- in milliseconds as BIGINT, plus the chunk blobs and the nonces every replica
-- shares (docs/fleet.md).
CREATE TABLE settings (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE enroll_tokens (
  secret_sha256 TEXT PRIMARY KEY,
  created_at BIGINT NOT NULL,
  expires_at BIGINT NOT NULL,
  used_at BIGINT,
  device_id TEXT
);
CREATE TABLE devices (
  id TEXT PRIMARY KEY,
  name TEXT NOT NULL,
  sign_pk BYTEA NOT NULL,
  box_pk BYTEA NOT NULL,
  enrolled_at BIGINT NOT NULL,
  last_seen BIGINT,
  revoked_at BIGINT,
  wipe_requested_at BIGINT,
  wiped_at BIGINT,
  revoke_acked_at BIGINT,
  seal TEXT NOT NULL DEFAULT 'none'
);
CREATE TABLE images (
  id TEXT PRIMARY KEY,
  name TEXT NOT NULL UNIQUE,
  created_at BIGINT NOT NULL,
  policy TEXT,
  dedup_key_wrapped BYTEA NOT NULL,
  current_version INTEGER
);
CREATE TABLE versions (
  image_id TEXT NOT NULL REFERENCES images(id),
  version INTEGER NOT NULL,
  state TEXT NOT NULL CHECK (state IN ('draft', 'committed', 'removed')),
  created_at BIGINT NOT NULL,
  committed_at BIGINT,
  key_wrapped BYTEA NOT NULL,
  disk_size BIGINT NOT NULL,
  mem_size BIGINT NOT NULL,
  state_size BIGINT NOT NULL,
  lease_id TEXT,
  device_id TEXT,
  base INTEGER,
  promoted_at BIGINT,
  PRIMARY KEY (image_id, version)
);
CREATE TABLE chunks (
  image_id TEXT NOT NULL,
  version INTEGER NOT NULL,
  kind TEXT NOT NULL,
  idx INTEGER NOT NULL,
  gen INTEGER NOT NULL,
  cls TEXT NOT NULL,
  ct_sha256 BYTEA NOT NULL,
  dedup_hash BYTEA NOT NULL,
  PRIMARY KEY (image_id, version, kind, idx)
);
CREATE TABLE assignments (
  device_id TEXT NOT NULL REFERENCES devices(id),
  image_id TEXT NOT NULL REFERENCES images(id),
  assigned_at BIGINT NOT NULL,
  PRIMARY KEY (device_id, image_id)
);
CREATE TABLE leases (
  id TEXT PRIMARY KEY,
  device_id TEXT NOT NULL REFERENCES devices(id),
  image_id TEXT NOT NULL REFERENCES images(id),
  version INTEGER NOT NULL,
  created_at BIGINT NOT NULL,
  expires_at BIGINT NOT NULL,
  ended_at BIGINT,
  write_gen INTEGER
);
CREATE INDEX leases_device ON leases(device_id);
CREATE TABLE commands (
  id TEXT PRIMARY KEY,
  device_id TEXT NOT NULL REFERENCES devices(id),
  type TEXT NOT NULL,
  issued_at BIGINT NOT NULL,
  delivered_at BIGINT,
  acked_at BIGINT,
  result TEXT
);
CREATE INDEX commands_device ON commands(device_id);
CREATE TABLE audit (
  seq BIGINT PRIMARY KEY,
  ts TEXT NOT NULL,
  type TEXT NOT NULL,
  device TEXT,
  data TEXT NOT NULL,
  hash TEXT NOT NULL
);
CREATE INDEX audit_device ON audit(device, seq);
CREATE TABLE traces (
  id BIGINT PRIMARY KEY,
  image_id TEXT NOT NULL REFERENCES images(id) ON DELETE CASCADE,
  version INTEGER NOT NULL,
  device_id TEXT NOT NULL REFERENCES devices(id),
  lease_id TEXT NOT NULL UNIQUE,
  created_at BIGINT NOT NULL,
  pages INTEGER NOT NULL,
  data BYTEA NOT NULL
);
CREATE INDEX traces_image ON traces(image_id, id);
CREATE TABLE key_releases (
  device_id TEXT NOT NULL,
  image_id TEXT NOT NULL,
  kind TEXT NOT NULL,
  idx INTEGER NOT NULL,
  released_at BIGINT NOT NULL,
  PRIMARY KEY (device_id, image_id, kind, idx)
);
CREATE TABLE key_windows (
  device_id TEXT NOT NULL,
  image_id TEXT NOT NULL,
  started_at BIGINT NOT NULL,
  keys INTEGER NOT NULL,
  PRIMARY KEY (device_id, image_id)
);
CREATE TABLE trusted_tracers (
  image_id TEXT NOT NULL REFERENCES images(id) ON DELETE CASCADE,
  device_id TEXT NOT NULL REFERENCES devices(id),
  trusted_at BIGINT NOT NULL,
  PRIMARY KEY (image_id, device_id)
);
CREATE TABLE checkpoints (
  seq BIGINT PRIMARY KEY,
  hash TEXT NOT NULL,
  signature TEXT NOT NULL
);
-- Encrypted chunks, one row each: a plain table with the key first, not one
-- partition per image: a device's request reads a few rows by key, which one
-- B-tree serves, and removing an image frees only chunks no version still uses
-- (shared across versions by generation), which a DROP PARTITION could not tell.
-- Ciphertext does not compress: stored out of line without trying (EXTERNAL).
CREATE TABLE blobs (
  image_id TEXT NOT NULL,
  gen INTEGER NOT NULL,
  kind TEXT NOT NULL,
  idx INTEGER NOT NULL,
  data BYTEA NOT NULL,
  PRIMARY KEY (image_id, gen, kind, idx)
);
ALTER TABLE blobs ALTER COLUMN data SET STORAGE EXTERNAL;
-- Signed-request nonces seen within the signature window, by every replica
-- (the SQLite server keeps them in memory): a replay to any replica is refused.
CREATE TABLE nonces (
  device_id TEXT NOT NULL,
  nonce TEXT NOT NULL,
  ts BIGINT NOT NULL,
  PRIMARY KEY (device_id, nonce)
);
CREATE INDEX nonces_ts ON nonces(ts);
