/* NetworkPolicy verdicts in the programs, for the flows they fast-path (IPv4 pod <-> pod in the
 * cluster, not NATed); everything else of a selected pod takes the kernel path, where the same rules
 * are in `table inet sknf-policy` (sknf/policy/nft.py).
 *
 * The agent compiles each selected endpoint's rules, per direction it is selected in, into policy_rules
 * (sknf/policy/bpfrules.py): an LPM trie keyed by (endpoint, direction | generation, peer prefix) whose
 * value is the port set allowed to that peer; the prefixes of one endpoint direction are disjoint, so the
 * longest match is the only one. endpoint_info.flags says which directions are decided here
 * (ENDPOINT_INGRESS, ENDPOINT_EGRESS) and which generation of entries is live (ENDPOINT_POLICY_GEN): the
 * agent writes a changed endpoint's rules under the other generation, then flips its flags in one
 * update, so a change is atomic per endpoint. An endpoint whose rules exceed the bounds (prefixes,
 * SKNF_POLICY_PORTS ranges per prefix) gets ENDPOINT_POLICY instead: the kernel path, as before.
 *
 * A flow is decided on its first frame: the sender's egress (if decided here) and the receiver's
 * ingress (if decided here) must both allow it, else the frame is dropped, counted in policy_drops
 * against the pod whose rule refused it and reported as a drop with reason DROP_POLICY. An allowed
 * flow with either end decided here (in any direction) is remembered in policy_flows by canonical
 * tuple, so its replies pass without any rule being looked at. policy_flows has no LRU: the agent deletes an entry only after the flow has been idle for
 * conntrack's timeout of its kind (sknf/datapath/bpf.py, sweep), so a live flow keeps its entry. When it
 * is full, a new flow takes the kernel path unremembered: nftables and conntrack decide it, and its
 * reply tuple is learned in kernel_flows as any kernel-path flow's, so its later frames keep to the
 * kernel path (is_kernel_flow, or the reversed tuple below) without being decided here again.
 *
 * A remembered flow's frames that must take the kernel path anyway (an ICMP error about it, every frame
 * while flow_guard holds the fast path off, an end that has since got ENDPOINT_POLICY) carry
 * SKNF_MARK_POLICY there: netfilter never saw the flow, and the table accepts what the programs allowed
 * (as conntrack's established flows go on after a change) rather than judging a reply as a new flow. A
 * flow is remembered only when every local end of it was decided here, so the mark never skips a rule
 * the programs did not check.
 */
#ifndef SKNF_POLICY_H
#define SKNF_POLICY_H

#include <uapi/linux/tcp.h>

#include "counters.h"
#include "events.h"

/* policy_key.direction, ORed with POLICY_GEN for generation 1. */
#define POLICY_INGRESS 0
#define POLICY_EGRESS 1
#define POLICY_GEN 2
#define POLICY_KEY_BITS 64 /* endpoint and direction: the prefix length before the peer's bits */

#define DROP_POLICY (DROP_REDIRECT + 1) /* refused by a NetworkPolicy (events' reason) */

/* What policy_verdict says of a frame. */
enum policy_outcome {
	POLICY_PASS, /* go on as without policy */
	POLICY_DENIED, /* dropped: counted and reported already */
	POLICY_KERNEL, /* allowed but not remembered: the kernel path decides again */
};

/* Returned by the forward_* functions for a frame policy dropped: already reported, TC_ACT_SHOT. */
#define SKNF_ACT_POLICY 0x100

static __always_inline int ports_allow(struct policy_ports *p, __u8 proto, __u16 port)
{
	if (p->any)
		return 1;
#pragma unroll
	for (int i = 0; i < SKNF_POLICY_PORTS; i++) {
		if (i >= p->count)
			break;
		if (p->ranges[i].proto == proto && p->ranges[i].first <= port && port <= p->ranges[i].last)
			return 1;
	}
	return 0;
}

/* Does the endpoint's live generation of rules in this direction allow the flow's first frame? The port
 * is the flow's destination port in both directions. */
static __always_inline int rules_allow(struct endpoint_info *ep, __be32 local, __u32 direction, __be32 peer,
				       struct flow_key *t)
{
	struct policy_key key = {.prefixlen = POLICY_KEY_BITS + 32, .endpoint = local, .peer = peer};
	struct policy_ports *p;

	key.direction = direction | (ep->flags & ENDPOINT_POLICY_GEN ? POLICY_GEN : 0);
	p = policy_rules.lookup(&key);
	return p && ports_allow(p, t->proto, bpf_ntohs(t->dport));
}

static __always_inline void policy_refuse(struct __sk_buff *skb, __u32 ifindex, int hook)
{
	__u64 zero = 0;
	__u64 *n = policy_drops.lookup_or_try_init(&ifindex, &zero);

	if (n)
		(*n)++;
	event_drop(skb, hook, DROP_POLICY);
}

/* The TCP flags of an IPv4 frame (0 when they cannot be read). */
static __always_inline __u8 tcp_flags(struct __sk_buff *skb)
{
	__u8 ihl, flags;

	if (bpf_skb_load_bytes(skb, ETH_HLEN, &ihl, 1) < 0 ||
	    bpf_skb_load_bytes(skb, ETH_HLEN + (ihl & 0xf) * 4 + 13, &flags, 1) < 0)
		return 0;
	return flags;
}

