/* Types and constants shared by every sknf tc program.
 *
 * The agent writes map entries through the ctypes that BCC generates from this file. Reads of
 * endpoints and pod_counters go through sknf/datapath/bpfmaps.py, which mirrors endpoint_info and
 * pod_counters by hand (to read pins without compiling): change those structs there too (each read
 * checks the sizes, tests/bpf/test_maps.py the fields).
 */
#ifndef SKNF_COMMON_H
#define SKNF_COMMON_H

#include <uapi/linux/bpf.h>
#include <uapi/linux/if_ether.h>
#include <uapi/linux/icmp.h>
#include <uapi/linux/icmpv6.h>
#include <uapi/linux/if_packet.h>
#include <uapi/linux/in.h>
#include <uapi/linux/ip.h>
#include <uapi/linux/ipv6.h>
#include <uapi/linux/pkt_cls.h>

/* skb->mark bit on frames the fast path redirects to vxsknf, so vxsknf's egress hook can tell them
 * from frames the kernel path (bridge, netfilter) sent and learns nothing from them. Chosen clear of
 * kube-proxy's 0x4000/0x8000 bits. */
#define SKNF_MARK_FAST 0x00200000
/* skb->mark bit on a frame the programs send to the kernel path although its flow is one they allowed
 * by NetworkPolicy (bpf/lib/policy.h): `table inet sknf-policy` accepts it (netfilter never saw the
 * flow begin). Set only by the programs; cleared on vxsknf's egress. */
#define SKNF_MARK_POLICY 0x00400000

#define IP_MF 0x2000
#define IP_OFFSET 0x1FFF

/* Node-wide settings, written by the agent (BpfDatapath.setup_node) into the one-slot config map.
 * Addresses and masks are in network byte order. vxlan_ifindex == 0 means "not set up yet": every
 * packet then takes the kernel path. */
struct sknf_config {
	__be32 cluster_net;
	__be32 cluster_mask;
	__be32 pod_net; /* this node's pod CIDR */
	__be32 pod_mask;
	__u32 vxlan_ifindex;
	__u8 gateway_mac[ETH_ALEN];
	__u16 pad;
};

/* An IPv6 address as a map key (endpoints6). */
struct addr6 {
	__be32 a[4];
};

/* The node's IPv6 networks (dual-stack or IPv6-only), one slot beside sknf_config, written by the agent
 * with it. Network byte order; an all-zero cluster mask means the cluster has no IPv6: every IPv6 frame
 * then takes the kernel path. */
struct sknf_config6 {
	__be32 cluster_net[4];
	__be32 cluster_mask[4];
	__be32 pod_net[4]; /* this node's IPv6 pod CIDR */
	__be32 pod_mask[4];
};

/* endpoint_info.flags: traffic to the pod is shaped by a qdisc on its host veth, which
 * bpf_redirect_peer would skip: frames for it take the kernel path (the bridge). */
#define ENDPOINT_SHAPED 0x1
/* endpoint_info.flags: a NetworkPolicy selects the pod (sknf/policy_agent.py). Every frame to or from
 * it takes the kernel path, where nftables enforces the policy with conntrack (sknf/policy_nft.py). */
#define ENDPOINT_POLICY 0x2
/* endpoint_info.flags: a NetworkPolicy selects the pod in this direction and the programs decide its
 * flows from policy_rules (bpf/lib/policy.h); ENDPOINT_POLICY_GEN: which generation of its entries is
 * live. Set instead of ENDPOINT_POLICY when its rules fit the maps' bounds. */
#define ENDPOINT_INGRESS 0x4
#define ENDPOINT_EGRESS 0x8
#define ENDPOINT_POLICY_GEN 0x10
#define ENDPOINT_DECIDED (ENDPOINT_INGRESS | ENDPOINT_EGRESS)

/* A local pod, keyed by its IPv4 address (endpoints) or its IPv6 one (endpoints6): where to deliver and which MAC frames for it carry. */
struct endpoint_info {
	__u32 ifindex; /* the pod's host-side veth */
	__u8 mac[ETH_ALEN]; /* the pod's eth0 */
	__u16 flags; /* ENDPOINT_* */
};

/* A local pod's MAC, as the local_macs map keys it. */
struct mac_key {
	__u8 mac[ETH_ALEN];
	__u16 pad;
};

/* Per-pod traffic, per CPU, keyed by the host veth's ifindex; seen from the pod (rx = delivered to
 * it). Bytes are whole frames (skb->len with the Ethernet header), like link statistics. */
