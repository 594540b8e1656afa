/* Flows that must stay on the kernel path because conntrack rewrites them (Services).
 *
 * kube-proxy's DNAT happens in the node's stack; a backend's reply redirected straight to the client
 * would skip the reverse NAT and arrive from the backend's address. Every pod-sourced frame that
 * reaches a host veth's or vxsknf's egress hook without the fast-path mark came through the bridge
 * or the routing stack, i.e. possibly through NAT: its reply's tuple (the reversed tuple) is learned
 * here, and the fast path looks each frame's own tuple up before taking it.
 */
#ifndef SKNF_FLOWS_H
#define SKNF_FLOWS_H

#include "maps.h"

static __always_inline int is_kernel_flow(struct flow_key *tuple)
{
	return kernel_flows.lookup(tuple) != NULL;
}

static __always_inline void learn_reply_flow(struct __sk_buff *skb, struct sknf_config *cfg)
{
	struct packet pkt = {};
	struct flow_key reply = {};
	struct flow_state live = {};
	struct flow_state *known;

	if (skb->mark & SKNF_MARK_FAST || parse_ipv4(skb, &pkt) < 0)
		return;
	if (!in_net(pkt.tuple.saddr, cfg->cluster_net, cfg->cluster_mask))
		return;
	reply.saddr = pkt.tuple.daddr;
	reply.daddr = pkt.tuple.saddr;
	reply.sport = pkt.tuple.dport;
	reply.dport = pkt.tuple.sport;
	reply.proto = pkt.tuple.proto;
	known = kernel_flows.lookup(&reply);
	if (known && !known->exempt)
		return;
	kernel_flows.update(&reply, &live);
}

#endif
