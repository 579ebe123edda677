-- Named administrators (docs/console.md): accounts with a role, their API
-- tokens and browser sessions (both kept as SHA-256 digests, never the secret),
-- and what each device said of its resident plaintext at its last heartbeat.
CREATE TABLE IF NOT EXISTS users (
  name TEXT PRIMARY KEY,
  role TEXT NOT NULL,
  -- libsodium crypto_pwhash_str (Argon2id, with its own salt and limits)
  pw_hash TEXT NOT NULL,
  -- base32 TOTP secret (RFC 6238); required for role admin
  totp_secret TEXT,
  -- the last TOTP step accepted: each code is good once
  totp_step INTEGER NOT NULL DEFAULT 0,
  created_at INTEGER NOT NULL,
  created_by TEXT NOT NULL,
  last_login INTEGER
);
CREATE TABLE IF NOT EXISTS api_tokens (
  id TEXT PRIMARY KEY,
  user_name TEXT NOT NULL REFERENCES users(name),
  token_sha256 TEXT NOT NULL UNIQUE,
  role TEXT NOT NULL,
  label TEXT NOT NULL,
  created_at INTEGER NOT NULL,
  expires_at INTEGER NOT NULL,
  last_used INTEGER
);
CREATE TABLE IF NOT EXISTS sessions (
  id_sha256 TEXT PRIMARY KEY,
  user_name TEXT NOT NULL REFERENCES users(name),
  csrf TEXT NOT NULL,
  created_at INTEGER NOT NULL,
  seen_at INTEGER NOT NULL,
  expires_at INTEGER NOT NULL
);
CREATE INDEX IF NOT EXISTS sessions_user ON sessions(user_name);
CREATE INDEX IF NOT EXISTS api_tokens_user ON api_tokens(user_name);
ALTER TABLE devices ADD COLUMN last_report TEXT;
