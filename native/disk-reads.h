// The disk's warm-read table's N-API functions (disk-reads.cc; the table itself is
// disk-table.h), and the handle the NBD read proxy (nbd-proxy.cc) takes it by.
#pragma once
#include <node_api.h>

#include "disk-table.h"

namespace lethe {

/** Adds diskReads* to `exports` (docs/nbd.md, "Reads in native code"). */
void DefineDiskReads(napi_env env, napi_value exports);

/** The table behind a diskReadsOpen handle, with a reference taken (TableUnref lets go); throws (null) for anything else. */
Table *TableRef(napi_env env, napi_value handle);

}  // namespace lethe
