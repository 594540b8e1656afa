/* Flow events: what `sknf flows` shows, handed to the agent through the `events` ring buffer.
 *
 * Two kinds, only while events_enabled's slot is set (the agent's flow_events setting):
 * - a new flow: the first IPv4 or IPv6 frame of a flow this node sees, where a frame enters the node's
 *   datapath (from_pod: sent by a local pod; from_overlay: arriving from another node; to_pod: the
 *   kernel path delivering to a local pod, e.g. from the node itself or the Internet). "A flow" is a
 *   canonical 5-tuple: both directions are one flow, reported once, in the direction of its first
 *   frame. A frame whose tuple is a learned reply (kernel_flows/6, bpf/lib/flows.h) answers a flow that
 *   left through the node's stack, already reported there (a Service's reply arriving from the
 *   backend's node, un-NATed later): it starts no flow either, it marks its tuple seen.
 *   A flow counts as seen while its tuple is in events_seen (events_seen6), an LRU of SKNF_SEEN_FLOWS
 *   tuples: a flow idle long enough to be evicted by newer ones is reported again when it resumes,
 *   and a tuple reused while still in the LRU is not reported. Frames parse_ipv4 and parse_ipv6 leave
 *   to the kernel (ARP, fragments, ICMP errors, NDP, IPv6 extension headers) start no flow.
 * - a drop: every frame the programs drop, with its reason (source validation's enum refused_reason,
 *   or DROP_REDIRECT when a redirect helper refused it).
 * Each costs one ring-buffer record (sizeof(struct flow_event) + 8 bytes). A full ring buffer refuses
 * it: counted per CPU in events_lost, never blocking a packet. Established flows cost one LRU lookup
 * per frame; with events off, one array lookup.
 */
#ifndef SKNF_EVENTS_H
#define SKNF_EVENTS_H

#include <uapi/linux/ipv6.h>

#include "maps.h"

enum event_kind {
	EVENT_FLOW = 1,
	EVENT_DROP = 2,
};

/* Where the frame was seen. */
enum event_hook {
	HOOK_FROM_POD = 1, /* tc ingress of a pod's host veth: the pod sent it */
	HOOK_TO_POD = 2, /* tc egress of a pod's host veth: the kernel path delivers it */
	HOOK_FROM_OVERLAY = 3, /* tc ingress of vxsknf: from another node */
};

enum event_path {
	PATH_FAST = 1, /* redirected by the program (fast path) */
	PATH_KERNEL = 2, /* left to the bridge and the node's stack */
	PATH_DROPPED = 3,
};

#define DROP_REDIRECT REFUSED_REASONS /* a redirect helper refused the frame */

/* One event; sknf/datapath/events.py mirrors it. Addresses are 16 bytes: IPv4 as ::ffff:a.b.c.d. */
struct flow_event {
	__u64 time_ns; /* bpf_ktime_get_boot_ns(): CLOCK_BOOTTIME */
	__u8 saddr[16];
	__u8 daddr[16];
	__u32 ifindex; /* the device of the hook: a pod's host veth, or vxsknf */
	__be16 sport; /* zero for protocols without ports */
	__be16 dport;
	__be16 ethertype; /* the frame's (drops of non-IP frames: ARP, IPv6, others) */
	__u8 proto;
	__u8 kind; /* enum event_kind */
	__u8 hook; /* enum event_hook */
	__u8 path; /* enum event_path */
	__u8 reason; /* drops: enum refused_reason, or DROP_REDIRECT */
	__u8 pad;
};
_Static_assert(sizeof(struct flow_event) == 56, "sknf/datapath/events.py reads 56-byte events");

static __always_inline int events_on(void)
{
	__u32 slot = 0;
	__u32 *on = events_enabled.lookup(&slot);

	return on && *on;
}

/* A zeroed record stamped with the frame's device and the time, or NULL (counted lost). */
static __always_inline struct flow_event *event_reserve(struct __sk_buff *skb, int kind, int hook)
{
	struct flow_event *ev = events.ringbuf_reserve(sizeof(struct flow_event));
	__u32 slot = 0;

	if (!ev) {
		__u64 *lost = events_lost.lookup(&slot);

		if (lost)
			(*lost)++;
		return NULL;
	}
	__builtin_memset(ev, 0, sizeof(*ev));
	ev->time_ns = bpf_ktime_get_boot_ns();
	ev->ifindex = skb->ifindex;
	ev->kind = kind;
	ev->hook = hook;
	return ev;
}

static __always_inline void event_addr4(__u8 *out, __be32 addr)
{
	out[10] = 0xff;
	out[11] = 0xff;
	__builtin_memcpy(out + 12, &addr, 4);
}

static __always_inline void event_tuple4(struct flow_event *ev, struct flow_key *t)
{
	event_addr4(ev->saddr, t->saddr);
	event_addr4(ev->daddr, t->daddr);
	ev->sport = t->sport;
	ev->dport = t->dport;
	ev->proto = t->proto;
	ev->ethertype = bpf_htons(ETH_P_IP);
}

/* Both directions of a flow under one key: the lower (address, port) first. */
static __always_inline void event_canonical(struct flow_key *key, struct flow_key *t)
{
	int keep = t->saddr < t->daddr || (t->saddr == t->daddr && t->sport <= t->dport);

	key->saddr = keep ? t->saddr : t->daddr;
	key->daddr = keep ? t->daddr : t->saddr;
	key->sport = keep ? t->sport : t->dport;
	key->dport = keep ? t->dport : t->sport;
	key->proto = t->proto;
}

