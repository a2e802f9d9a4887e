#include "common/api.h"

extern "C" int32_t sdrt_kernels_abi_version(void) { return 4; }
