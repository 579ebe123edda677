-- The keyring (docs/fleet.md, Key rotation): term keys wrapped by the master key;
-- image keys are wrapped by the newest term's key. Empty until the first rotation.
CREATE TABLE IF NOT EXISTS master_keys (
  term INTEGER PRIMARY KEY,
  wrapped BLOB NOT NULL,
  created_at INTEGER NOT NULL
);