static __always_inline void event_tuple6(struct flow_event *ev, struct flow6_key *t)
{
	__builtin_memcpy(ev->saddr, &t->saddr, 16);
	__builtin_memcpy(ev->daddr, &t->daddr, 16);
	ev->sport = t->sport;
	ev->dport = t->dport;
	ev->proto = t->proto;
	ev->ethertype = bpf_htons(ETH_P_IPV6);
}

/* -1, 0 or 1 as a sorts before, with or after b (in an order of their own: any total order will do). */
static __always_inline int addr6_order(const struct addr6 *a, const struct addr6 *b)
{
#pragma unroll
	for (int i = 0; i < 4; i++)
		if (a->a[i] != b->a[i])
			return a->a[i] < b->a[i] ? -1 : 1;
	return 0;
}

static __always_inline void event_canonical6(struct flow6_key *key, struct flow6_key *t)
{
	int order = addr6_order(&t->saddr, &t->daddr);
	int keep = order < 0 || (order == 0 && t->sport <= t->dport);

	key->saddr = keep ? t->saddr : t->daddr;
	key->daddr = keep ? t->daddr : t->saddr;
	key->sport = keep ? t->sport : t->dport;
	key->dport = keep ? t->dport : t->sport;
	key->proto = t->proto;
}

/* A frame the programs dropped, with what can be read of its addresses (even a forged header). */
static __always_inline void event_drop(struct __sk_buff *skb, int hook, int reason)
{
	void *data, *data_end;
	struct ethhdr *eth;
	struct flow_event *ev;

	if (!events_on() || !(ev = event_reserve(skb, EVENT_DROP, hook)))
		return;
	/* Inlined at every refusal, clang may otherwise read data and data_end through one offset ctx
	 * pointer, which the verifier rejects ("dereference of modified ctx ptr"). */
	asm volatile("" : "+r"(skb));
	data = (void *)(long)skb->data;
	asm volatile("" : "+r"(skb));
	data_end = (void *)(long)skb->data_end;
	eth = data;
	ev->path = PATH_DROPPED;
	ev->reason = reason;
	if ((void *)(eth + 1) <= data_end) {
		ev->ethertype = eth->h_proto;
		if (eth->h_proto == bpf_htons(ETH_P_IP)) {
			struct iphdr *ip = (void *)(eth + 1);

			if ((void *)(ip + 1) <= data_end) {
				__be16 *ports = (void *)ip + ip->ihl * 4;

				event_addr4(ev->saddr, ip->saddr);
				event_addr4(ev->daddr, ip->daddr);
				ev->proto = ip->protocol;
				if ((ip->protocol == IPPROTO_TCP || ip->protocol == IPPROTO_UDP) && ip->ihl >= 5 &&
				    (void *)(ports + 2) <= data_end) {
					ev->sport = ports[0];
					ev->dport = ports[1];
				}
			}
		} else if (eth->h_proto == bpf_htons(ETH_P_ARP)) {
			__u8 *arp = (void *)(eth + 1); /* Ethernet/IPv4 ARP: sender IP at 14, target IP at 24 */

			if ((void *)(arp + 28) <= data_end) {
				__be32 sip, tip;

				__builtin_memcpy(&sip, arp + 14, 4);
				__builtin_memcpy(&tip, arp + 24, 4);
				event_addr4(ev->saddr, sip);
				event_addr4(ev->daddr, tip);
			}
		} else if (eth->h_proto == bpf_htons(ETH_P_IPV6)) {
			struct ipv6hdr *ip6 = (void *)(eth + 1);

			if ((void *)(ip6 + 1) <= data_end) {
				__builtin_memcpy(ev->saddr, &ip6->saddr, 16);
				__builtin_memcpy(ev->daddr, &ip6->daddr, 16);
				ev->proto = ip6->nexthdr;
			}
		}
	}
	events.ringbuf_submit(ev, 0);
}

/* Hook: after a program decided a frame's verdict. A redirect or the kernel path reports the frame's
 * flow if it is new to this node; a shot frame is a drop (a redirect helper refused it). */
static __always_inline void event_forwarded(struct __sk_buff *skb, int hook, int verdict)
{
	struct packet pkt = {};
	struct packet6 pkt6 = {};
	struct flow_key key = {};
	struct flow6_key key6 = {};
	struct flow_event *ev;
	__u64 now;

	if (verdict != TC_ACT_REDIRECT && verdict != TC_ACT_OK) {
		event_drop(skb, hook, DROP_REDIRECT);
		return;
	}
	if (!events_on())
		return;
	if (parse_ipv4(skb, &pkt) == 0) {
		event_canonical(&key, &pkt.tuple);
		if (events_seen.lookup(&key))
			return;
		now = bpf_ktime_get_boot_ns();
		events_seen.update(&key, &now);
		if (kernel_flows.lookup(&pkt.tuple) || !(ev = event_reserve(skb, EVENT_FLOW, hook)))
			return;
		event_tuple4(ev, &pkt.tuple);
	} else if (parse_ipv6(skb, &pkt6) == 0) {
		event_canonical6(&key6, &pkt6.tuple);
		if (events_seen6.lookup(&key6))
			return;
		now = bpf_ktime_get_boot_ns();
		events_seen6.update(&key6, &now);
		if (kernel_flows6.lookup(&pkt6.tuple) || !(ev = event_reserve(skb, EVENT_FLOW, hook)))
			return;
		event_tuple6(ev, &pkt6.tuple);
	} else {
		return;
	}
	ev->path = verdict == TC_ACT_REDIRECT ? PATH_FAST : PATH_KERNEL;
	events.ringbuf_submit(ev, 0);
}

#endif
