/* Programs on the pod's host veth, tc egress: frames the kernel path delivers to the pod. */
#include "lib/deliver.h"
#include "lib/events.h"
#include "lib/flows.h"

/* Hook: tc egress of the pod's host veth (direction: node -> pod). Fast-path deliveries never pass
 * here (bpf_redirect_peer skips this hook), so this counts exactly the kernel path's rx, and learns
 * the reply tuple of pod-sourced frames that came through the node's stack. */
int to_pod(struct __sk_buff *skb)
{
	struct sknf_config *cfg = node_config();

	if (cfg)
		learn_reply_flow(skb, cfg);
	event_forwarded(skb, HOOK_TO_POD, TC_ACT_OK);
	count_received(skb->ifindex, skb->len, TC_ACT_OK);
	return TC_ACT_OK;
}
