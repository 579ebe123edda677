// The NBD read proxy (nbd-proxy.cc): its N-API functions, added to the addon's exports.
#pragma once
#include <node_api.h>

namespace lethe {

/** Adds nbdProxy* to `exports` (docs/nbd.md, "Reads in native code"). */
void DefineNbdProxy(napi_env env, napi_value exports);

}  // namespace lethe
