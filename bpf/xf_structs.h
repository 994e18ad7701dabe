/* xdpflow datapath: map keys and values. agent/abi.py holds the ctypes mirror; the test
 * tests/bpf/test_abi.py compares it with the types BCC builds from this file, field by
 * field and offset by offset. Addresses are 16 bytes in network order; IPv4 is stored
 * IPv4-mapped (::ffff:a.b.c.d) so one key format serves both families. Ports, ids and
 * generations are in host order. */
#pragma once

/* Exact-match flow key: one per direction of a flow. ICMP echo: sport is the echo id,
 * dport is type << 8 | code (so a request and its reply are distinct keys). */
struct xf_flow_key {
    __u16 tenant;
    __u8  proto;
    __u8  pad;
    __u32 src[4];
    __u32 dst[4];
    __u16 sport;
    __u16 dport;
};

/* Flow entry: the flattened result of the whole pipeline, plus counters. 72 bytes. */
struct xf_flow {
    __u64 packets;
    __u64 bytes;
    __u64 created_ns;      /* bpf_ktime_get_coarse_ns() at install */
    __u64 last_seen_ns;
    __u32 generation;      /* tenant generation it was made under; stale = miss */
    __u32 rule_id;         /* the rule that allowed it (for a reply: the forward's rule) */
    __u32 out_ifindex;     /* redirect target, 0 when not redirected */
    __u16 out_port;        /* port slot of the output port, 0 when none */
    __u8  verdict;         /* XF_V_* */
    __u8  flags;           /* XF_FLOW_* */
    __u8  dmac[6];         /* rewritten destination MAC (the endpoint's) */
    __u8  smac[6];         /* rewritten source MAC (the output port's) */
    __u16 in_port;         /* port slot its packets arrive on */
    __u8  reason;          /* XF_R_* of the classification that made it */
    __u8  tcp_flags;       /* OR of TCP flags seen */
    __u8  in_mac[6];       /* source MAC its packets carry (checked on ports with security) */
    __u16 rule_stat;       /* the rule's counter slot (xf_rule_stats), 0: none / a reply */
    /* Overlay (VXLAN, XF_FLOW_ENCAP): what the outer headers take from the flow (the
     * node's address and the MTU are the uplink's, out_ifindex's port entry). For an
     * entry whose packets arrive over the overlay, vtep is the VTEP they must come
     * from. 16 bytes: key and entry stay within two cache lines.
     * NAT (XF_FLOW_SNAT / XF_FLOW_DNAT; a NAT flow is never encapsulated) keeps its
     * rewrite in the same bytes, under the same names (one layout for the agent's
     * mirror): vtep is the address written (SNAT: the new source, the floating or SNAT
     * address; DNAT: the new destination, the VM's), encap_sport the port written (host
     * order; ICMP echo: the id), vni the VM's tenant (of a DNAT entry, whose key's
     * tenant is XF_TENANT_EXTERNAL: its generation is that tenant's). */
    __be32 vtep;           /* remote VTEP: outer destination, or expected outer source */
    __u32 vni;
    __u8  vtep_mac[6];     /* the underlay next hop's MAC (outer destination) */
    __u16 encap_sport;     /* outer UDP source port: the inner flow's hash */
};

/* NAT (issue 11), keyed by (tenant, IPv4 address):
 *   (XF_TENANT_EXTERNAL, a floating address) -> kind FIP, its tenant, the VM's address
 *   (XF_TENANT_EXTERNAL, a SNAT address)     -> kind SNAT (the tenant is in each flow)
 *   (tenant, a VM's address)                 -> kind FIP, the floating address
 *   (tenant, 0)                              -> kind SNAT, the address and port range */
struct xf_nat_key {
    __u16 tenant;
    __u16 pad;
    __be32 addr;
};

struct xf_nat {
    __be32 addr;           /* what the key's address translates to (0: a SNAT address) */
    __u16 tenant;          /* of an external floating address */
    __u8  kind;            /* XF_NAT_* */
    __u8  pad;
    __u16 port_lo;         /* SNAT: the source ports it allocates from */
    __u16 port_hi;
};

/* Port: keyed by ifindex. */
struct xf_port {
    __u16 tenant;          /* 0: not a tenant port */
    __u16 slot;            /* stable small number: counters, rule in_port */
    __u32 flags;           /* XF_PORT_* */
    __u8  mac[6];          /* source of proxy ARP/ND replies and of routed frames */
    __u16 pad;
    /* Uplink ports (XF_PORT_UPLINK). */
    __u32 local_ip[4];     /* the node's address on it (VTEP, source of what it sends) */
    __u32 mtu;             /* the interface's MTU (what encapsulation must fit) */
};

