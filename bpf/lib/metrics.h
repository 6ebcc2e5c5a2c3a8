/* Per-reason, per-direction packet and byte counters. */
#ifndef CILIUMPY_METRICS_H
#define CILIUMPY_METRICS_H

#include "common.h"

#ifndef METRICS_MAP_SIZE
#define METRICS_MAP_SIZE 1024
#endif

struct metrics_key {
	__u8 reason; /* 0 forwarded, otherwise the drop reason */
	__u8 dir;    /* METRIC_DIR_* */
	__u16 reserved[3];
};

struct metrics_value {
	__u64 count;
	__u64 bytes;
};

/* ciliumpy_metrics: per-CPU packet/byte counts by (reason, direction) */
PINNED_MAP("percpu_hash", struct metrics_key, struct metrics_value, ciliumpy_metrics,
	   METRICS_MAP_SIZE);

static __always_inline void metrics_update(__u8 reason, __u8 dir, __u32 bytes)
{
	struct metrics_key key = {};
	struct metrics_value zero = {}, *entry;

	key.reason = reason;
	key.dir = dir;
	entry = ciliumpy_metrics.lookup_or_try_init(&key, &zero);
	if (entry) {
		/* Per-CPU values: no other CPU writes this copy, plain adds suffice. */
		entry->count += 1;
		entry->bytes += bytes;
	}
}

#endif /* CILIUMPY_METRICS_H */
