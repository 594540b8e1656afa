/* Per-pod counters. Each frame is counted once, where it enters or leaves the pod:
 *   tx: at the pod's host-veth ingress (from_pod), whatever path it takes next;
 *   rx: at the pod's host-veth egress (to_pod) when the kernel path delivers it, or at the redirect
 *       when the fast path delivers it (bpf_redirect_peer skips the destination's egress hook).
 */
#ifndef SKNF_COUNTERS_H
#define SKNF_COUNTERS_H

#include "maps.h"

static __always_inline struct pod_counters *counters_of(__u32 ifindex)
{
	struct pod_counters zero = {};

	return pod_counters.lookup_or_try_init(&ifindex, &zero);
}

/* verdict is the program's return value: redirect = fast path, ok = kernel path, else dropped. */
static __always_inline void count_path(struct pod_counters *c, int verdict)
{
	if (verdict == TC_ACT_REDIRECT)
		c->fast_packets++;
	else if (verdict == TC_ACT_OK)
		c->kernel_packets++;
	else
		c->drops++;
}

static __always_inline void count_sent(__u32 ifindex, __u32 len, int verdict)
{
	struct pod_counters *c = counters_of(ifindex);

	if (!c)
		return;
	c->tx_packets++;
	c->tx_bytes += len;
	count_path(c, verdict);
}

static __always_inline void count_received(__u32 ifindex, __u32 len, int verdict)
{
	struct pod_counters *c = counters_of(ifindex);

	if (!c)
		return;
	if (verdict == TC_ACT_REDIRECT || verdict == TC_ACT_OK) {
		c->rx_packets++;
		c->rx_bytes += len;
	}
	count_path(c, verdict);
}

#endif
