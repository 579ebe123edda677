-- The push channel (docs/push.md): every command a device is sent has its own
-- number, counted per device, and what it carries; replicas record who is connected.
ALTER TABLE devices ADD COLUMN push_seq BIGINT NOT NULL DEFAULT 0;
ALTER TABLE commands ADD COLUMN seq BIGINT;
ALTER TABLE commands ADD COLUMN payload TEXT;
ALTER TABLE commands ADD COLUMN delivered_via TEXT;
CREATE UNIQUE INDEX IF NOT EXISTS commands_device_seq ON commands(device_id, seq);
CREATE TABLE IF NOT EXISTS replicas (
  id TEXT PRIMARY KEY,
  started_at BIGINT NOT NULL,
  seen_at BIGINT NOT NULL
);
CREATE TABLE IF NOT EXISTS push_sessions (
  id TEXT PRIMARY KEY,
  device_id TEXT NOT NULL REFERENCES devices(id),
  replica TEXT NOT NULL,
  connected_at BIGINT NOT NULL
);
CREATE INDEX IF NOT EXISTS push_sessions_device ON push_sessions(device_id);
-- Commands from before: numbered in the order they were issued.
UPDATE commands SET seq = (
  SELECT COUNT(*) FROM commands c2
  WHERE c2.device_id = commands.device_id AND (c2.issued_at < commands.issued_at OR (c2.issued_at = commands.issued_at AND c2.id <= commands.id))
);
UPDATE devices SET push_seq = (SELECT COUNT(*) FROM commands WHERE commands.device_id = devices.id);
