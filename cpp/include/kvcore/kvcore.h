// The whole public C++ API of kvcore: every cache, the masks, prompt-cache
// files and the helpers over a model's caches. Link kvcore::kvcore
// (find_package(kvcore CONFIG REQUIRED)).
#pragma once

#include "kvcore/errors.h"
#include "kvcore/cache.h"
#include "kvcore/kv.h"
#include "kvcore/rotating.h"
#include "kvcore/quant_scheme.h"
#include "kvcore/quantized.h"
#include "kvcore/quantized_rotating.h"
#include "kvcore/quantized_batch.h"
#include "kvcore/disk_tier.h"
#include "kvcore/kv_store.h"
#include "kvcore/lru_prompt_cache.h"
#include "kvcore/prompt_trie.h"
#include "kvcore/prefix_cache.h"
#include "kvcore/attention.h"
#include "kvcore/chunked.h"
#include "kvcore/arrays.h"
#include "kvcore/batch.h"
#include "kvcore/cache_list.h"
#include "kvcore/mask.h"
#include "kvcore/state.h"
#include "kvcore/files.h"
#include "kvcore/prompt.h"
