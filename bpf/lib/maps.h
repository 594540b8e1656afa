/* Every map sknf uses, declared once and pinned by name under SKNF_PIN_DIR, so a restarted agent
 * (a second, separate load of these programs) finds the same endpoints, counters and learned flows
 * while the programs already attached keep forwarding. */
#ifndef SKNF_MAPS_H
#define SKNF_MAPS_H

#include "common.h"

#ifndef SKNF_PIN_DIR
#define SKNF_PIN_DIR "/sys/fs/bpf/sknf"
#endif
#ifndef SKNF_MAX_ENDPOINTS
#define SKNF_MAX_ENDPOINTS 16384
#endif
/* The agent passes nf_conntrack_max: one learned flow per conntrack entry at most. */
#ifndef SKNF_MAX_FLOWS
#define SKNF_MAX_FLOWS 262144
#endif

BPF_TABLE_PINNED("array", __u32, struct sknf_config, config, 1, SKNF_PIN_DIR "/config");
BPF_TABLE_PINNED("array", __u32, struct sknf_config6, config6, 1, SKNF_PIN_DIR "/config6");
BPF_TABLE_PINNED("hash", __be32, struct endpoint_info, endpoints, SKNF_MAX_ENDPOINTS,
		 SKNF_PIN_DIR "/endpoints");
/* The local pods by IPv6 address (dual-stack, IPv6-only); flags as endpoints' (ENDPOINT_POLICY for any
 * pod a NetworkPolicy selects: policy_rules hold IPv4 peers only, so its IPv6 takes the kernel path). */
BPF_TABLE_PINNED("hash", struct addr6, struct endpoint_info, endpoints6, SKNF_MAX_ENDPOINTS,
		 SKNF_PIN_DIR "/endpoints6");
/* The MACs of this node's pods (value: the host veth's ifindex): a frame for one of them belongs to
 * the bridge, whatever its IP destination (a pod that routes for others). */
BPF_TABLE_PINNED("hash", struct mac_key, __u32, local_macs, SKNF_MAX_ENDPOINTS, SKNF_PIN_DIR "/local_macs");
BPF_TABLE_PINNED("percpu_hash", __u32, struct pod_counters, pod_counters, SKNF_MAX_ENDPOINTS,
		 SKNF_PIN_DIR "/pod_counters");
/* Source validation, read by from_pod (tc ingress of each pod's host veth, pod -> node) and written by
 * the agent (BpfDatapath.attach_pod / sync_endpoints, removed on detach): the attachment's MAC, the
 * addresses it may send from (its container's leases) and what it was refused, by reason. */
BPF_TABLE_PINNED("hash", __u32, struct pod_identity, pod_identity, SKNF_MAX_ENDPOINTS,
		 SKNF_PIN_DIR "/pod_identity");
BPF_TABLE_PINNED("hash", struct source_key, struct pod_identity, pod_sources, SKNF_MAX_ENDPOINTS * 4,
		 SKNF_PIN_DIR "/pod_sources");
BPF_TABLE_PINNED("hash", struct source6_key, struct pod_identity, pod_sources6, SKNF_MAX_ENDPOINTS * 4,
		 SKNF_PIN_DIR "/pod_sources6");
BPF_TABLE_PINNED("percpu_hash", __u32, struct refused_counters, pod_refused, SKNF_MAX_ENDPOINTS,
		 SKNF_PIN_DIR "/pod_refused");
/* No LRU and no timers: losing a live flow's entry would fast-path its replies un-NATed and break
 * it. Entries go only when conntrack has forgotten the flow (see sknf/datapath/flows.py). */
BPF_TABLE_PINNED("hash", struct flow_key, struct flow_state, kernel_flows, SKNF_MAX_FLOWS,
		 SKNF_PIN_DIR "/kernel_flows", BPF_F_NO_PREALLOC);
BPF_TABLE_PINNED("hash", struct flow6_key, struct flow_state, kernel_flows6, SKNF_MAX_FLOWS,
		 SKNF_PIN_DIR "/kernel_flows6", BPF_F_NO_PREALLOC);

