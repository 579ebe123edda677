// The disk's warm-read table (disk-table.cc), without N-API: what the table holds,
// and its read, for the bindings (disk-reads.cc) and the NBD read proxy's threads
// (nbd-proxy.cc). docs/nbd.md, "Reads in native code".
#pragma once
#include <sodium.h>
#include <stddef.h>
#include <stdint.h>

#include <atomic>
#include <chrono>
#include <condition_variable>
#include <mutex>
#include <unordered_map>
#include <vector>

#include "aead.h"

namespace lethe {

inline constexpr size_t PIECE = 4096;
inline constexpr size_t PIECE_TAG = 16;
inline constexpr size_t NONCE = crypto_stream_xchacha20_NONCEBYTES;
inline constexpr size_t KEY = 32;
inline constexpr size_t TAG = 16;
inline constexpr size_t CT_AT = 1 + NONCE;  // format byte, nonce, then the ciphertext
inline constexpr size_t IMAGE_ID = 16;
inline constexpr size_t COORD = IMAGE_ID + 4 + 1 + 8;
inline constexpr size_t MAX_LABEL = 64;
/** The longest associated data of a chunk's AEAD (ChunkAd). */
inline constexpr size_t MAX_AD = MAX_LABEL + COORD + 1;
inline constexpr int MAX_GENS = 8;
inline constexpr size_t BLOCK = 64;
/** A blob's first byte (common/constants.ts CHUNK_FORMAT_VERSION). */
inline constexpr uint8_t FORMAT = 1;

/** Bytes before a reply buffer's data, for an NBD reply header. */
inline constexpr size_t REPLY_HEADER_ROOM = 32;

struct Chunk {
  uint32_t gen;
  uint64_t at;   // file offset of the ciphertext
  uint32_t len;  // ciphertext bytes (= plaintext bytes)
  uint8_t nonce[NONCE];
  std::vector<uint8_t> tags;  // PIECE_TAG bytes a 4 KiB piece (TablePieceTags)
};

/** Locked scratch for one reader: a derived chunk key, one keystream block, the cipher's state. */
struct Scratch {
  aead::State aead;
  uint8_t key[KEY];
  uint8_t block[BLOCK];
};

/** One thread's locked scratch (a derived key, a keystream block) and buffers. */
struct Reader {
  Scratch *scratch = nullptr;  // sodium_malloc
  std::vector<uint8_t> ct;     // ciphertext read from the file (not secret)
  std::vector<uint8_t> want, tags;  // a read's pieces' tags, kept and computed (not secret: Poly1305 tags under one-time keys)
};

struct Table {
  std::mutex mu;
  int fd = -1;
  /**
   * The piece tags' key (TablePieceTags), random, this process's own: sodium_malloc
   * (locked, left out of core dumps), read-only after Open, freed (zeroed) with the
   * table, when no reader can be using it.
   */
  uint8_t *piece_key = nullptr;
  uint8_t label[MAX_LABEL];  // the chunk-key derivation's
  size_t label_len = 0;
  uint8_t ad_label[MAX_LABEL];  // the chunk AEAD's associated data, before the coordinate
  size_t ad_label_len = 0;
  uint8_t kind = 0;
  uint8_t cls = 0;
  uint32_t chunk_size = 0;
  size_t max_chunks = 0;
  uint8_t image[IMAGE_ID] = {};
  std::unordered_map<uint32_t, Chunk> chunks;
  int64_t gens[MAX_GENS];
  uint8_t *keys = nullptr;   // sodium_malloc, MAX_GENS × KEY
  int held = 0;              // class keys held: the region is readable while > 0
  Reader *js = nullptr;      // the JavaScript thread's reader
  std::vector<Reader *> spare_readers;  // the admissions' (TableAdmit), free ones; freed with the table
  uint64_t reads = 0, fallbacks = 0, mismatches = 0, admits = 0, refused = 0;
  /**
   * Chunks with an admission under way, and whether one was forgotten meanwhile (a write,
   * a slot given up): such an admission puts nothing in. `epoch` counts the times every
   * chunk went at once (a new image, the keys zeroed, the table closed).
   */
  struct Admitting {
    uint32_t jobs = 0;
    bool stale = false;
  };
  std::unordered_map<uint32_t, Admitting> admitting;
  uint64_t epoch = 0;
  /**
   * Where the blob of a chunk not yet in the table lies, as JavaScript said (TableLies):
   * a read through TableRead(…, admit) admits it there and then, on its own thread. A
   * forget of the chunk, a new image, or a refused admission drops the entry.
   */
  struct Lies {
    uint32_t gen;
    uint32_t blob_len;
    uint64_t at;
  };
  std::unordered_map<uint32_t, Lies> lies;
  size_t max_lies = 0;
  /** The handle's reference and each proxy's: the last to let go frees the table. */
  std::atomic<int> refs{1};
  /** Locked reply buffers the proxies share (free ones in `replies`), each of reply_bytes; freed with the table, when no proxy can hold one. */
  std::vector<uint8_t *> reply_all, replies;
  std::condition_variable reply_free;  // a buffer came back to `replies`
  size_t reply_bytes = 0;
  size_t copy_bytes = 0;
  /**
   * Locked buffers for writes' payloads, shared by the proxies: a requests thread reads a
   * write's payload into a free one and lends it to JavaScript, which writes from it and
   * gives it back. Under write_mu: write_state (WRITE_FREE, WRITE_FILLING, WRITE_LENT)
   * and write_len (the bytes in it, zeroed when it is given back). JavaScript's views of
   * them each hold a reference to the table, so none is freed while JavaScript can reach it.
   */
  std::mutex write_mu;
  std::vector<uint8_t *> write_all;
  std::vector<uint8_t> write_state;
  std::vector<uint32_t> write_len;
  size_t write_bytes = 0;

