/* Source validation of every frame a pod sends, before anything forwards it (fast path or bridge).
 *
 * Every pod shares one L2 domain, so a frame with another's MAC, IPv4 source or ARP sender would be
 * believed cluster-wide. On its host veth a pod may send only: Ethernet source = the attachment's
 * MAC; IPv4 with a source leased to its container; Ethernet/IPv4 ARP whose sender MAC is its own and
 * whose sender address is its container's or 0.0.0.0 (a probe). An IPv4 frame with a source not
 * leased counts as spoofed_ip whatever its MAC. IPv6 only from a pod with an IPv6 lease (dual-stack),
 * with a source in pod_sources6 (its container's IPv6 leases, its link-local address) or :: for
 * ICMPv6 (DAD, MLD); no router advertisement or redirect; a neighbour advertisement only for one of
 * its own addresses (guard_ipv6); NDP's link-layer address options only with its own MAC
 * (nd_options_own). Everything else -- other EtherTypes, VLAN tags, frames too short to check, more
 * extension headers than are walked -- is dropped, and counted in pod_refused by reason.
 * The kernel datapath applies the same rules in nftables (sknf/guard.py).
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

#define IPV6_EXT_HEADERS 4 /* extension headers walked to find the upper-layer protocol */
#define NEXTHDR_NONE 59

static __always_inline int source6_known(__u32 ifindex, const __u8 *addr)
{
	struct source6_key key = {.ifindex = ifindex};

	__builtin_memcpy(key.addr, addr, sizeof(key.addr));
	return pod_sources6.lookup(&key) != NULL;
}

static __always_inline int ipv6_extension(__u8 next)
{
	return next == IPPROTO_HOPOPTS || next == IPPROTO_ROUTING || next == IPPROTO_FRAGMENT ||
	       next == IPPROTO_DSTOPTS || next == IPPROTO_AH;
}

/* A router or neighbour solicitation or a neighbour advertisement (type) at off, len bytes long: no
 * option, or one 8-byte option right after the fixed body whose MAC, if it is a source or target
 * link-layer address, is the pod's. A receiver takes such an option wherever it is, so any other layout
 * (extension headers before the message included) is refused: Linux sends none, and the nftables rules
 * of the kernel datapath, which cannot walk options, check exactly this. */
static __always_inline int nd_options_own(struct __sk_buff *skb, __u32 off, __u16 len, __u8 type, const __u8 *mac)
{
	__u16 body = type == 133 ? 8 : 24;
	__u8 opt[8];

	if (off != ETH_HLEN + sizeof(struct ipv6hdr))
		return 0;
	if (len == body)
		return 1;
	if (len != body + sizeof(opt) || bpf_skb_load_bytes(skb, off + body, opt, sizeof(opt)) < 0 || opt[1] != 1)
		return 0;
	return (opt[0] != 1 && opt[0] != 2) || mac_equal(opt + 2, mac);
}

/* A pod's IPv6 frame (its MAC already checked). Whether the pod has IPv6 at all is whether its
 * link-local address, which the kernel derives from its MAC (EUI-64), is one of its sources. */
static __always_inline int guard_ipv6(struct __sk_buff *skb, __u32 ifindex, const struct pod_identity *id)
{
	__u8 ll[16] = {0xfe, 0x80, 0, 0, 0, 0, 0, 0, id->mac[0] ^ 2, id->mac[1], id->mac[2], 0xff, 0xfe,
		       id->mac[3], id->mac[4], id->mac[5]};
	__u32 off = ETH_HLEN + sizeof(struct ipv6hdr);
	struct ipv6hdr ip6;
	__u8 next, icmp[24];

	if (!source6_known(ifindex, ll))
		return refuse(skb, REFUSED_IPV6);
	if (bpf_skb_load_bytes(skb, ETH_HLEN, &ip6, sizeof(ip6)) < 0)
		return refuse(skb, REFUSED_PROTOCOL);
	next = ip6.nexthdr;
#pragma unroll
	for (int i = 0; i < IPV6_EXT_HEADERS; i++) {
		__u8 ext[4];

		if (!ipv6_extension(next))
			break;
		if (bpf_skb_load_bytes(skb, off, ext, sizeof(ext)) < 0)
			return refuse(skb, REFUSED_PROTOCOL);
		if (next == IPPROTO_FRAGMENT && ((ext[2] << 8 | ext[3]) & 0xfff8)) {
			next = NEXTHDR_NONE; /* not the first fragment: no upper-layer header to check */
			break;
		}
		off += next == IPPROTO_FRAGMENT ? 8 : next == IPPROTO_AH ? (ext[1] + 2) * 4 : (ext[1] + 1) * 8;
		next = ext[0];
	}
	if (ipv6_extension(next))
		return refuse(skb, REFUSED_PROTOCOL);
	if (!(ip6.saddr.in6_u.u6_addr32[0] | ip6.saddr.in6_u.u6_addr32[1] | ip6.saddr.in6_u.u6_addr32[2] |
	      ip6.saddr.in6_u.u6_addr32[3])) { /* :: */
		if (next != IPPROTO_ICMPV6)
			return refuse(skb, REFUSED_IP);
	} else if (!source6_known(ifindex, ip6.saddr.in6_u.u6_addr8)) {
		return refuse(skb, REFUSED_IP);
	}
	if (next != IPPROTO_ICMPV6)
		return TC_ACT_OK;
	if (bpf_skb_load_bytes(skb, off, icmp, 1) < 0)
		return refuse(skb, REFUSED_PROTOCOL);
	if (icmp[0] == 134 || icmp[0] == 137) /* router advertisement, redirect: a pod is never a router */
		return refuse(skb, REFUSED_IPV6);
	if ((icmp[0] == 133 || icmp[0] == 135 || icmp[0] == 136) &&
	    !nd_options_own(skb, off, bpf_ntohs(ip6.payload_len), icmp[0], id->mac))
		return refuse(skb, REFUSED_ARP);
	if (icmp[0] == 136) { /* neighbour advertisement: its target must be the pod's own */
		if (bpf_skb_load_bytes(skb, off, icmp, sizeof(icmp)) < 0 || !source6_known(ifindex, icmp + 8))
			return refuse(skb, REFUSED_ARP);
	}
	return TC_ACT_OK;
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
		return guard_ipv6(skb, ifindex, id);
	return refuse(skb, REFUSED_PROTOCOL);
}

#endif