/* Tenant: an array indexed by tenant id. */
struct xf_tenant {
    __u32 generation;      /* flows made under another one are stale; 0: not configured */
    __u8  default_verdict; /* XF_V_DROP or XF_V_PASS */
    __u8  pad;
    __u16 flags;
    __u32 vni;
    __u32 cls_generation;  /* the generation its masks and classifier entries are keyed
                            * by (0: the same as generation). A one-rule change rewrites
                            * entries in place and bumps only `generation`; a whole-state
                            * apply writes a new cls_generation, then a new generation.
                            * The agent changes one field per update (the array's update
                            * is a copy a packet may read half of). */
    /* --- rate limits (issue 11) --- */
    __u32 policer;         /* xf_policers key of its rate limit (its id), 0: none */
    __u32 pad_rl;
    /* Flow quota (appended; see xf_stage_install). The agent writes max_flows and keeps
     * `flows` when it rewrites the entry; the datapath adds 1 (atomically) per entry it
     * creates for the tenant and the sweeper re-bases it on what the table holds. */
    __u32 max_flows;       /* entries the tenant may hold; 0: no quota */
    __u32 flows;           /* entries it holds (approximate between sweeps) */
};

/* One mask of a tenant's tuple space. Masks are sorted by max_rank, highest first, so the
 * search stops once the best match found outranks every remaining mask. */
struct xf_mask {
    __u32 src[4];
    __u32 dst[4];
    __u16 sport;
    __u16 dport;
    __u8  proto;           /* 0 or 0xff */
    __u8  key_idx;         /* the mask_idx its entries are keyed by: a mask keeps it when
                            * the order changes, so a one-rule change rewrites no entry */
    __u16 in_port;         /* 0 or 0xffff */
    __u64 max_rank;
};

struct xf_mask_key {
    __u16 tenant;
    __u16 pad;
    __u32 generation;
};

struct xf_mask_set {
    __u32 count;
    __u32 pad;
    struct xf_mask masks[XF_MAX_MASKS];
};

/* Classifier entry key: the packet's tuple under mask number mask_idx of a generation. */
struct xf_rule_key {
    __u32 generation;
    __u16 tenant;
    __u8  mask_idx;
    __u8  proto;
    __u16 in_port;
    __u16 pad;
    __u32 src[4];
    __u32 dst[4];
    __u16 sport;           /* ICMP: 0 */
    __u16 dport;           /* ICMP: type << 8 | code */
};

struct xf_rule {
    __u64 rank;            /* unique, higher wins: priority << 32 | ~rule id (a function of
                            * the rule alone: adding a rule changes no other's) */
    __u32 rule_id;
    __u8  action;          /* XF_A_* */
    __u8  pad;
    __u16 stat;            /* the rule's counter slot (xf_rule_stats), 0: not counted */
    /* --- rate limits (issue 11) --- */
    __u32 policer;         /* xf_policers key of its rate limit, 0: none */
    __u32 pad_rl;
};

struct xf_ep_key {
    __u16 tenant;
    __u16 pad;
    __u32 addr[4];
};

struct xf_endpoint {
    __u32 ifindex;         /* output interface */
    __u16 port;            /* its port slot */
    __u8  mac[6];          /* the endpoint's MAC: destination of routed frames */
    __u8  port_mac[6];     /* the output port's MAC: source of routed frames */
    __u16 flags;           /* XF_EP_* */
    /* A remote endpoint (XF_EP_REMOTE), behind the uplink (ifindex, port, port_mac are
     * the uplink's) over VXLAN. Addresses in network order. */
    __be32 vtep;           /* the VTEP it lives behind */
    __u32 vni;             /* its tenant's */
    __u8  vtep_mac[6];     /* the underlay neighbour's MAC for vtep; zero: unresolved */
    __u16 pad_overlay;
};

/* Decap's checks: (vni, 0) -> the tenant of a VNI; (vni, vtep) -> the same tenant when
 * the VTEP hosts one of its remote endpoints. */
struct xf_vni_key {
    __u32 vni;
    __be32 vtep;
};

/* An uplink packet's outer headers, kept while the inner packet is judged: restored when
 * it goes to the kernel. */
struct xf_outer_save {
    __u8 b[XF_ENCAP_LEN];
    __u8 pad[6];
};

/* LPM key: prefixlen counts the 32 bits of tenant + pad, then address bits. */
struct xf_route_key {
    __u32 prefixlen;
    __u16 tenant;
    __u16 pad;
    __u32 addr[4];
};

struct xf_route {
    __u8  action;          /* XF_RT_* */
    __u8  pad[3];
    __u32 via[4];          /* next hop: one of the tenant's endpoints */
};

struct xf_counter {
    __u64 packets;
    __u64 bytes;
};

/* A rate limit (token bucket) as GCRA, the virtual-scheduling form of a token bucket:
 * tat_ns is when the bucket would be full again. A packet costs `cost`; it conforms when
 * max(tat, now) + cost <= now + burst_ns. One entry is shared by every CPU and updated
 * with atomic adds, so the limit holds for the node whatever CPU a packet arrives on
 * (per-CPU buckets each pass their share and drift when traffic is spread unevenly). */