struct pod_counters {
	__u64 rx_packets;
	__u64 rx_bytes;
	__u64 tx_packets;
	__u64 tx_bytes;
	__u64 fast_packets; /* sent or received on the fast path */
	__u64 kernel_packets; /* sent or received through the bridge */
	__u64 drops; /* refused by a redirect helper */
};

/* Who a pod's host veth belongs to, keyed by its ifindex: the only Ethernet (and ARP sender) source
 * the pod may use there. */
struct pod_identity {
	__u8 mac[ETH_ALEN]; /* the attachment's pod-side MAC */
	__u16 pad;
};

/* One IPv4 source a pod may send from on one host veth: every address leased to its container. The
 * value is the veth's pod_identity again, so an IPv4 frame is checked with this one lookup. */
struct source_key {
	__u32 ifindex;
	__be32 addr;
};

/* One IPv6 source a pod may send from on one host veth (dual-stack): its container's IPv6 leases and
 * its link-local address; an entry for the link-local one is what says the pod has IPv6 at all. */
struct source6_key {
	__u32 ifindex;
	__u8 addr[16];
};

/* Why source validation refused a pod's frame; indexes pod_refused's counters. Same names, same
 * order as sknf/guard.py's REASONS (the kernel datapath's). */
enum refused_reason {
	REFUSED_MAC, /* Ethernet source is not the attachment's MAC (or the veth is unknown) */
	REFUSED_ARP, /* ARP sender MAC or address not the pod's, not Ethernet/IPv4 ARP, or an NDP
		      * neighbour advertisement for an address not the pod's */
	REFUSED_IP, /* IPv4 or IPv6 source not the pod's container's */
	REFUSED_IPV6, /* IPv6 from a pod without an IPv6 lease; a router advertisement or redirect */
	REFUSED_PROTOCOL, /* any other EtherType, VLAN-tagged or truncated frames */
	REFUSED_REASONS,
};

/* Frames refused per reason, per CPU, keyed by the host veth's ifindex. */
struct refused_counters {
	__u64 packets[REFUSED_REASONS];
};

/* One direction of an IPv4 flow. Ports are zero for protocols without them. */
struct flow_key {
	__be32 saddr;
	__be32 daddr;
	__be16 sport;
	__be16 dport;
	__u8 proto;
	__u8 pad[3];
};

/* One direction of an IPv6 flow (kernel_flows6), as flow_key for IPv4. A map per family, as Cilium keeps
 * its ct4 and ct6 maps: the IPv4 maps' layouts stay as they were, so an upgrade keeps their live flows. */
struct flow6_key {
	struct addr6 saddr;
	struct addr6 daddr;
	__be16 sport;
	__be16 dport;
	__u8 proto;
	__u8 pad[3];
};

/* A flow whose packets must take the kernel path (its NAT lives in conntrack). The agent sets
 * exempt when conntrack no longer knows the flow and deletes the entry one sweep later; a packet
 * learned in between clears it again. */
struct flow_state {
	__u32 exempt;
};

/* policy_rules' key: an endpoint's rules for one direction (POLICY_* in policy.h), by peer prefix. */
struct policy_key {
	__u32 prefixlen; /* 64 + the peer prefix's length */
	__be32 endpoint;
	__u32 direction;
	__be32 peer;
};

#ifndef SKNF_POLICY_PORTS
#define SKNF_POLICY_PORTS 16 /* port ranges allowed to one peer prefix; more: the kernel path */
#endif

/* One allowed range of destination ports (host byte order) of one IP protocol. */
struct port_range {
	__u8 proto;
	__u8 pad;
	__u16 first;
	__u16 last;
};

/* What a peer prefix may use: any protocol and port, or count ranges. */
struct policy_ports {
	__u8 any;
	__u8 count;
	__u16 pad;
	struct port_range ranges[SKNF_POLICY_PORTS];
};

/* A flow the programs allowed by policy, by canonical tuple (events.h). */
struct policy_flow {
	__u64 last_seen; /* bpf_ktime_get_boot_ns(), refreshed at most once a second */
	__u32 closing; /* a TCP FIN or RST was seen */
	__u32 pad;
};

/* What the programs need from one frame: its destination MAC and, for IPv4, its own 5-tuple. */
struct packet {
	__u8 h_dest[ETH_ALEN];
	struct flow_key tuple;
};

/* The same for an IPv6 frame. */
struct packet6 {
	__u8 h_dest[ETH_ALEN];
	struct flow6_key tuple;
};

static __always_inline int in_net(__be32 addr, __be32 net, __be32 mask)
{
	return (addr & mask) == net;
}

static __always_inline int in_net6(const struct addr6 *addr, const __be32 *net, const __be32 *mask)
{
	return (addr->a[0] & mask[0]) == net[0] && (addr->a[1] & mask[1]) == net[1] &&
	       (addr->a[2] & mask[2]) == net[2] && (addr->a[3] & mask[3]) == net[3];
}

