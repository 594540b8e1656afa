/* Programs on the VXLAN device vxsknf: frames from and to the other nodes. Neither counts: a pod's
 * frames are counted where they leave or enter the pod. */
#include "lib/deliver.h"
#include "lib/events.h"
#include "lib/flows.h"

/* A frame from another node for a local pod goes straight into it unless its flow is a learned NAT
 * flow. */
static __always_inline int forward_from_overlay(struct __sk_buff *skb)
{
	struct sknf_config *cfg = node_config();
	struct endpoint_info *ep;
	struct packet pkt = {};
	int verdict;

	if (!cfg || parse_ipv4(skb, &pkt) < 0 || is_kernel_flow(&pkt.tuple))
		return TC_ACT_OK;
	ep = endpoints.lookup(&pkt.tuple.daddr);
	if (!ep)
		return TC_ACT_OK;
	verdict = deliver_to_pod(skb, &pkt, ep);
	if (verdict != TC_ACT_OK && verdict != TC_ACT_REDIRECT)
		count_received(ep->ifindex, skb->len, verdict);
	return verdict;
}

/* Hook: tc ingress of vxsknf (direction: other node -> this node, decapsulated). */
int from_overlay(struct __sk_buff *skb)
{
	int verdict = forward_from_overlay(skb);

	event_forwarded(skb, HOOK_FROM_OVERLAY, verdict);
	return verdict;
}

/* Hook: tc egress of vxsknf (direction: this node -> other nodes). Frames the fast path redirected
 * here carry SKNF_MARK_FAST: the mark is cleared and nothing learned. Unmarked pod frames came
 * through the bridge or the routing stack: learn their reply tuple. */
int to_overlay(struct __sk_buff *skb)
{
	struct sknf_config *cfg;
	__u32 mark = skb->mark;

	if (mark & SKNF_MARK_FAST) {
		skb->mark = mark & ~SKNF_MARK_FAST;
		return TC_ACT_OK;
	}
	cfg = node_config();
	if (cfg)
		learn_reply_flow(skb, cfg);
	return TC_ACT_OK;
}
