/* Fast-path delivery into a local pod, shared by from_pod (same node) and from_overlay (from
 * another node). */
#ifndef SKNF_DELIVER_H
#define SKNF_DELIVER_H

#include "counters.h"

static __always_inline struct sknf_config *node_config(void)
{
	__u32 slot = 0;
	struct sknf_config *cfg = config.lookup(&slot);

	return cfg && cfg->vxlan_ifindex ? cfg : NULL;
}

/* Only frames addressed to the pod's own MAC (those the bridge would hand to its port) go straight
 * in, and none for a pod shaped on its host veth (ENDPOINT_SHAPED); bpf_redirect_peer lands them in
 * the pod's netns, skipping the host veth's egress hook, so the pod's rx is counted here. PACKET_HOST: older kernels drop peer-redirected frames still marked for
 * another host. Returns the verdict; the caller counts drops against the pod it accounts for. */
static __always_inline int deliver_to_pod(struct __sk_buff *skb, const __u8 *h_dest, struct endpoint_info *ep)
{
	__u32 len = skb->len;
	int verdict;

	if (!mac_equal(h_dest, ep->mac) || ep->flags & (ENDPOINT_SHAPED | ENDPOINT_POLICY))
		return TC_ACT_OK;
	bpf_skb_change_type(skb, PACKET_HOST);
	verdict = bpf_redirect_peer(ep->ifindex, 0);
	if (verdict == TC_ACT_REDIRECT)
		count_received(ep->ifindex, len, verdict);
	return verdict;
}

#endif
