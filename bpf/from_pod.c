/* Programs on the pod's host veth, tc ingress: every frame the pod sends ("from the pod"). */
#include "lib/deliver.h"
#include "lib/events.h"
#include "lib/flows.h"
#include "lib/guard.h"
#include "lib/policy.h"

static __always_inline int is_local_mac(const __u8 *mac)
{
	struct mac_key key = {};

	__builtin_memcpy(key.mac, mac, ETH_ALEN);
	return local_macs.lookup(&key) != NULL;
}

/* A pod-to-pod frame for no local endpoint goes straight to vxsknf, unless it is local but unknown (the
 * gateway, a pod not attached yet), routed (sent to the gateway's MAC), broadcast/multicast, or for a
 * local pod's MAC (a pod routing for others): the bridge knows better. */
static __always_inline int to_other_node(struct __sk_buff *skb, struct sknf_config *cfg, const __u8 *h_dest,
					 int in_pod_net)
{
	if (in_pod_net || mac_equal(h_dest, cfg->gateway_mac) || h_dest[0] & 1 || is_local_mac(h_dest))
		return TC_ACT_OK;
	skb->mark |= SKNF_MARK_FAST;
	return bpf_redirect(cfg->vxlan_ifindex, 0);
}

/* Fast path for pod-to-pod IPv4: straight into a local pod, or straight to vxsknf for a pod on
 * another node. Everything else -- ARP, the gateway, the Internet, Services, learned NAT flows, pods
 * this node does not know yet -- stays on the kernel path (TC_ACT_OK). */
static __always_inline int forward4_from_pod(struct __sk_buff *skb, struct sknf_config *cfg, struct packet *pkt)
{
	struct endpoint_info *ep, *src;
	int policy;

	/* A sender whose NetworkPolicy the programs cannot hold: its egress rules live on the kernel path
	 * (flows the programs allowed before it came to that go on, marked). */
	src = endpoints.lookup(&pkt->tuple.saddr);
	if (src && src->flags & ENDPOINT_POLICY) {
		policy_mark_known(skb, &pkt->tuple);
		return TC_ACT_OK;
	}
	if (!in_net(pkt->tuple.daddr, cfg->cluster_net, cfg->cluster_mask))
		return TC_ACT_OK;
	if (is_kernel_flow(&pkt->tuple) || shares_kernel_flow(&pkt->tuple)) {
		policy_mark_known(skb, &pkt->tuple);
		return TC_ACT_OK;
	}
	ep = endpoints.lookup(&pkt->tuple.daddr);
	if (ep && ep->flags & ENDPOINT_POLICY) {
		policy_mark_known(skb, &pkt->tuple);
		return TC_ACT_OK;
	}
	policy = policy_verdict(skb, &pkt->tuple, src, ep, HOOK_FROM_POD);
	if (policy == POLICY_DENIED)
		return SKNF_ACT_POLICY;
	if (policy == POLICY_KERNEL)
		return TC_ACT_OK;
	if (ep)
		return deliver_to_pod(skb, pkt->h_dest, ep);
	return to_other_node(skb, cfg, pkt->h_dest, in_net(pkt->tuple.daddr, cfg->pod_net, cfg->pod_mask));
}

/* The same for pod-to-pod IPv6 that parse_ipv6 reads (TCP, UDP, SCTP, ICMPv6 echo). A pod a
 * NetworkPolicy selects, as sender or receiver, keeps its IPv6 on the kernel path (nftables). */
static __always_inline int forward6_from_pod(struct __sk_buff *skb, struct sknf_config *cfg,
					     struct sknf_config6 *cfg6, struct packet6 *pkt)
{
	struct endpoint_info *ep, *src;

	src = endpoints6.lookup(&pkt->tuple.saddr);
	if (src && src->flags & ENDPOINT_POLICY)
		return TC_ACT_OK;
	if (!in_net6(&pkt->tuple.daddr, cfg6->cluster_net, cfg6->cluster_mask) || is_kernel_flow6(&pkt->tuple) ||
	    shares_kernel_flow6(&pkt->tuple))
		return TC_ACT_OK;
	ep = endpoints6.lookup(&pkt->tuple.daddr);
	if (ep)
		return deliver_to_pod(skb, pkt->h_dest, ep);
	return to_other_node(skb, cfg, pkt->h_dest, in_net6(&pkt->tuple.daddr, cfg6->pod_net, cfg6->pod_mask));
}

/* Frames neither parser reads, or all before the agent set the node up, take the kernel path; an ICMP
 * error among them is marked when it belongs to a flow the programs allowed (bpf/lib/policy.h). */
static __always_inline int forward_from_pod(struct __sk_buff *skb)
{
	struct sknf_config *cfg = node_config();
	struct sknf_config6 *cfg6;
	struct packet pkt = {};
	struct packet6 pkt6 = {};

	if (cfg && parse_ipv4(skb, &pkt) == 0)
		return forward4_from_pod(skb, cfg, &pkt);
	if (cfg && (cfg6 = node_config6()) && parse_ipv6(skb, &pkt6) == 0)
		return forward6_from_pod(skb, cfg, cfg6, &pkt6);
	policy_mark_icmp_error(skb);
	return TC_ACT_OK;
}

/* Everything done to a frame the pod sent: source validation (lib/guard.h), then forwarding; every
 * frame counts as the pod's tx, once, with the path it took (a refused one as a drop). Shared by
 * every program on the host veth's ingress. */
static __always_inline int sent_by_pod(struct __sk_buff *skb)
{
	__u32 len = skb->len;
	int verdict = guard_source(skb);

	if (verdict == TC_ACT_OK) {
		verdict = forward_from_pod(skb);
		if (verdict == SKNF_ACT_POLICY)
			verdict = TC_ACT_SHOT; /* reported by policy_verdict */
		else
			event_forwarded(skb, HOOK_FROM_POD, verdict);
	}
	count_sent(skb->ifindex, len, verdict);
	return verdict;
}

/* Hook: tc ingress of the pod's host veth (direction: pod -> node). */
int from_pod(struct __sk_buff *skb)
{
	return sent_by_pod(skb);
}

/* Hook: tc ingress of a shaped pod's host veth, in from_pod's place (direction: pod -> node). Its
 * frames are validated as every pod's, but none is fast-pathed: TC_ACT_UNSPEC lets classification go
 * on to the next filter, sknf's redirect to the pod's ifb (sknf/shaping.py), after which they take the
 * kernel path. Counted here, once: ifb re-injects them with tc skipped. */
int from_shaped_pod(struct __sk_buff *skb)
{
	__u32 len = skb->len;
	int verdict = guard_source(skb);

	if (verdict == TC_ACT_OK)
		event_forwarded(skb, HOOK_FROM_POD, verdict);
	count_sent(skb->ifindex, len, verdict);
	return verdict == TC_ACT_OK ? TC_ACT_UNSPEC : verdict;
}