  ~Table();
};

/** Forgets chunk `index` (and spoils an admission of it under way); t->mu held. */
void TableForgetLocked(Table *t, uint32_t index);
/** Forgets every chunk (and spoils every admission under way); t->mu held. */
void TableForgetAllLocked(Table *t);
/** Puts a checked chunk in, letting another go when the table is full; t->mu held. */
void TablePutLocked(Table *t, uint32_t index, Chunk &&c);
/**
 * The tag of each 4 KiB piece of ciphertext `ct` (len bytes) of the blob sealed under
 * `nonce`, PIECE_TAG bytes a piece, into `out`: Poly1305 under a one-time key for that
 * piece of that blob (aead::PieceTags under the table's piece key). Taken from a blob
 * whose whole tag was checked, and kept in the table, they let a read check only the
 * pieces it covers. s's cipher state is used and zeroed.
 */
void TablePieceTags(const Table *t, Scratch *s, const uint8_t *nonce, const uint8_t *ct, size_t len, std::vector<uint8_t> &out);
/** The chunk AEAD's associated data (common/chunk.ts chunkAd): label ‖ coordinate ‖ class, into out (MAX_AD bytes); its length. t->mu held. */
size_t ChunkAd(const Table *t, uint32_t gen, uint32_t index, uint8_t *out);

/**
 * Starts an admission of chunk `index` (TableAdmit), on the thread that found where its
 * blob lies: a forget of the chunk from now on spoils it. Returns what TableAdmit takes.
 */
uint64_t TableAdmitBegin(Table *t, uint32_t index);
/**
 * Admits chunk `index` of generation `gen` whose blob (blob_len bytes: format byte, nonce,
 * ciphertext, tag) lies at byte `at` of the file, without JavaScript's check: reads it
 * with r, checks its tag under the chunk key the held class key derives, and puts it in
 * with its pieces' tags. With n > 0, also plaintext bytes [within, within + n) into
 * out. False (nothing put in; out's bytes undefined) when the class key is not held, the
 * file is short, the format byte or the tag is wrong (counted in `refused`), or the chunk
 * was forgotten since TableAdmitBegin (which gave `begun`). Ends the admission either way.
 * Thread-safe: a libuv pool thread's (disk-reads.cc) or a read proxy thread's (TableRead).
 */
bool TableAdmit(Table *t, Reader *r, uint32_t index, uint32_t gen, uint64_t at, size_t blob_len, size_t within, uint8_t *out, size_t n,
                uint64_t begun);
/** Ends an admission that never ran (its job was cancelled). */
void TableAdmitCancel(Table *t, uint32_t index);
/** Chunk `index` of `gen` lies at byte `at` of the file (blob_len bytes), to admit at its first read; false when the table knows as many as it may. t->mu held. */
bool TableLiesLocked(Table *t, uint32_t index, uint32_t gen, uint64_t at, uint32_t blob_len);
/** Admits chunk `index` where TableLiesLocked said its blob lies, and serves bytes [within, + n) of it into out; false when it cannot. */
bool TableAdmitPlaced(Table *t, Reader *r, uint32_t index, size_t within, uint8_t *out, size_t n);

/** A reader for an admission: a spare one of the table's, or a new one; null when locked memory cannot be had. */
Reader *TableTakeReader(Table *t);
void TableGiveReader(Table *t, Reader *r);

/** A reader for a table of chunks of `chunk_size`; null when locked memory cannot be had. */
Reader *ReaderNew(uint32_t chunk_size);
void ReaderFree(Reader *r);

/** Every class key zeroed and the region made inaccessible; t->mu held. */
void TableZeroKeysLocked(Table *t);
/** Closes the table: keys zeroed and freed, chunks forgotten, the file closed (a proxy still holding it then finds nothing to serve). */
void TableDestroy(Table *t);
/** Lets go of one reference; the last frees the table. */
void TableUnref(Table *t);
/** The key slot of `gen`, or -1 when its class key is not held; t->mu held. */
int TableSlotLocked(Table *t, uint32_t gen);
/** The chunk key of (gen, index) under class key `slot` into `key` (locked scratch); t->mu held. */
void TableDeriveLocked(Table *t, int slot, uint32_t gen, uint32_t index, uint8_t *key);
/** Plaintext [within, within + n) into out from ciphertext `ct` holding the chunk's bytes from `from` (a multiple of 64) on. */
void ChunkDecrypt(Scratch *s, const uint8_t *nonce, const uint8_t *ct, size_t from, size_t ct_len, size_t within, uint8_t *out, size_t n);

/** The longest read the table's reply buffers hold. */
size_t TableMaxReply(const Table *t);
/** A locked reply buffer of REPLY_HEADER_ROOM + TableMaxReply bytes, waiting up to `wait_ms` for one; null when all stay out (the read goes to JavaScript). */
uint8_t *TableTakeReply(Table *t, int wait_ms);
void TableGiveReply(Table *t, uint8_t *buf);
enum : uint8_t { WRITE_FREE, WRITE_FILLING, WRITE_LENT };
/** The index of a free write buffer (of TableMaxWrite bytes), now WRITE_FILLING; -1 when none is free (the write goes to JavaScript the old way). */
int TableTakeWrite(Table *t);
/** How many write buffers the table has. */
size_t TableWriteCount(const Table *t);
size_t TableMaxWrite(const Table *t);
/** Write buffer i, holding `len` bytes of a payload: JavaScript's until it gives it back. */
void TableLendWrite(Table *t, int i, uint32_t len);
/**
 * Zeroes write buffer i (its filled bytes, or `len` when it was never lent) and frees it,
 * if it is in state `from`; false (nothing done) if it is not.
 */
bool TableGiveWrite(Table *t, int i, uint8_t from, size_t len = 0);
/** Bytes of the locked buffer each proxy thread passes payloads through. */
size_t TableCopyBytes(const Table *t);

/**
 * Plaintext of disk bytes [offset, offset + len) into out, from the table alone; false
 * when it cannot serve every byte (out's bytes are then undefined). With `admit`, a chunk
 * not in the table whose blob's place JavaScript gave (TableLiesLocked) is admitted first,
 * on the caller's thread (the NBD read proxy's). Thread-safe.
 */
bool TableRead(Table *t, Reader *r, uint64_t offset, uint8_t *out, size_t len, bool admit = false);

}  // namespace lethe