/* NetworkPolicy (bpf/lib/policy.h), written by the agent (sknf/datapath/bpf.py set_policy): the selected
 * endpoints' rules, both generations (each at most half); read by from_pod and from_overlay. The flows
 * allowed (no LRU: the agent's sweep deletes idle ones); the frames refused, per CPU, by host veth. */
#ifndef SKNF_POLICY_PREFIXES
#define SKNF_POLICY_PREFIXES 65536
#endif
BPF_TABLE_PINNED("lpm_trie", struct policy_key, struct policy_ports, policy_rules, SKNF_POLICY_PREFIXES,
		 SKNF_PIN_DIR "/policy_rules", BPF_F_NO_PREALLOC);
BPF_TABLE_PINNED("hash", struct flow_key, struct policy_flow, policy_flows, SKNF_MAX_FLOWS,
		 SKNF_PIN_DIR "/policy_flows", BPF_F_NO_PREALLOC);
BPF_TABLE_PINNED("percpu_hash", __u32, __u64, policy_drops, SKNF_MAX_ENDPOINTS, SKNF_PIN_DIR "/policy_drops");

/* Slots of the flow_guard array (__u64 each). While FULL or SYNCING is non-zero every pod frame the
 * fast path would take goes to the kernel path instead: a learn that failed (FULL, set by the
 * programs) or flows not learned yet (SYNCING, set by the agent while it seeds the map from
 * conntrack) may belong to a NATed flow nobody can name. The agent clears both. */
#define FLOW_GUARD_FULL 0
#define FLOW_GUARD_SYNCING 1
#define FLOW_GUARD_FAILED_LEARNS 2 /* learns the map refused, ever (atomic counter) */
#define FLOW_GUARD_SLOTS 3

/* Hooks: read by from_pod (tc ingress, pod -> node) and from_overlay (tc ingress of vxsknf, other
 * node -> this node) before any fast-path decision; written by learn4/learn6 (lib/flows.h) when a learn
 * fails, and by the agent. Slots: FLOW_GUARD_* above. */
BPF_TABLE_PINNED("array", __u32, __u64, flow_guard, FLOW_GUARD_SLOTS, SKNF_PIN_DIR "/flow_guard");

/* Flow events (bpf/lib/events.h): the ring buffer the programs hand events to the agent through, the
 * on/off switch, the flows already reported and the events the full ring buffer refused. BCC has no
 * pinned BPF_RINGBUF_OUTPUT: this is its table struct in a pinned section. 64 pages (256 KiB with
 * 4 KiB pages) hold 4,096 events of 64 bytes (56 + an 8-byte header); the agent drains it continuously,
 * the size only absorbs bursts. */
#ifndef SKNF_EVENT_PAGES
#define SKNF_EVENT_PAGES 64
#endif
#ifndef SKNF_SEEN_FLOWS
#define SKNF_SEEN_FLOWS 32768
#endif
struct events_table_t {
	int key;
	__u32 leaf;
	int (*ringbuf_output)(void *, __u64, __u64);
	void *(*ringbuf_reserve)(__u64);
	void (*ringbuf_discard)(void *, __u64);
	void (*ringbuf_submit)(void *, __u64);
	__u32 max_entries;
};
__attribute__((section("maps/ringbuf:" SKNF_PIN_DIR "/events")))
struct events_table_t events = {.max_entries = SKNF_EVENT_PAGES * PAGE_SIZE};
/* Slot 0: non-zero while the programs report events (the agent's flow_events setting). */
BPF_TABLE_PINNED("array", __u32, __u32, events_enabled, 1, SKNF_PIN_DIR "/events_enabled");
/* Slot 0, per CPU: events the full ring buffer refused (lost). */
BPF_TABLE_PINNED("percpu_array", __u32, __u64, events_lost, 1, SKNF_PIN_DIR "/events_lost");
/* Flows already reported as new, by canonical tuple (see events.h), per family; value: when (boot-time ns). */
BPF_TABLE_PINNED("lru_hash", struct flow_key, __u64, events_seen, SKNF_SEEN_FLOWS, SKNF_PIN_DIR "/events_seen");
BPF_TABLE_PINNED("lru_hash", struct flow6_key, __u64, events_seen6, SKNF_SEEN_FLOWS, SKNF_PIN_DIR "/events_seen6");

#endif
