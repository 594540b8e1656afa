/* Flows that must stay on the kernel path because conntrack rewrites them (Services).
 *
 * kube-proxy's DNAT happens in the node's stack; a backend's reply redirected straight to the client
 * would skip the reverse NAT and arrive from the backend's address. Every pod-sourced frame that
 * reaches a host veth's or vxsknf's egress hook without the fast-path mark came through the bridge
 * or the routing stack, i.e. possibly through NAT: its reply's tuple (the reversed tuple) is learned
 * here (kernel_flows; kernel_flows6 for IPv6), and the fast path looks each frame's own tuple up before
 * taking it (a pod's frame its reply tuple too: shares_kernel_flow). A learn the map refuses (full)
 * cannot say which flow it lost: it sets flow_guard's FULL slot, and while that (or the agent's
 * SYNCING) is set no frame takes the fast path at all.
 */
#ifndef SKNF_FLOWS_H
#define SKNF_FLOWS_H

#include "maps.h"

static __always_inline int flows_guarded(void)
{
	__u32 slot = FLOW_GUARD_FULL;
	__u64 *full = flow_guard.lookup(&slot);
	__u64 *syncing;

	slot = FLOW_GUARD_SYNCING;
	syncing = flow_guard.lookup(&slot);
	return (full && *full) || (syncing && *syncing);
}

/* A learn failed (the map is full): from now on the node cannot tell which flow it lost, so every
 * frame takes the kernel path until the agent has made room and re-seeded from conntrack. */
static __always_inline void flows_overflowed(void)
{
	__u32 slot = FLOW_GUARD_FULL;
	__u64 *v = flow_guard.lookup(&slot);

	if (v)
		*v = 1;
	slot = FLOW_GUARD_FAILED_LEARNS;
	v = flow_guard.lookup(&slot);
	if (v)
		__sync_fetch_and_add(v, 1);
}

/* Must this frame take the kernel path? Its own tuple is a learned flow, or the map cannot be trusted. */
static __always_inline int is_kernel_flow(struct flow_key *tuple)
{
	if (flows_guarded())
		return 1;
	return kernel_flows.lookup(tuple) != NULL;
}

static __always_inline int is_kernel_flow6(struct flow6_key *tuple)
{
	if (flows_guarded())
		return 1;
	return kernel_flows6.lookup(tuple) != NULL;
}

static __always_inline struct sknf_config6 *node_config6(void)
{
	__u32 slot = 0;
	struct sknf_config6 *cfg6 = config6.lookup(&slot);

	return cfg6 && cfg6->cluster_mask[0] ? cfg6 : NULL;
}

/* A learn: the tuple, unless learned already (and not exempt). One per family: BCC rewrites map calls
 * in place, so a map cannot be a function's argument. */
static __always_inline void learn4(struct flow_key *key)
{
	struct flow_state live = {};
	struct flow_state *known = kernel_flows.lookup(key);

	if ((!known || known->exempt) && kernel_flows.update(key, &live) < 0)
		flows_overflowed();
}

static __always_inline void learn6(struct flow6_key *key)
{
	struct flow_state live = {};
	struct flow_state *known = kernel_flows6.lookup(key);

	if ((!known || known->exempt) && kernel_flows6.update(key, &live) < 0)
		flows_overflowed();
}

#define REVERSED(t) {.saddr = (t)->daddr, .daddr = (t)->saddr, .sport = (t)->dport, .dport = (t)->sport, \
		      .proto = (t)->proto}

/* A pod's frame whose reply tuple is a learned flow shares that tuple with a NATed one: a connection
 * straight to a Service's backend from the port of the pod's connection through the Service. Only
 * conntrack tells the two apart (it moves this one to another port), so it takes the kernel path, and
 * its own tuple is learned: the rest of it stays there, also once the Service's flow is gone. */
static __always_inline int shares_kernel_flow(struct flow_key *t)
{
	struct flow_key reply = REVERSED(t);

	if (!kernel_flows.lookup(&reply))
		return 0;
	learn4(t);
	return 1;
}

static __always_inline int shares_kernel_flow6(struct flow6_key *t)
{
	struct flow6_key reply = REVERSED(t);

	if (!kernel_flows6.lookup(&reply))
		return 0;
	learn6(t);
	return 1;
}

static __always_inline void learn_reply_flow(struct __sk_buff *skb, struct sknf_config *cfg)
{
	struct packet pkt = {};
	struct packet6 pkt6 = {};
	struct sknf_config6 *cfg6;

	if (skb->mark & SKNF_MARK_FAST)
		return;
	if (parse_ipv4(skb, &pkt) == 0) {
		struct flow_key reply = REVERSED(&pkt.tuple);

		if (in_net(pkt.tuple.saddr, cfg->cluster_net, cfg->cluster_mask))
			learn4(&reply);
	} else if ((cfg6 = node_config6()) && parse_ipv6(skb, &pkt6) == 0) {
		struct flow6_key reply = REVERSED(&pkt6.tuple);

		if (in_net6(&pkt6.tuple.saddr, cfg6->cluster_net, cfg6->cluster_mask))
			learn6(&reply);
	}
}

#endif
