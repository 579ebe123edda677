-- The keyring (docs/fleet.md, Key rotation): term keys wrapped by the master key;
-- image keys are wrapped by the newest term's key. Empty until the first rotation.
CREATE TABLE master_keys (
  term INTEGER PRIMARY KEY,
  wrapped BYTEA NOT NULL,
  created_at BIGINT NOT NULL
);
