// The userfaultfd fault server of lethe_native.node (fault-server.cc).
#pragma once
#include <node_api.h>

namespace lethe {

/** Adds startFaultThread, resolveFault, wakeRange, stopFaultThread and faultStats to `exports` (docs/uffd.md). */
void DefineFaultServer(napi_env env, napi_value exports);

}  // namespace lethe
