/* Source validation of every frame a pod sends, before anything forwards it (fast path or bridge).
 *
 * Every pod shares one L2 domain, so a frame with another's MAC, IPv4 source or ARP sender would be
 * believed cluster-wide. On its host veth a pod may send only: Ethernet source = the attachment's
 * MAC; IPv4 with a source leased to its container; Ethernet/IPv4 ARP whose sender MAC is its own and
 * whose sender address is its container's or 0.0.0.0 (a probe). An IPv4 frame with a source not
 * leased counts as spoofed_ip whatever its MAC. Everything else -- IPv6 (no
 * dual-stack yet), other EtherTypes, VLAN tags, frames too short to check -- is dropped, and counted
 * in pod_refused by reason. The kernel datapath applies the same rules in nftables (sknf/guard.py).
 */
#ifndef SKNF_GUARD_H
#define SKNF_GUARD_H

#include <uapi/linux/if_arp.h>

#include "events.h"

/* The fixed part of an Ethernet/IPv4 ARP packet. */
struct arp_ipv4 {
	__be16 hrd;
	__be16 pro;
	__u8 hln;
	__u8 pln;
	__be16 op;
	__u8 sha[ETH_ALEN];
	__be32 sip;
	__u8 tha[ETH_ALEN];
	__be32 tip;
} __attribute__((packed));

static __always_inline int refuse(struct __sk_buff *skb, int reason)
{
	struct refused_counters zero = {};
	__u32 ifindex = skb->ifindex;
	struct refused_counters *c = pod_refused.lookup_or_try_init(&ifindex, &zero);

	if (c && reason >= 0 && reason < REFUSED_REASONS)
		c->packets[reason]++;
	event_drop(skb, HOOK_FROM_POD, reason);
	return TC_ACT_SHOT;
}

static __always_inline struct pod_identity *source_of(__u32 ifindex, __be32 addr)
{
	struct source_key key = {.ifindex = ifindex, .addr = addr};

	return pod_sources.lookup(&key);
}

/* TC_ACT_OK when the pod may send this frame, else TC_ACT_SHOT (counted). IPv4, nearly all of a pod's
 * frames, costs one lookup: its (veth, source) entry carries the veth's MAC. */
static __always_inline int guard_source(struct __sk_buff *skb)
{
	void *data = (void *)(long)skb->data;
	void *data_end = (void *)(long)skb->data_end;
	struct ethhdr *eth = data;
	__u32 ifindex = skb->ifindex;
	struct pod_identity *id;

	if ((void *)(eth + 1) > data_end || skb->vlan_present)
		return refuse(skb, REFUSED_PROTOCOL);
	if (eth->h_proto == bpf_htons(ETH_P_IP)) {
		struct iphdr *ip = (void *)(eth + 1);

		if ((void *)(ip + 1) > data_end)
			return refuse(skb, REFUSED_PROTOCOL);
		id = source_of(ifindex, ip->saddr);
		if (!id)
			return refuse(skb, REFUSED_IP);
		return mac_equal(eth->h_source, id->mac) ? TC_ACT_OK : refuse(skb, REFUSED_MAC);
	}
	id = pod_identity.lookup(&ifindex);
	if (!id || !mac_equal(eth->h_source, id->mac))
		return refuse(skb, REFUSED_MAC);
	if (eth->h_proto == bpf_htons(ETH_P_ARP)) {
		struct arp_ipv4 *arp = (void *)(eth + 1);

		if ((void *)(arp + 1) > data_end || arp->hrd != bpf_htons(ARPHRD_ETHER) ||
		    arp->pro != bpf_htons(ETH_P_IP) || arp->hln != ETH_ALEN || arp->pln != 4)
			return refuse(skb, REFUSED_ARP);
		if (!mac_equal(arp->sha, id->mac) || (arp->sip && !source_of(ifindex, arp->sip)))
			return refuse(skb, REFUSED_ARP);
		return TC_ACT_OK;
	}
	if (eth->h_proto == bpf_htons(ETH_P_IPV6))
		return refuse(skb, REFUSED_IPV6);
	return refuse(skb, REFUSED_PROTOCOL);
}

#endif
