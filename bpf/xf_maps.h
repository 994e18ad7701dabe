/* xdpflow datapath: maps. All but the trace record are pinned under XF_PIN_DIR so a
 * restarted or upgraded agent finds the same state (BPF_TABLE_PINNED reuses a pin without
 * checking its layout: agent/datapath.py checks the layout before loading). */
#pragma once

#define XF_PIN(name) XF_PIN_DIR "/" #name

/* Exact-match flow table: (tenant, 5-tuple) -> flattened action and counters. A hash
 * aged by the agent's sweeper; -DXF_FLOW_LRU builds it as an LRU hash, for the flood
 * benchmark's comparison only (netns_lab/bench_flood.py: why the hash stays). */
#ifdef XF_FLOW_LRU
BPF_TABLE_PINNED("lru_hash", struct xf_flow_key, struct xf_flow, xf_flows, XF_FLOW_TABLE_SIZE, XF_PIN(xf_flows));
#else
BPF_TABLE_PINNED("hash", struct xf_flow_key, struct xf_flow, xf_flows, XF_FLOW_TABLE_SIZE, XF_PIN(xf_flows));
#endif
/* Ports by ingress ifindex (tenant, slot, MAC): an array for ifindexes below
 * XF_PORT_INDEX, the common case, one array lookup per packet; a hash for the rest. */
BPF_TABLE_PINNED("array", __u32, struct xf_port, xf_port_index, XF_PORT_INDEX, XF_PIN(xf_port_index));
BPF_TABLE_PINNED("hash", __u32, struct xf_port, xf_ports, XF_MAX_PORTS, XF_PIN(xf_ports));
/* Tenants by id: current generation and default verdict. */
BPF_TABLE_PINNED("array", __u32, struct xf_tenant, xf_tenants, XF_MAX_TENANTS, XF_PIN(xf_tenants));
/* Per (tenant, generation): the masks of its tuple space, highest-ranked first. Not
 * preallocated: a one-rule change replaces a set in place, and the set it replaced is
 * freed only after every packet reading it is done (RCU), never reused under one. */
BPF_TABLE_PINNED("hash", struct xf_mask_key, struct xf_mask_set, xf_masks, XF_MASK_SETS, XF_PIN(xf_masks), BPF_F_NO_PREALLOC);
/* Classifier entries of every tenant's tuple space (one hash, partitioned by mask index). */
BPF_TABLE_PINNED("hash", struct xf_rule_key, struct xf_rule, xf_rules, XF_MAX_RULE_ENTRIES, XF_PIN(xf_rules));
/* Endpoints: (tenant, address) -> local port and MAC. */
BPF_TABLE_PINNED("hash", struct xf_ep_key, struct xf_endpoint, xf_endpoints, XF_MAX_ENDPOINTS, XF_PIN(xf_endpoints));
/* Port security: (port slot, source MAC, source prefix) a port may send from besides its
 * endpoints' own (xf_endpoints): allowed address pairs and link-local. */
BPF_TABLE_PINNED("lpm_trie", struct xf_src_key, __u32, xf_port_src, XF_PORT_SRC_ENTRIES, XF_PIN(xf_port_src), BPF_F_NO_PREALLOC);
/* Tenant routes: longest prefix match on (tenant, address). */
BPF_TABLE_PINNED("lpm_trie", struct xf_route_key, struct xf_route, xf_routes, XF_MAX_ROUTES, XF_PIN(xf_routes), BPF_F_NO_PREALLOC);
/* Packet counters per CPU, a row per (port slot, verdict, reason); events (insert
 * failures, stale flows) count under verdict NONE. */
BPF_TABLE_PINNED("percpu_array", __u32, struct xf_counter, xf_stats, XF_MAX_PORTS * XF_V_MAX * XF_R_ROWS, XF_PIN(xf_stats));
/* Packets and bytes per rule (its slot, assigned by the agent; a flow entry carries it so
 * flow-table hits count too), per CPU. */
