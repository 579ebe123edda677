// The disk's warm-read table (disk-reads.cc): its N-API functions, added to the addon's exports.
#pragma once
#include <node_api.h>

namespace lethe {

/** Adds diskReads* to `exports` (docs/nbd.md, "Reads in native code"). */
void DefineDiskReads(napi_env env, napi_value exports);

}  // namespace lethe