static __always_inline int mac_equal(const __u8 *a, const __u8 *b)
{
	return a[0] == b[0] && a[1] == b[1] && a[2] == b[2] && a[3] == b[3] && a[4] == b[4] &&
	       a[5] == b[5];
}

/* An ICMP error (destination unreachable incl. frag-needed, source quench, redirect, time exceeded,
 * parameter problem) is about another flow, whose header it quotes. Only conntrack can translate
 * the quoted header of a NATed flow back (a Service's "port unreachable" must reach the client from
 * the ClusterIP), so these always take the kernel path; they are rare. */
static __always_inline int is_icmp_error(__u8 type)
{
	return type == ICMP_DEST_UNREACH || type == ICMP_SOURCE_QUENCH || type == ICMP_REDIRECT ||
	       type == ICMP_TIME_EXCEEDED || type == ICMP_PARAMETERPROB;
}

/* Reads an unfragmented IPv4 frame into pkt. Anything else (ARP, IPv6, fragments, ICMP errors,
 * headers the program cannot see) returns -1, and the caller leaves the frame to the kernel path. */
static __always_inline int parse_ipv4(struct __sk_buff *skb, struct packet *pkt)
{
	void *data = (void *)(long)skb->data;
	void *data_end = (void *)(long)skb->data_end;
	struct ethhdr *eth = data;
	struct iphdr *ip = data + sizeof(*eth);

	if ((void *)(ip + 1) > data_end)
		return -1;
	if (eth->h_proto != bpf_htons(ETH_P_IP) || ip->ihl < 5)
		return -1;
	if (ip->frag_off & bpf_htons(IP_MF | IP_OFFSET))
		return -1;
	__builtin_memcpy(pkt->h_dest, eth->h_dest, ETH_ALEN);
	pkt->tuple.saddr = ip->saddr;
	pkt->tuple.daddr = ip->daddr;
	pkt->tuple.proto = ip->protocol;
	pkt->tuple.sport = 0;
	pkt->tuple.dport = 0;
	if (ip->protocol == IPPROTO_TCP || ip->protocol == IPPROTO_UDP || ip->protocol == IPPROTO_SCTP) {
		__be16 *ports = (void *)ip + ip->ihl * 4;

		if ((void *)(ports + 2) > data_end)
			return -1;
		pkt->tuple.sport = ports[0];
		pkt->tuple.dport = ports[1];
	} else if (ip->protocol == IPPROTO_ICMP) {
		__u8 *type = (void *)ip + ip->ihl * 4;

		if ((void *)(type + 1) > data_end || is_icmp_error(*type))
			return -1;
	}
	return 0;
}

/* Reads an IPv6 frame whose next header is TCP, UDP, SCTP or an ICMPv6 echo into pkt. Anything else
 * (extension headers, fragments, ICMPv6 errors and NDP, headers the program cannot see) returns -1: no
 * extension-header walking here, the kernel path handles what is not plain. */
static __always_inline int parse_ipv6(struct __sk_buff *skb, struct packet6 *pkt)
{
	void *data = (void *)(long)skb->data;
	void *data_end = (void *)(long)skb->data_end;
	struct ethhdr *eth = data;
	struct ipv6hdr *ip6 = data + sizeof(*eth);
	__u8 next;

	if ((void *)(ip6 + 1) > data_end || eth->h_proto != bpf_htons(ETH_P_IPV6))
		return -1;
	next = ip6->nexthdr;
	if (next == IPPROTO_TCP || next == IPPROTO_UDP || next == IPPROTO_SCTP) {
		__be16 *ports = (void *)(ip6 + 1);

		if ((void *)(ports + 2) > data_end)
			return -1;
		pkt->tuple.sport = ports[0];
		pkt->tuple.dport = ports[1];
	} else if (next == IPPROTO_ICMPV6) {
		__u8 *type = (void *)(ip6 + 1);

		if ((void *)(type + 1) > data_end || (*type != ICMPV6_ECHO_REQUEST && *type != ICMPV6_ECHO_REPLY))
			return -1;
		pkt->tuple.sport = 0;
		pkt->tuple.dport = 0;
	} else {
		return -1;
	}
	__builtin_memcpy(pkt->h_dest, eth->h_dest, ETH_ALEN);
	__builtin_memcpy(&pkt->tuple.saddr, &ip6->saddr, sizeof(struct addr6));
	__builtin_memcpy(&pkt->tuple.daddr, &ip6->daddr, sizeof(struct addr6));
	pkt->tuple.proto = next;
	return 0;
}

#endif