BPF_TABLE_PINNED("percpu_array", __u32, struct xf_counter, xf_rule_stats, XF_RULE_STATS, XF_PIN(xf_rule_stats));
/* Packets and bytes each port transmitted on redirect (by its slot), per CPU. */
BPF_TABLE_PINNED("percpu_array", __u32, struct xf_counter, xf_port_tx, XF_MAX_PORTS, XF_PIN(xf_port_tx));
/* Classifications per rule id and when the last one was, per CPU. */
BPF_TABLE_PINNED("percpu_hash", __u32, struct xf_rule_stat, xf_rule_hits, XF_MAX_RULE_IDS, XF_PIN(xf_rule_hits));
/* Ports of first fragments, for the later fragments of the same datagram. */
BPF_TABLE_PINNED("lru_hash", struct xf_frag_key, struct xf_frag, xf_frags, XF_FRAG_TABLE_SIZE, XF_PIN(xf_frags));
/* Decap: (VNI, 0) -> tenant, (VNI, VTEP) -> tenant for the VTEPs of its remote endpoints. */
BPF_TABLE_PINNED("hash", struct xf_vni_key, __u32, xf_vnis, XF_VNI_ENTRIES, XF_PIN(xf_vnis));
/* Rate limits by key (a tenant's id, or rule id | XF_POLICER_RULE): one shared token
 * bucket each, written by the agent, updated by every CPU with atomics. */
BPF_TABLE_PINNED("hash", __u32, struct xf_policer, xf_policers, XF_MAX_POLICERS, XF_PIN(xf_policers));
/* NAT: floating IPs and SNATs, both ways (struct xf_nat_key), written by the agent. */
BPF_TABLE_PINNED("hash", struct xf_nat_key, struct xf_nat, xf_nat, XF_NAT_ENTRIES, XF_PIN(xf_nat));
/* Translations per (tenant << 8 | XF_NATC_*), per CPU: packets and bytes. */
BPF_TABLE_PINNED("percpu_hash", __u32, struct xf_counter, xf_nat_stats, XF_NAT_STATS, XF_PIN(xf_nat_stats));
/* The NAT programs (xdpflow_nat_in, xdpflow_nat_out: xdpflow.c), tail-called; written by the agent after each compile. Pinned: a prog array is emptied
 * when nothing in user space holds it (the trace build's own is held by the agent). */
#ifdef XF_TRACE
BPF_TABLE("prog", __u32, __u32, xf_nat_prog, 2);
#else
BPF_TABLE_PINNED("prog", __u32, __u32, xf_nat_prog, 2, XF_PIN(xf_nat_prog));
#endif
/* Layout fingerprint of the maps above, written by the agent. */
BPF_TABLE_PINNED("array", __u32, struct xf_meta, xf_meta, 1, XF_PIN(xf_meta));

/* The slow path's working set (flows and keys being built), per CPU, not pinned. */
BPF_PERCPU_ARRAY(xf_scratch, struct xf_scratch, 1);
/* A decapsulated packet's outer headers, per CPU, not pinned: restored if it goes to the
 * kernel. */
BPF_PERCPU_ARRAY(xf_outer, struct xf_outer_save, 1);

#ifndef XF_TRACE
/* The monitor (`xdpflowctl monitor`), not pinned: each build has its own, and the agent
 * reads the ring of the program it loaded. The switch and filter; a per-CPU token bucket
 * and sent/lost counts; the events. */
BPF_ARRAY(xf_mon, struct xf_mon_cfg, 1);
BPF_PERCPU_ARRAY(xf_mon_cpu, struct xf_mon_cpu, 1);
BPF_RINGBUF_OUTPUT(xf_events, XF_EVENT_RING_PAGES);
#endif

#ifdef XF_TRACE
/* What the last traced packet did, per CPU (trace build only, not pinned). */
BPF_PERCPU_ARRAY(xf_trace_rec, struct xf_trace, 1);
#endif
