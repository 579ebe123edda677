// A guest write's chunk sealed, hashed and written on a libuv pool thread (seal-write.cc).
#pragma once
#include <node_api.h>

namespace lethe {

/** Adds sealWrite to `exports`. */
void DefineSealWrite(napi_env env, napi_value exports);

}  // namespace lethe