#define TCP_FIN 0x01
#define TCP_SYN 0x02
#define TCP_RST 0x04
#define TCP_ACK 0x10

/* A remembered flow's frame: refreshes it, and notes a TCP FIN or RST (the agent then forgets it after
 * conntrack's shorter timeout). Returns 0 for a SYN opening a new connection on the tuple of a closing
 * one: that is a new flow, decided again (as conntrack would see it). */
static __always_inline int flow_touch(struct __sk_buff *skb, struct policy_flow *f, struct flow_key *t)
{
	__u64 now = bpf_ktime_get_boot_ns();

	if (t->proto == IPPROTO_TCP) {
		__u8 flags = tcp_flags(skb);

		if (f->closing && (flags & (TCP_SYN | TCP_ACK)) == TCP_SYN)
			return 0;
		if (!f->closing && flags & (TCP_FIN | TCP_RST))
			f->closing = 1;
	}
	if (now - f->last_seen > 1000000000ULL) /* at most one write a second per flow */
		f->last_seen = now;
	return 1;
}

/* The frame of a flow between src and dst (each the local endpoint, or NULL), neither of them
 * ENDPOINT_POLICY. */
static __always_inline int policy_verdict(struct __sk_buff *skb, struct flow_key *t, struct endpoint_info *src,
					  struct endpoint_info *dst, int hook)
{
	int egress = src && src->flags & ENDPOINT_EGRESS;
	int ingress = dst && dst->flags & ENDPOINT_INGRESS;
	struct policy_flow fresh = {};
	struct flow_key key = {}, reverse = {};
	struct policy_flow *known;

	/* A flow with a decided end is remembered even when no rule applies to its first frame (a pod
	 * selected for ingress only opening a connection): its replies will meet that end's rules. */
	if (!(src && src->flags & ENDPOINT_DECIDED) && !(dst && dst->flags & ENDPOINT_DECIDED))
		return POLICY_PASS;
	event_canonical(&key, t);
	known = policy_flows.lookup(&key);
	if (known && flow_touch(skb, known, t))
		return POLICY_PASS;
	/* Not remembered but known to conntrack (it went the kernel path while the map was full). */
	reverse.saddr = t->daddr;
	reverse.daddr = t->saddr;
	reverse.sport = t->dport;
	reverse.dport = t->sport;
	reverse.proto = t->proto;
	if (kernel_flows.lookup(&reverse))
		return POLICY_KERNEL;
	if (egress && !rules_allow(src, t->saddr, POLICY_EGRESS, t->daddr, t)) {
		policy_refuse(skb, src->ifindex, hook);
		return POLICY_DENIED;
	}
	if (ingress && !rules_allow(dst, t->daddr, POLICY_INGRESS, t->saddr, t)) {
		policy_refuse(skb, dst->ifindex, hook);
		if (hook == HOOK_FROM_POD) /* a drop of the receiver's too (from_overlay counts its own) */
			count_received(dst->ifindex, skb->len, TC_ACT_SHOT);
		return POLICY_DENIED;
	}
	fresh.last_seen = bpf_ktime_get_boot_ns();
	if (policy_flows.update(&key, &fresh) < 0)
		return POLICY_KERNEL;
	return POLICY_PASS;
}

/* A frame on its way to the kernel path whose flow the programs allowed: tell the table so. */
static __always_inline void policy_mark_known(struct __sk_buff *skb, struct flow_key *t)
{
	struct flow_key key = {};

	event_canonical(&key, t);
	if (policy_flows.lookup(&key))
		skb->mark |= SKNF_MARK_POLICY;
}

/* An IPv4 ICMP error (which parse_ipv4 leaves to the kernel path): marked when the flow it quotes is
 * one the programs allowed and it goes back to that flow's sender. */
static __always_inline void policy_mark_icmp_error(struct __sk_buff *skb)
{
	struct iphdr ip, inner;
	struct flow_key quoted = {};
	__u8 type;
	__be16 ports[2] = {};
	__u32 off;

	if (skb->protocol != bpf_htons(ETH_P_IP) || bpf_skb_load_bytes(skb, ETH_HLEN, &ip, sizeof(ip)) < 0 ||
	    ip.protocol != IPPROTO_ICMP || ip.ihl < 5 || ip.frag_off & bpf_htons(IP_MF | IP_OFFSET))
		return;
	off = ETH_HLEN + ip.ihl * 4;
	if (bpf_skb_load_bytes(skb, off, &type, 1) < 0 || !is_icmp_error(type))
		return;
	off += 8; /* the ICMP header; then the quoted IP header and 8 bytes of its payload */
	if (bpf_skb_load_bytes(skb, off, &inner, sizeof(inner)) < 0 || inner.ihl < 5 || inner.saddr != ip.daddr)
		return;
	if (inner.protocol == IPPROTO_TCP || inner.protocol == IPPROTO_UDP || inner.protocol == IPPROTO_SCTP) {
		if (bpf_skb_load_bytes(skb, off + inner.ihl * 4, ports, sizeof(ports)) < 0)
			return;
	} else if (inner.protocol != IPPROTO_ICMP) {
		return;
	}
	quoted.saddr = inner.saddr;
	quoted.daddr = inner.daddr;
	quoted.sport = ports[0];
	quoted.dport = ports[1];
	quoted.proto = inner.protocol;
	policy_mark_known(skb, &quoted);
}

#endif
