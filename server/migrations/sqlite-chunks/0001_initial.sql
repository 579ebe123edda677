-- Lethe chunk store, SQLite: the encrypted chunks, apart from the metadata database.
CREATE TABLE IF NOT EXISTS blobs (
  image_id TEXT NOT NULL,
  gen INTEGER NOT NULL,
  kind TEXT NOT NULL,
  idx INTEGER NOT NULL,
  data BLOB NOT NULL,
  PRIMARY KEY (image_id, gen, kind, idx)
);
