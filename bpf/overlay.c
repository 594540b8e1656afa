/* Programs on the VXLAN device vxsknf: frames from and to the other nodes. Neither counts: a pod's
 * frames are counted where they leave or enter the pod. */
#include "lib/deliver.h"
#include "lib/events.h"
#include "lib/flows.h"
#include "lib/policy.h"

/* A delivery the programs refused (policy, or a redirect that failed) counts against the pod it was for. */
static __always_inline int counted(struct __sk_buff *skb, struct endpoint_info *ep, int verdict)
{
	if (verdict != TC_ACT_OK && verdict != TC_ACT_REDIRECT)
		count_received(ep->ifindex, skb->len, verdict);
	return verdict;
}

/* A frame from another node for a local pod goes straight into it unless its flow is a learned NAT
 * flow. */
static __always_inline int forward4_from_overlay(struct __sk_buff *skb, struct packet *pkt)
{
	struct endpoint_info *ep;
	int verdict;

	if (is_kernel_flow(&pkt->tuple)) {
		policy_mark_known(skb, &pkt->tuple);
		return TC_ACT_OK;
	}
	ep = endpoints.lookup(&pkt->tuple.daddr);
	if (!ep)
		return TC_ACT_OK;
	if (ep->flags & ENDPOINT_POLICY) {
		policy_mark_known(skb, &pkt->tuple);
		return TC_ACT_OK;
	}
	verdict = policy_verdict(skb, &pkt->tuple, NULL, ep, HOOK_FROM_OVERLAY);
	if (verdict == POLICY_KERNEL)
		return TC_ACT_OK;
	return counted(skb, ep, verdict == POLICY_DENIED ? SKNF_ACT_POLICY : deliver_to_pod(skb, pkt->h_dest, ep));
}

/* The same for IPv6 (a pod a NetworkPolicy selects: the kernel path, see from_pod.c). */
static __always_inline int forward6_from_overlay(struct __sk_buff *skb, struct packet6 *pkt)
{
	struct endpoint_info *ep;

	if (is_kernel_flow6(&pkt->tuple))
		return TC_ACT_OK;
	ep = endpoints6.lookup(&pkt->tuple.daddr);
	if (!ep)
		return TC_ACT_OK;
	return counted(skb, ep, deliver_to_pod(skb, pkt->h_dest, ep));
}

/* Frames neither parser reads, or all before the agent set the node up, take the kernel path; an ICMP
 * error among them is marked when it belongs to a flow the programs allowed (bpf/lib/policy.h). */
static __always_inline int forward_from_overlay(struct __sk_buff *skb)
{
	struct packet pkt = {};
	struct packet6 pkt6 = {};

	if (skb->mark & SKNF_MARK_POLICY) /* only the programs of this node say so */
		skb->mark &= ~SKNF_MARK_POLICY;
	if (!node_config()) {
		policy_mark_icmp_error(skb);
		return TC_ACT_OK;
	}
	if (parse_ipv4(skb, &pkt) == 0)
		return forward4_from_overlay(skb, &pkt);
	if (node_config6() && parse_ipv6(skb, &pkt6) == 0)
		return forward6_from_overlay(skb, &pkt6);
	policy_mark_icmp_error(skb);
	return TC_ACT_OK;
}

/* Hook: tc ingress of vxsknf (direction: other node -> this node, decapsulated). */
int from_overlay(struct __sk_buff *skb)
{
	int verdict = forward_from_overlay(skb);

	if (verdict == SKNF_ACT_POLICY)
		return TC_ACT_SHOT; /* reported by policy_verdict */
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

	if (mark & SKNF_MARK_POLICY) /* netfilter has seen it: not for the outer packet */
		skb->mark = mark &= ~SKNF_MARK_POLICY;
	if (mark & SKNF_MARK_FAST) {
		skb->mark = mark & ~SKNF_MARK_FAST;
		return TC_ACT_OK;
	}
	cfg = node_config();
	if (cfg)
		learn_reply_flow(skb, cfg);
	return TC_ACT_OK;
}