struct xf_policer {
    __u64 tat_ns;          /* bpf_ktime_get_ns() scale; 0: a full bucket */
    __u64 cost;            /* ns per packet, or (XF_POL_BYTES) ns per byte << 16 */
    __u64 burst_ns;        /* how far tat may run ahead of now */
    __u64 dropped;         /* packets refused */
    __u32 flags;           /* XF_POL_* */
    __u32 pad;
};

/* Per rule id, per CPU: classifications it decided and the time of the last one. */
struct xf_rule_stat {
    __u64 hits;
    __u64 last_hit_ns;     /* bpf_ktime_get_coarse_ns() */
};

/* Later fragments carry no L4 header: the first fragment leaves its ports here. Keyed on
 * the protocol the fragment header names (IPv6: its next header), which every fragment
 * of a datagram carries alike. */
struct xf_frag_key {
    __u16 tenant;
    __u8  proto;
    __u8  pad;
    __u32 id;
    __u32 src[4];
    __u32 dst[4];
};

struct xf_frag {
    __u16 sport;
    __u16 dport;
    __u8  proto;           /* the L4 protocol (IPv6: after any headers behind the fragment header) */
    __u8  pad[3];
};

/* Port security beyond the port's endpoints (LPM): prefixlen counts the bits of slot and
 * MAC (64), then address bits. An allowed prefix (and the link-local prefix) is one entry
 * per MAC of the port's endpoints. */
struct xf_src_key {
    __u32 prefixlen;
    __u16 slot;
    __u8  mac[6];
    __u32 addr[4];
};

/* Layout fingerprint of the pinned maps, written by the agent (agent/datapath.py). */
struct xf_meta {
    __u64 abi_version;
    __u64 layout_hash;
    __u64 build_id;        /* of the pinned program, 0 if none matches (agent/datapath.py) */
};

/* The slow path's working set: the forward and reply flows and keys being built. */
struct xf_scratch {
    struct xf_flow nf;        /* the forward direction's result */
    struct xf_flow rf;        /* the reply direction's */
    struct xf_flow_key ck;    /* the forward direction being judged */
    struct xf_flow_key rk;    /* its reply direction */
    struct bpf_fib_lookup fib;   /* NAT: the external next hop */
};

/* What the trace build records for the packet it ran (per CPU). */
struct xf_trace {
    __u32 tenant;
    __u32 rule_id;
    __u32 out_ifindex;
    __u16 out_port;
    __u16 in_port;
    __u8  verdict;
    __u8  reason;
    __u8  flow_hit;
    __u8  stale;
    __u32 pad;
    /* --- rate limits (issue 11): the rule's bucket [0] and the tenant's [1] --- */
    __u32 pol_key[2];      /* xf_policers key checked, 0: none */
    __u64 pol_credit_ns[2];   /* credit the bucket held before this packet */
    __u64 pol_cost_ns[2];     /* what this packet costs */
    __u8  pol_ok[2];       /* 1: it conformed */
    __u8  pad_rl[6];
    /* --- NAT (issue 11): the translation made (before: the input packet) --- */
    __be32 nat_addr;       /* the address written */
    __u16 nat_port;        /* the port (echo id) written: a SNAT port as allocated */
    __u8  nat_flags;       /* the flow's XF_FLOW_SNAT / DNAT / FIP bits; 0: none */
    __u8  pad_nat;
};

/* The monitor's switch and datapath-side filter (one entry, written by the agent). With
 * no listener the datapath reads `listeners` and nothing else. The filter is the union of
 * every listener's: each listener's exact filter is applied by the agent. */
struct xf_mon_cfg {
    __u32 listeners;       /* 0: nobody is listening, no event is built */
    __u32 verdicts;        /* bit per XF_V_*: verdicts some listener wants */
    __u64 reasons;         /* bit per XF_R_*: reasons some listener wants */
    __u16 tenant;          /* 0: any */
    __u16 port;            /* port slot, 0: any */
    __u32 pad;
    __u64 cost_ns;         /* bucket credit one event costs: 1e9 / events per second */
    __u64 burst_ns;        /* bucket depth (one second of events) */
};

/* Per CPU: the monitor's token bucket and what it sent and lost. */
struct xf_mon_cpu {
    __u64 last_ns;         /* bpf_ktime_get_ns() of the last refill */
    __u64 credit_ns;
    __u64 sent;            /* events put on the ring */
    __u64 lost_rate;       /* events the rate cap refused */
    __u64 lost_ring;       /* events the ring had no room for */
};

/* One monitor event: what the datapath decided and the packet's first bytes (for a
 * redirect, as sent: MACs rewritten, TTL decremented). */
struct xf_event {
    __u64 ts_ns;           /* bpf_ktime_get_ns() (CLOCK_MONOTONIC) */
    __u32 rule_id;
    __u32 len;             /* the packet's length */
    __u32 out_ifindex;
    __u16 tenant;
    __u16 port;            /* ingress port slot */
    __u16 out_port;
    __u16 cap_len;         /* bytes of data[] filled */
    __u8  verdict;
    __u8  reason;
    __u8  flow_hit;
    __u8  pad;
    __u8  data[XF_EVENT_BYTES];
};
