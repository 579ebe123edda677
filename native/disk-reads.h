// The disk's warm-read table (disk-reads.cc): its N-API functions, and the part of it
// the NBD read proxy (nbd-proxy.cc) calls from its own threads.
#pragma once
#include <node_api.h>
#include <stddef.h>
#include <stdint.h>

namespace lethe {

/** Adds diskReads* to `exports` (docs/nbd.md, "Reads in native code"). */
void DefineDiskReads(napi_env env, napi_value exports);

struct Table;
/** One thread's locked scratch (a derived key, a keystream block) and ciphertext buffer. */
struct Reader;

/** The table behind a diskReadsOpen handle, with a reference taken; throws (null) for anything else. */
Table *TableRef(napi_env env, napi_value handle);
void TableUnref(Table *t);
/** A reader for another thread; null when locked memory cannot be had. */
Reader *ReaderNew(Table *t);
void ReaderFree(Reader *r);
/** The longest read the table's reply buffers hold, and the room before it for a reply header. */
size_t TableMaxReply(const Table *t);
constexpr size_t REPLY_HEADER_ROOM = 32;
/** A locked reply buffer of REPLY_HEADER_ROOM + TableMaxReply bytes, or null when all are out (the read goes to JavaScript). */
uint8_t *TableTakeReply(Table *t);
void TableGiveReply(Table *t, uint8_t *buf);
/** Bytes of the locked buffer each proxy thread passes payloads through. */
size_t TableCopyBytes(const Table *t);

/**
 * Plaintext of disk bytes [offset, offset + len) into out, from the table alone; false
 * when it cannot serve every byte (out's bytes are then undefined). Thread-safe.
 */
bool TableRead(Table *t, Reader *r, uint64_t offset, uint8_t *out, size_t len);

}  // namespace lethe
