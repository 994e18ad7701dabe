/* xdpflow datapath: the XDP program attached to every port. It wires the pipeline, one
 * stage per step, each a function of its own:
 *
 *   port     ingress port -> tenant, generation, default verdict, port flags
 *   parse    the one parser (xf_parse.h); VLAN tags only where the port takes them
 *   boundary ARP and ND (checked, answered: xf_neigh.h), multicast, ICMP MTU; later
 *            fragments take their first fragment's ports
 *   flow     exact-match lookup (and an ICMP error's flow); a current hit from the
 *            flow's port and MAC is acted on
 *   classify miss: a reply by the flow it answers; else port security (the source is
 *            the port's), then the tenant's rules (tuple-space search)
 *   route    endpoint / route lookup, flattened into the flow entry
 *   install  the reverse (stateful allow), then the flow
 *   act      drop | pass | redirect with MAC rewrite and TTL decrement; what the rules
 *            allow but whose TTL expires goes to the kernel
 *   police   before a packet is passed or redirected: the rate limits of the rule that
 *            allowed its flow and of its tenant (xf_police.h)
 *   count    per-CPU rows per (port, verdict, reason); every exit goes through it
 *
 * A stage returns XF_NEXT to hand the packet on, or the XDP action it decided (having
 * set the verdict and reason in the packet's xf_ctx).
 *
 * Built with -DXF_TRACE it is the trace build: the same pipeline run by BPF_PROG_TEST_RUN
 * for `xdpflowctl trace`, which records what it decided and writes no flow or counter. */
#include <uapi/linux/bpf.h>
#include <uapi/asm-generic/errno-base.h>   /* EEXIST */
#include <linux/in.h>
#include <linux/in6.h>
#include <linux/if_ether.h>
#include <linux/if_arp.h>
#include <linux/ip.h>
#include <linux/ipv6.h>
#include <linux/icmp.h>
#include <linux/icmpv6.h>
#include <linux/tcp.h>
#include <linux/udp.h>
#include <net/ip.h>        /* IP_MF, IP_OFFSET */
#include <net/ipv6.h>      /* struct frag_hdr, IP6_MF, IP6_OFFSET */
#include <net/ndisc.h>     /* struct nd_msg, NDISC_*, ND_OPT_* */
#include <net/tcp.h>       /* tcp_flag_byte(), TCPHDR_* */

#include "xf_consts.h"
#include "xf_structs.h"
#include "xf_maps.h"
#include "xf_csum.h"
#include "xf_parse.h"
#include "xf_vxlan.h"
#include "xf_police.h"
#include "xf_nat.h"
/* Map accesses stay in this file: BCC rewrites map calls in the main file only. */

struct xf_verdict {
    __u32 rule_id;
    __u32 out_ifindex;
    __u16 out_port;
    __u16 rule_stat;           /* the deciding rule's counter slot, 0: none */
    __u8  verdict;
    __u8  reason;
    __u8  flow_hit;
    __u8  stale;
};

/* One packet's way through the pipeline: what the stages learnt and decided. */
struct xf_ctx {
    struct xf_pkt p;
    struct xf_flow_key fk;     /* the packet's flow key */
    struct xf_verdict v;
    __u64 len;
    __u32 gen;                 /* the tenant's current generation (of its flows) */
    __u32 cls_gen;             /* the generation its classifier is keyed by */
    __u16 tenant;
    __u16 slot;                /* the ingress port's slot */
    __u32 port_flags;          /* XF_PORT_* */
    int dflt;                  /* the XDP action of the tenant's default verdict */
    __be32 decap_vtep;         /* arrived over VXLAN from this VTEP; 0: not decapsulated */
    __u32 tenant_policer;      /* the tenant's xf_policers key, 0: no rate limit */
    /* NAT: a packet from the external network to a floating or SNAT address. */
    __u8  nat_kind;            /* XF_NAT_* of its destination; 0: not from outside */
    __u8  pad_nat;
    __u16 nat_hint;            /* a SNAT port this flow held (kept when judged again) */
    __be32 nat_to;             /* a floating address's VM address */
    __u8  mode;                /* XF_MODE_*: which program runs the pipeline (a constant) */
};

/* The programs (one pipeline each; the verifier walks each within its budget):
 * xdpflow_port, on every port, hands NAT's packets to the NAT programs by tail call
 * (xf_nat_prog): xdpflow_nat_in an uplink's packets to a NAT address, xdpflow_nat_out a
 * VM's packets that a NAT translates (a NAT flow's, or new ones with none). */
#define XF_MODE_PORT 0
#define XF_MODE_NAT_IN 1
#define XF_MODE_NAT_OUT 2

/* The best rule found for a packet. Kept as scalars, not a map pointer: far fewer
 * verifier states. */
struct xf_match {
    __u64 rank;
    __u32 rule_id;
    __u16 stat;                /* its counter slot */
    __u8  action;              /* XF_A_*; 0: no rule matched */
    __u32 policer;             /* its xf_policers key, 0: no rate limit */
};

/* The slow path's judgement of a miss. */
struct xf_judgement {
    struct xf_match r;
    __u16 in_port;             /* the port the judged direction arrives on */
    __u8  as_reply;            /* judged as the reply of the forward direction it answers */
    __u8  keep_fwd;            /* that forward entry is current: only the reply is installed */
    __u8  reason;              /* what the route lookup said */
};

static __always_inline int xf_mac_eq(const __u8 *a, const __u8 *b)
{
    return ((a[0] ^ b[0]) | (a[1] ^ b[1]) | (a[2] ^ b[2]) | (a[3] ^ b[3]) |
            (a[4] ^ b[4]) | (a[5] ^ b[5])) == 0;
}

/* Port security: may the port of this slot send from (mac, addr)? An endpoint of the port
 * with that MAC (an exact lookup, the common case), else the port's allowed prefixes and
 * link-local prefix with the MAC of one of its endpoints (an LPM lookup). */
static __always_inline int xf_src_ok(__u16 tenant, __u16 slot, __u8 *mac, __u32 *addr)
{
    struct xf_ep_key ek = {};
    ek.tenant = tenant;
    __builtin_memcpy(ek.addr, addr, 16);
    struct xf_endpoint *ep = xf_endpoints.lookup(&ek);
    if (ep && ep->port == slot && !(ep->flags & XF_EP_LOCAL) && xf_mac_eq(ep->mac, mac))
        return 1;
    struct xf_src_key k = {};
    k.prefixlen = 16 + 48 + 128;
    k.slot = slot;
    __builtin_memcpy(k.mac, mac, ETH_ALEN);
    __builtin_memcpy(k.addr, addr, 16);
    return xf_port_src.lookup(&k) != NULL;
}

/* A packet from a port with port security carries a MAC a flow entry recorded. */
static __always_inline int xf_mac_ok(struct xf_ctx *c, __u8 *mac)
{
    return !(c->port_flags & XF_PORT_SECURITY) || xf_mac_eq(mac, c->p.smac);
}

/* ... and one that came over the overlay, from the VTEP the entry recorded. */
static __always_inline int xf_from_ok(struct xf_ctx *c, __u8 *mac, __be32 vtep)
{
    return xf_mac_ok(c, mac) && (!c->decap_vtep || vtep == c->decap_vtep);
}

/* The overlay's port security: a decapsulated packet's inner source is a remote endpoint
 * of its tenant behind the VTEP that sent it. */
static __always_inline int xf_remote_src_ok(struct xf_ctx *c)
{
    struct xf_ep_key ek = {};
    ek.tenant = c->tenant;
    __builtin_memcpy(ek.addr, c->p.src, 16);
    struct xf_endpoint *ep = xf_endpoints.lookup(&ek);
    return ep && (ep->flags & XF_EP_REMOTE) && ep->vtep == c->decap_vtep;
}


/* Who answers a neighbour request for addr: XF_NB_DATAPATH (an endpoint behind another
 * port, or a route), XF_NB_KERNEL (the node's own address: the kernel answers as it
 * would without offload), or XF_NB_NONE. */
#define XF_NB_NONE 0
#define XF_NB_DATAPATH 1
#define XF_NB_KERNEL 2

static __always_inline int xf_tenant_knows(__u16 tenant, __u16 in_port, __u32 *addr)
{
    struct xf_ep_key ek = {};
    ek.tenant = tenant;
    __builtin_memcpy(ek.addr, addr, 16);
    struct xf_endpoint *ep = xf_endpoints.lookup(&ek);
    if (ep) {
        if (ep->flags & XF_EP_LOCAL)
            return XF_NB_KERNEL;
        return ep->port != in_port ? XF_NB_DATAPATH : XF_NB_NONE;
    }
    struct xf_route_key rk = {};
    rk.prefixlen = 32 + 128;
    rk.tenant = tenant;
    __builtin_memcpy(rk.addr, addr, 16);
    return xf_routes.lookup(&rk) != NULL ? XF_NB_DATAPATH : XF_NB_NONE;
}

#include "xf_neigh.h"

#define XF_NEXT (-1)   /* a stage's "hand the packet on" */

/* --- count ----------------------------------------------------------------------- */

/* One per-CPU counter row: no atomics needed. */
static __always_inline void xf_count_row(struct xf_counter *row, __u64 bytes)
{
    if (row) {
        row->packets++;
        row->bytes += bytes;
    }
}

static __always_inline void xf_count(__u16 port, __u8 verdict, __u8 reason, __u64 bytes)
{
#ifndef XF_TRACE
    /* A per-CPU array row per (port slot, verdict, reason): an array lookup costs a
     * fraction of a hash lookup on every packet. The agent knows each slot's tenant. */
    __u32 idx = ((__u32)port * XF_V_MAX + (verdict & 7)) * XF_R_ROWS + (reason & (XF_R_ROWS - 1));
    xf_count_row(xf_stats.lookup(&idx), bytes);
#endif
}

static __always_inline void xf_count_rule(__u32 rule_id)
{
#ifndef XF_TRACE
    __u64 now = bpf_ktime_get_coarse_ns();
    struct xf_rule_stat *rs = xf_rule_hits.lookup(&rule_id);
    if (rs) {
        rs->hits += 1;
        rs->last_hit_ns = now;
    } else {
        struct xf_rule_stat one = {.hits = 1, .last_hit_ns = now};
        xf_rule_hits.update(&rule_id, &one);
    }
#endif
}

#ifndef XF_TRACE
/* A monitor event for a packet some listener may want, paid for from this CPU's token
 * bucket: a flood costs at most the configured rate of events; the rest only counts. The
 * bucket runs on the coarse clock (cheap on every packet); an event that is sent reads
 * the fine one for its timestamp. */
static __always_inline void xf_monitor(struct xdp_md *ctx, struct xf_ctx *c,
                                       struct xf_mon_cfg *mc)
{
    struct xf_verdict *v = &c->v;
    if (!(mc->verdicts & (1u << (v->verdict & 31))) || !(mc->reasons & (1ull << (v->reason & (XF_R_ROWS - 1)))))
        return;
    if ((mc->tenant && mc->tenant != c->tenant) || (mc->port && mc->port != c->slot))
        return;
    __u32 zero = 0;
    struct xf_mon_cpu *mb = xf_mon_cpu.lookup(&zero);
    if (!mb)
        return;
    __u64 now = bpf_ktime_get_coarse_ns();
    __u64 credit = mb->credit_ns + (now - mb->last_ns);
    if (credit > mc->burst_ns)
        credit = mc->burst_ns;
    mb->last_ns = now;
    if (credit < mc->cost_ns) {
        mb->credit_ns = credit;
        mb->lost_rate++;
        return;
    }
    mb->credit_ns = credit - mc->cost_ns;
    struct xf_event *e = xf_events.ringbuf_reserve(sizeof(struct xf_event));
    if (!e) {
        mb->lost_ring++;
        return;
    }
    e->ts_ns = bpf_ktime_get_ns();
    e->rule_id = v->rule_id;
    e->len = c->len;
    e->out_ifindex = v->out_ifindex;
    e->tenant = c->tenant;
    e->port = c->slot;
    e->out_port = v->out_port;
    e->verdict = v->verdict;
    e->reason = v->reason;
    e->flow_hit = v->flow_hit;
    e->pad = 0;
    /* 1..XF_EVENT_BYTES by arithmetic the verifier follows (XF_EVENT_BYTES is a power
     * of two; frames are never empty): clang turns range checks into tests on a copy. */
    __u64 n = c->len < XF_EVENT_BYTES ? c->len : XF_EVENT_BYTES;
    n = ((n - 1) & (XF_EVENT_BYTES - 1)) + 1;
    if (bpf_xdp_load_bytes(ctx, 0, e->data, n))
        n = 0;
    e->cap_len = n;
    xf_events.ringbuf_submit(e, 0);
    mb->sent++;
}
#endif

/* Count the packet, tell a listening monitor, and return its XDP action. Every exit goes
 * through here. */
static __always_inline int xf_decap_exit(struct xdp_md *ctx, struct xf_ctx *c, int action);

static __always_inline int xf_finish(struct xdp_md *ctx, struct xf_ctx *c, int action)
{
    if (c->decap_vtep)
        action = xf_decap_exit(ctx, c, action);
    xf_count(c->slot, c->v.verdict, c->v.reason, c->len);
#ifndef XF_TRACE
    /* As iptables -L -v counts: each packet a rule decided, flow-table hits included
     * (replies are the connection's, not the rule's). */
    if (c->v.rule_stat) {
        __u32 rs = c->v.rule_stat;
        xf_count_row(xf_rule_stats.lookup(&rs), c->len);
    }
    if (c->v.verdict == XF_V_REDIRECT) {
        __u32 out = c->v.out_port;
        xf_count_row(xf_port_tx.lookup(&out), c->len);
    }
#endif
#if !defined(XF_TRACE) && !defined(XF_NO_MONITOR)   /* the latter: a benchmark's baseline */
    /* With no listener, this read is all the monitor costs. */
    __u32 mzero = 0;
    struct xf_mon_cfg *mc = xf_mon.lookup(&mzero);
    if (mc && mc->listeners)
        xf_monitor(ctx, c, mc);
#endif
#ifdef XF_TRACE
    __u32 zero = 0;
    struct xf_trace *t = xf_trace_rec.lookup(&zero);
    if (t) {
        t->tenant = c->tenant;
        t->rule_id = c->v.rule_id;
        t->out_ifindex = c->v.out_ifindex;
        t->out_port = c->v.out_port;
        t->in_port = c->slot;
        t->verdict = c->v.verdict;
        t->reason = c->v.reason;
        t->flow_hit = c->v.flow_hit;
        t->stale = c->v.stale;
    }
#endif
    return action;
}

static __always_inline int xf_verdict_action(__u8 verdict)
{
    return verdict == XF_V_PASS ? XDP_PASS : XDP_DROP;
}

/* Decide drop or pass for a reason; the tenant's default is already the verdict. */
static __always_inline int xf_decide(struct xf_ctx *c, __u8 verdict, __u8 reason)
{
    c->v.verdict = verdict;
    c->v.reason = reason;
    return xf_verdict_action(verdict);
}

static __always_inline int xf_default(struct xf_ctx *c, __u8 reason)
{
    c->v.reason = reason;
    return c->dflt;
}

/* The port of an interface: an array row for small ifindexes, else the hash. */
static __always_inline struct xf_port *xf_port_of(__u32 ifindex)
{
    if (ifindex < XF_PORT_INDEX) {
        struct xf_port *port = xf_port_index.lookup(&ifindex);
        return port && port->slot ? port : NULL;    /* slot 0: an empty array row */
    }
    return xf_ports.lookup(&ifindex);
}

/* --- decap (uplink ports) ------------------------------------------------------------ */

/* --- NAT in (uplink ports) ---------------------------------------------------------- */

/* The xf_nat entry of an uplink packet's IPv4 destination or ARP target, or NULL. */
static __always_inline struct xf_nat *xf_nat_of(struct xdp_md *ctx)
{
    void *data = (void *)(long)ctx->data;
    void *data_end = (void *)(long)ctx->data_end;
    struct ethhdr *eth = data;
    struct xf_nat_key nk = {};
    nk.tenant = XF_TENANT_EXTERNAL;
    if ((void *)(eth + 1) > data_end)
        return NULL;
    if (eth->h_proto == bpf_htons(ETH_P_IP)) {
        struct iphdr *iph = (void *)(eth + 1);
        if ((void *)(iph + 1) > data_end)
            return NULL;
        nk.addr = iph->daddr;
    } else if (eth->h_proto == bpf_htons(ETH_P_ARP)) {
        struct xf_arp *arp = (void *)(eth + 1);
        if ((void *)(arp + 1) > data_end)
            return NULL;
        nk.addr = arp->tpa;
    } else {
        return NULL;
    }
    return xf_nat.lookup(&nk);
}

static __always_inline int xf_nat_wanted(struct xdp_md *ctx)
{
    return xf_nat_of(ctx) != NULL;
}

/* ARP on the uplink for a floating address: answered with the uplink's MAC (the node
 * holds the address for its VM). Else, as all ARP there, the kernel's. */
static __always_inline int xf_uplink_arp(struct xdp_md *ctx, struct xf_ctx *c,
                                         struct xf_port *port)
{
    void *data = (void *)(long)ctx->data;
    void *data_end = (void *)(long)ctx->data_end;
    struct ethhdr *eth = data;
    struct xf_arp *arp = (void *)(eth + 1);
    if ((void *)(arp + 1) > data_end || (void *)(eth + 1) > data_end ||
        !xf_arp_is_request(arp))
        return xf_decide(c, XF_V_PASS, XF_R_UPLINK_OTHER);
    struct xf_nat *n = xf_nat_of(ctx);
    if (!n || n->kind != XF_NAT_FIP)
        return xf_decide(c, XF_V_PASS, XF_R_UPLINK_OTHER);
    xf_arp_write_reply(eth, arp, port->mac);
    c->v.verdict = XF_V_TX;
    c->v.reason = XF_R_ARP_REPLY;
    return XDP_TX;
}

/* What is not VXLAN to the node on an uplink: IPv4 to a floating address goes on as its
 * VM's tenant's traffic, to a SNAT address as the traffic of the flow it belongs to
 * (xf_stage_flow); ARP for a floating address is answered. The rest is the kernel's:
 * the node's own traffic, and tagged frames (an uplink takes none). Fragments to a SNAT
 * address are the kernel's too (the node may share it); to a floating address they are
 * dropped: the datapath does not reassemble, and the kernel does not hold the address. */
static __always_inline int xf_stage_nat_in(struct xdp_md *ctx, struct xf_ctx *c,
                                           struct xf_port *port)
{
    void *data = (void *)(long)ctx->data;
    void *data_end = (void *)(long)ctx->data_end;
    struct ethhdr *eth = data;
    struct iphdr *iph = (void *)(eth + 1);
    if ((void *)(eth + 1) > data_end)
        return xf_decide(c, XF_V_PASS, XF_R_UPLINK_OTHER);
    if (eth->h_proto == bpf_htons(ETH_P_ARP))
        return xf_uplink_arp(ctx, c, port);
    if (eth->h_proto != bpf_htons(ETH_P_IP) || (void *)(iph + 1) > data_end)
        return xf_decide(c, XF_V_PASS, XF_R_UPLINK_OTHER);
    struct xf_nat *n = xf_nat_of(ctx);
    if (!n)
        return xf_decide(c, XF_V_PASS, XF_R_UPLINK_OTHER);
    if (iph->frag_off & bpf_htons(IP_MF | IP_OFFSET))
        return n->kind == XF_NAT_FIP ? xf_decide(c, XF_V_DROP, XF_R_NAT_FRAG) :
                                       xf_decide(c, XF_V_PASS, XF_R_UPLINK_OTHER);
    c->nat_kind = n->kind;
    c->nat_to = n->addr;
    c->tenant = n->kind == XF_NAT_FIP ? n->tenant : 0;
    return XF_NEXT;
}

/* VXLAN to this node from a VTEP of the VNI's tenant: the outer headers are set aside and
 * stripped, and the inner packet goes through the pipeline as that tenant's. What is not
 * VXLAN to this node is the kernel's. */
static __always_inline int xf_stage_decap(struct xdp_md *ctx, struct xf_ctx *c,
                                          struct xf_port *port)
{
    struct xf_outer o = {};
    int r = xf_vxlan_parse(ctx, port->local_ip[3], &o);
    if (r == XF_R_UPLINK_OTHER) {
        /* NAT's: the NAT program (one of its own: the verifier walks each pipeline
         * within its budget). It does not come back unless it is not loaded. */
        if (xf_nat_wanted(ctx))
            xf_nat_prog.call(ctx, XF_MODE_NAT_IN - 1);
        return xf_decide(c, XF_V_PASS, r);
    }
    if (r)
        return xf_decide(c, XF_V_DROP, r);
    struct xf_vni_key vk = {};
    vk.vni = o.vni;
    __u32 *tid = xf_vnis.lookup(&vk);
    if (!tid)
        return xf_decide(c, XF_V_DROP, XF_R_VNI_UNKNOWN);
    vk.vtep = o.saddr;
    if (!xf_vnis.lookup(&vk))
        return xf_decide(c, XF_V_DROP, XF_R_VTEP_UNKNOWN);
    c->tenant = *tid;
    __u32 zero = 0;
    struct xf_outer_save *save = xf_outer.lookup(&zero);
    if (!save || bpf_xdp_load_bytes(ctx, 0, save->b, XF_ENCAP_LEN))
        return xf_decide(c, XF_V_DROP, XF_R_PARSE_VXLAN);
    if (o.trailer && bpf_xdp_adjust_tail(ctx, -(int)(o.trailer & 0xffff)))
        return xf_decide(c, XF_V_DROP, XF_R_PARSE_VXLAN);
    if (bpf_xdp_adjust_head(ctx, XF_ENCAP_LEN))
        return xf_decide(c, XF_V_DROP, XF_R_PARSE_VXLAN);
    c->decap_vtep = o.saddr;
    return XF_NEXT;
}

/* A decapsulated packet leaves as the overlay allows: what is not forwarded gets its
 * outer headers back (the kernel, and the monitor, see what arrived); nothing is
 * answered onto the underlay (a neighbour reply would go out bare). */
static __always_inline int xf_decap_exit(struct xdp_md *ctx, struct xf_ctx *c, int action)
{
    if (action == XDP_REDIRECT)
        return action;
    if (action == XDP_TX) {
        c->v.verdict = XF_V_DROP;
        action = XDP_DROP;
    }
    __u32 zero = 0;
    struct xf_outer_save *save = xf_outer.lookup(&zero);
    if (!save || bpf_xdp_adjust_head(ctx, -(int)XF_ENCAP_LEN) ||
        bpf_xdp_store_bytes(ctx, 0, save->b, XF_ENCAP_LEN)) {
        c->v.verdict = XF_V_DROP;
        return XDP_DROP;
    }
    return action;
}

/* --- port -------------------------------------------------------------------------- */

/* The packet is tenant tid's: its generations, rate limit and default verdict. 0 when
 * the tenant is not configured. */
static __always_inline int xf_use_tenant(struct xf_ctx *c, __u32 tid)
{
    struct xf_tenant *t = xf_tenants.lookup(&tid);
    if (!t || t->generation == 0)
        return 0;
    c->tenant = tid;
    c->gen = t->generation;
    c->tenant_policer = t->policer;
    c->cls_gen = t->cls_generation ? t->cls_generation : t->generation;
    c->v.verdict = t->default_verdict == XF_V_PASS ? XF_V_PASS : XF_V_DROP;
    c->dflt = xf_verdict_action(c->v.verdict);
    return 1;
}

static __always_inline int xf_stage_port(struct xdp_md *ctx, struct xf_ctx *c,
                                         struct xf_port **portp)
{
    struct xf_port *port = xf_port_of(ctx->ingress_ifindex);
    if (!port) {
        /* A store the compiler must keep: builds with different XF_BUILD_ID values are
         * different programs (upgrade tests replace one with the other). */
        volatile __u32 build_id = XF_BUILD_ID;
        (void)build_id;
        return xf_decide(c, XF_V_PASS, XF_R_NO_PORT);
    }
    c->tenant = port->tenant;
    c->slot = port->slot;
    /* An uplink belongs to no tenant: VXLAN to the node becomes its VNI's tenant's
     * traffic; the rest is the node's own. (The NAT-out program sees VMs' packets.) */
    if ((port->flags & XF_PORT_UPLINK) && c->mode != XF_MODE_PORT)
        return xf_decide(c, XF_V_PASS, XF_R_UPLINK_OTHER);
    if (port->flags & XF_PORT_UPLINK) {
        int rc = xf_stage_decap(ctx, c, port);
        if (rc != XF_NEXT)
            return rc;
    }
    c->port_flags = port->flags;
    *portp = port;
    if (!xf_use_tenant(c, c->tenant))   /* fail closed where the tenant's default is drop */
        return xf_decide(c, (port->flags & XF_PORT_TENANT_DROP) ? XF_V_DROP : XF_V_PASS,
                         XF_R_NO_TENANT);
    return XF_NEXT;
}

/* The NAT program's port stage (xdpflow_nat_in): an uplink's packet to a NAT address. */
static __always_inline int xf_stage_port_nat(struct xdp_md *ctx, struct xf_ctx *c,
                                             struct xf_port **portp)
{
    struct xf_port *port = xf_port_of(ctx->ingress_ifindex);
    if (!port || !(port->flags & XF_PORT_UPLINK))
        return xf_decide(c, XF_V_PASS, XF_R_UPLINK_OTHER);
    c->slot = port->slot;
    c->port_flags = port->flags;
    *portp = port;
    int rc = xf_stage_nat_in(ctx, c, port);
    if (rc != XF_NEXT)
        return rc;
    /* To a SNAT address: whose traffic it is, its flow says (xf_stage_flow); without
     * one it is the kernel's. */
    if (c->nat_kind == XF_NAT_SNAT) {
        c->v.verdict = XF_V_PASS;
        c->dflt = XDP_PASS;
        return XF_NEXT;
    }
    if (!xf_use_tenant(c, c->tenant))
        return xf_decide(c, XF_V_DROP, XF_R_NO_TENANT);
    return XF_NEXT;
}

/* --- parse (and neighbour discovery) ---------------------------------------------- */

static __always_inline int xf_is_neighbour(struct xf_pkt *p)
{
    return p->family == 0 || (p->proto == IPPROTO_ICMPV6 &&
                              p->icmp_type >= NDISC_ROUTER_SOLICITATION &&
                              p->icmp_type <= NDISC_REDIRECT);
}

/* ARP and ND: answered here (ARP request, neighbour solicitation), handed to the kernel
 * (for the node's own addresses), or the tenant default. */
static __always_inline int xf_stage_neighbour(struct xdp_md *ctx, struct xf_ctx *c,
                                              struct xf_port *port)
{
    int is_arp = c->p.family == 0;
    int rc = -1;
    if (is_arp)
        rc = xf_arp_reply(ctx, &c->p, port);
    else if (c->p.icmp_type == NDISC_NEIGHBOUR_SOLICITATION)
        rc = xf_nd_reply(ctx, &c->p, port);
    if (rc == XDP_TX) {
        c->v.verdict = XF_V_TX;
        c->v.reason = is_arp ? XF_R_ARP_REPLY : XF_R_ND_REPLY;
        return XDP_TX;
    }
    if (rc == XDP_PASS)
        return xf_decide(c, XF_V_PASS, XF_R_LOCAL);
    return xf_default(c, is_arp ? XF_R_ARP_OTHER : XF_R_ND_OTHER);
}

static __always_inline int xf_stage_parse(struct xdp_md *ctx, struct xf_ctx *c)
{
    int err = xf_parse(ctx, &c->p);
    /* An access port takes no tags: a tagged frame would reach whatever the tag means
     * beyond the node. Malformed tags too. */
    if (c->p.vlan_depth && !(c->port_flags & XF_PORT_VLAN))
        return xf_decide(c, XF_V_DROP, XF_R_VLAN);
    if (err)
        return xf_default(c, err);
    if (c->p.family == 0 && c->p.eth_proto != bpf_htons(ETH_P_ARP))
        return xf_default(c, XF_R_NOT_IP);
    return XF_NEXT;
}

/* The NAT programs' parse stage: NAT is IPv4, untagged (what the port program hands them;
 * the rest of the parser's cases are not in their copies of the pipeline). */
static __always_inline int xf_stage_parse_v4(struct xdp_md *ctx, struct xf_ctx *c)
{
    void *data = (void *)(long)ctx->data;
    void *data_end = (void *)(long)ctx->data_end;
    struct ethhdr *eth = data;
    if ((void *)(eth + 1) > data_end || eth->h_proto != bpf_htons(ETH_P_IP))
        return xf_decide(c, XF_V_DROP, XF_R_NAT_NO_ROUTE);
    __builtin_memcpy(c->p.smac, eth->h_source, ETH_ALEN);
    c->p.eth_proto = eth->h_proto;
    c->p.l3_off = sizeof(*eth);
    int err = xf_parse_ipv4(&c->p, data, (void *)(eth + 1), data_end);
    if (err)
        return xf_default(c, err);
    return XF_NEXT;
}

/* --- boundary ---------------------------------------------------------------------- */

static __always_inline int xf_is_multicast(struct xf_pkt *p)
{
    __u8 *d = (__u8 *)p->dst;
    if (p->family == 6)
        return d[0] == 0xff;                                        /* ff00::/8 */
    return (d[12] & 0xf0) == 0xe0 || p->dst[3] == 0xffffffff;       /* 224/4, limited bcast */
}

/* Later fragments take the ports their first fragment left. */
static __always_inline int xf_stage_frag(struct xf_ctx *c)
{
    struct xf_frag_key frk = {};
    frk.tenant = c->tenant;
    frk.proto = c->p.frag_proto;
    frk.id = c->p.frag_id;
    __builtin_memcpy(frk.src, c->p.src, 16);
    __builtin_memcpy(frk.dst, c->p.dst, 16);
    if (c->p.frag == XF_FRAG_LATER) {
        struct xf_frag *fr = xf_frags.lookup(&frk);
        if (!fr)
            return xf_default(c, XF_R_FRAG);
        c->p.sport = fr->sport;
        c->p.dport = fr->dport;
        c->p.proto = fr->proto;
    } else {
#ifndef XF_TRACE
        struct xf_frag fr = {};
        fr.sport = c->p.sport;
        fr.dport = c->p.dport;
        fr.proto = c->p.proto;
        xf_frags.update(&frk, &fr);
#endif
    }
    return XF_NEXT;
}

/* Packet too big / fragmentation needed reporting an MTU no link may have: a forged
 * attempt to shrink a flow's packets. */
static __always_inline int xf_icmp_mtu_too_small(struct xf_pkt *p)
{
    if (p->proto == IPPROTO_ICMP && p->icmp_type == ICMP_DEST_UNREACH &&
        p->icmp_code == ICMP_FRAG_NEEDED)
        return p->icmp_mtu < XF_IPV4_MIN_MTU;
    if (p->proto == IPPROTO_ICMPV6 && p->icmp_type == ICMPV6_PKT_TOOBIG)
        return p->icmp_mtu < XF_IPV6_MIN_MTU;
    return 0;
}

/* Port security for what is judged here, before the flow table: ARP, ND, multicast.
 * (Unicast IP is checked when it misses: a hit checks the MAC its flow recorded.) */
static __always_inline int xf_boundary_src_ok(struct xdp_md *ctx, struct xf_ctx *c)
{
    if (!(c->port_flags & XF_PORT_SECURITY))
        return 1;
    if (c->p.family == 0)
        return xf_arp_src_ok(ctx, &c->p, c->tenant, c->slot);
    if (xf_is_neighbour(&c->p))
        return xf_nd_src_ok(ctx, &c->p, c->tenant, c->slot);
    return xf_src_ok(c->tenant, c->slot, c->p.smac, c->p.src);
}

static __always_inline int xf_stage_boundary(struct xdp_md *ctx, struct xf_ctx *c,
                                             struct xf_port *port)
{
    int neighbour = xf_is_neighbour(&c->p);
    /* Each node's proxy answers its own VMs; the overlay carries no neighbour discovery
     * and no broadcast. */
    if (c->decap_vtep && (neighbour || xf_is_multicast(&c->p)))
        return xf_decide(c, XF_V_DROP, !neighbour ? XF_R_MULTICAST :
                         c->p.family == 0 ? XF_R_ARP_OTHER : XF_R_ND_OTHER);
    if (neighbour || xf_is_multicast(&c->p)) {
        if (!xf_boundary_src_ok(ctx, c))
            return xf_decide(c, XF_V_DROP, XF_R_SPOOF);
        if (neighbour)
            return xf_stage_neighbour(ctx, c, port);
        return xf_default(c, XF_R_MULTICAST);
    }
    if (xf_icmp_mtu_too_small(&c->p))
        return xf_decide(c, XF_V_DROP, XF_R_ICMP_MTU);
    if (c->p.frag != XF_FRAG_NONE)
        return xf_stage_frag(c);
    return XF_NEXT;
}

/* --- act --------------------------------------------------------------------------- */

/* A translation, counted per (tenant, kind) (the trace build records it instead). */
static __always_inline void xf_count_nat_kind(__u16 tenant, __u32 kind, __u64 len)
{
#ifndef XF_TRACE
    __u32 key = ((__u32)tenant << 8) | kind;
    struct xf_counter *row = xf_nat_stats.lookup(&key);
    if (row) {
        row->packets++;
        row->bytes += len;
    } else {
        struct xf_counter one = {.packets = 1, .bytes = len};
        xf_nat_stats.update(&key, &one);
    }
#endif
}

static __always_inline void xf_count_nat(struct xf_ctx *c, struct xf_flow *f)
{
    int fip = f->flags & XF_FLOW_FIP;
    __u32 kind = (f->flags & XF_FLOW_DNAT) ? (fip ? XF_NATC_FIP_IN : XF_NATC_SNAT_IN)
                                           : (fip ? XF_NATC_FIP_OUT : XF_NATC_SNAT_OUT);
    xf_count_nat_kind(c->tenant, kind, c->len);
#ifdef XF_TRACE
    __u32 zero = 0;
    struct xf_trace *t = xf_trace_rec.lookup(&zero);
    if (t) {
        t->nat_addr = f->vtep;
        t->nat_port = f->encap_sport;
        t->nat_flags = f->flags & (XF_FLOW_SNAT | XF_FLOW_DNAT | XF_FLOW_FIP);
    }
#endif
}

/* Act on a flow's flattened result. */
static __always_inline int xf_act(struct xdp_md *ctx, struct xf_pkt *p, struct xf_flow *f,
                                  struct xf_port *uplink)
{
    if (f->verdict != XF_V_REDIRECT)
        return xf_verdict_action(f->verdict);

    void *data = (void *)(long)ctx->data;
    void *data_end = (void *)(long)ctx->data_end;
    struct ethhdr *eth = data;
    if ((void *)(eth + 1) > data_end)
        return XDP_DROP;
    __builtin_memcpy(eth->h_dest, f->dmac, ETH_ALEN);
    __builtin_memcpy(eth->h_source, f->smac, ETH_ALEN);
    __u32 off = p->l3_off & 0x3f;
    if (p->family == 4) {
        struct iphdr *iph = data + off;
        if ((void *)(iph + 1) > data_end)
            return XDP_DROP;
        xf_ipv4_dec_ttl(iph);
    } else {
        struct ipv6hdr *ip6 = data + off;
        if ((void *)(ip6 + 1) > data_end)
            return XDP_DROP;
        ip6->hop_limit--;
    }
    if (uplink)
        return xf_vxlan_encap(ctx, f, uplink, data_end - data);
    return bpf_redirect(f->out_ifindex, 0);
}

/* --- police ------------------------------------------------------------------------- */

/* One rate limit (slot 0: the rule's, 1: the tenant's): 1 when the packet conforms or
 * there is no such limit. The trace build looks without charging and records what it
 * saw. The fine clock: the coarse one moves in jiffies, longer than a small burst. */
static __always_inline int xf_police_one(struct xf_ctx *c, __u32 key, int i)
{
    if (!key)
        return 1;
    struct xf_policer *pl = xf_policers.lookup(&key);
    if (!pl)
        return 1;
    __u64 now = bpf_ktime_get_ns();
    __u64 cost = xf_police_cost(pl, c->len);
#ifdef XF_TRACE
    __u64 credit = xf_police_credit(pl, now);
    int ok = cost <= credit;
    __u32 zero = 0;
    struct xf_trace *t = xf_trace_rec.lookup(&zero);
    if (t && i >= 0 && i < 2) {
        t->pol_key[i] = key;
        t->pol_credit_ns[i] = credit;
        t->pol_cost_ns[i] = cost;
        t->pol_ok[i] = ok;
    }
    return ok;
#else
    return xf_police_charge(pl, cost, now);
#endif
}

/* The xf_policers key of the limit of the rule a flow is charged to, 0: none. (A flag
 * and the rule id, not a key in the entry: key and entry stay within two cache lines.) */
static __always_inline __u32 xf_flow_policer(struct xf_flow *f)
{
    return (f->flags & XF_FLOW_POLICED) ? (f->rule_id | XF_POLICER_RULE) : 0;
}

/* The rule's limit first, then the tenant's: a packet the rule refuses costs the tenant
 * nothing. */
static __always_inline int xf_stage_police(struct xf_ctx *c, __u32 rule_policer)
{
    return xf_police_one(c, rule_policer, 0) && xf_police_one(c, c->tenant_policer, 1);
}

/* Record a flow's result as the packet's verdict, police it (rule_policer: the limit of
 * the rule it is charged to, 0: none), then act on it. */
static __always_inline int xf_act_flow(struct xdp_md *ctx, struct xf_ctx *c,
                                       struct xf_flow *f, __u8 reason, __u32 rule_policer)
{
    struct xf_port *uplink = NULL;
    if ((f->flags & XF_FLOW_ENCAP) && f->verdict == XF_V_REDIRECT) {
        /* The node's address and the MTU are the uplink's (one array row). */
        uplink = xf_port_of(f->out_ifindex);
        if (!uplink || !(uplink->flags & XF_PORT_UPLINK)) {
            c->v.flow_hit = 0;
            return xf_decide(c, XF_V_DROP, XF_R_NO_ROUTE);
        }
        /* Too big for the uplink once encapsulated: the kernel's path (it can fragment
         * or say so), never a silent drop. */
        if (c->len + XF_ENCAP_OVERHEAD > uplink->mtu) {
            c->v.flow_hit = 0;      /* as TTL expiry: the flow's action was not taken */
            return xf_decide(c, XF_V_PASS, XF_R_MTU_KERNEL);
        }
    }
    c->v.verdict = f->verdict;
    c->v.reason = reason;
    if (f->verdict != XF_V_DROP && !xf_stage_police(c, rule_policer))
        return xf_decide(c, XF_V_DROP, XF_R_RATELIMIT);
    c->v.out_ifindex = f->out_ifindex;
    c->v.out_port = f->out_port;
    /* NAT flows are IPv4 (xf_nat_route) and acted on by the NAT programs only; an ICMP
     * error is translated as its flow's. */
    if (c->mode != XF_MODE_PORT && (f->flags & (XF_FLOW_SNAT | XF_FLOW_DNAT)) &&
        f->verdict == XF_V_REDIRECT) {
        if (c->p.family != 4 || xf_nat_rewrite(ctx, &c->p, f, reason == XF_R_RELATED))
            return xf_decide(c, XF_V_DROP, XF_R_PARSE_L4);
        xf_count_nat(c, f);
    }
    return xf_act(ctx, &c->p, f, uplink);
}

/* --- flow -------------------------------------------------------------------------- */

/* The reply direction of a flow key: addresses and ports swapped; an ICMP echo request
 * becomes its reply and back. Returns 0 when the protocol has no reply direction. */
static __always_inline int xf_reverse_key(struct xf_flow_key *in, struct xf_flow_key *out)
{
    out->tenant = in->tenant;
    out->proto = in->proto;
    out->pad = 0;
    __builtin_memcpy(out->src, in->dst, 16);
    __builtin_memcpy(out->dst, in->src, 16);
    if (in->proto == IPPROTO_TCP || in->proto == IPPROTO_UDP) {
        out->sport = in->dport;
        out->dport = in->sport;
        return 1;
    }
    out->sport = in->sport;             /* the echo id */
    __u8 type = in->dport >> 8;
    if (in->proto == IPPROTO_ICMP && (type == ICMP_ECHO || type == ICMP_ECHOREPLY)) {
        out->dport = (type == ICMP_ECHO ? ICMP_ECHOREPLY : ICMP_ECHO) << 8;
        return 1;
    }
    if (in->proto == IPPROTO_ICMPV6 &&
        (type == ICMPV6_ECHO_REQUEST || type == ICMPV6_ECHO_REPLY)) {
        out->dport = (type == ICMPV6_ECHO_REQUEST ? ICMPV6_ECHO_REPLY : ICMPV6_ECHO_REQUEST) << 8;
        return 1;
    }
    out->dport = in->dport;
    return 0;
}

/* An ICMP error about a flow in the table (port unreachable, too big, time exceeded
 * further on) is that flow's business: it takes the path of the flow's replies back to
 * the flow's sender, as conntrack's RELATED does, whatever the rules say about ICMP.
 * As conntrack (nf_conntrack_inet_error) it must be addressed to the flow's sender, and
 * its source must be one the port may send from. Returns that reply entry when it is
 * current and forwards from this port, else NULL. It is not cached. (Rare: the keys use
 * the scratch row, not the stack.) */
static __always_inline struct xf_flow *xf_related(struct xdp_md *ctx, struct xf_ctx *c)
{
    __u32 zero = 0;
    struct xf_scratch *qs = xf_scratch.lookup(&zero);
    if (!qs)
        return NULL;
    __builtin_memset(&qs->ck, 0, sizeof(qs->ck));
    if (xf_parse_quoted(ctx, &c->p, &qs->ck))
        return NULL;
    qs->ck.tenant = c->nat_kind ? XF_TENANT_EXTERNAL : c->tenant;
    if ((c->p.dst[0] ^ qs->ck.src[0]) | (c->p.dst[1] ^ qs->ck.src[1]) |
        (c->p.dst[2] ^ qs->ck.src[2]) | (c->p.dst[3] ^ qs->ck.src[3]))
        return NULL;
    if ((c->port_flags & XF_PORT_SECURITY) &&
        !xf_src_ok(c->tenant, c->slot, c->p.smac, c->p.src))
        return NULL;
    struct xf_flow *orig = xf_flows.lookup(&qs->ck);
    if ((orig && orig->generation != c->gen) || !xf_reverse_key(&qs->ck, &qs->rk))
        return NULL;
    struct xf_flow *f = xf_flows.lookup(&qs->rk);
    /* A translated flow's error quotes the packet as the far side saw it, which no key
     * holds: the entry of the direction it travels (the quoted packet's reply) is the
     * flow. */
    if (!f || (!orig && !(f->flags & (XF_FLOW_SNAT | XF_FLOW_DNAT))))
        return NULL;
    if (c->nat_kind == XF_NAT_SNAT && !xf_use_tenant(c, f->vni))
        return NULL;
    if ((c->nat_kind && f->vni != c->tenant) || f->generation != c->gen ||
        f->in_port != c->slot || f->verdict != XF_V_REDIRECT)
        return NULL;
    return f;
}

/* The packet's flow entry (*related: an ICMP error's, see xf_related), or NULL. */
static __always_inline struct xf_flow *xf_stage_flow(struct xdp_md *ctx, struct xf_ctx *c,
                                                     int *related)
{
    c->fk.tenant = c->nat_kind ? XF_TENANT_EXTERNAL : c->tenant;
    c->fk.proto = c->p.proto;
    __builtin_memcpy(c->fk.src, c->p.src, 16);
    __builtin_memcpy(c->fk.dst, c->p.dst, 16);
    c->fk.sport = c->p.sport;
    c->fk.dport = c->p.dport;
    struct xf_flow *f = xf_flows.lookup(&c->fk);
    /* To a SNAT address, the flow's tenant is the packet's. */
    if (f && c->nat_kind == XF_NAT_SNAT &&
        (!(f->flags & XF_FLOW_DNAT) || !xf_use_tenant(c, f->vni)))
        f = NULL;
    if (f || !xf_icmp_is_error(&c->p))
        return f;
    f = xf_related(ctx, c);
    *related = f != NULL;
    return f;
}

/* A hit must be of the current generation and come from the port the flow was judged
 * for: the same tuple from another port of the tenant (a spoofing VM, or an in_port
 * rule), or with another source MAC on a port with port security, is judged again. */
static __always_inline int xf_is_hit(struct xf_ctx *c, struct xf_flow *f)
{
    return f && f->generation == c->gen && f->in_port == c->slot &&
           (c->nat_kind ? f->vni == c->tenant : xf_from_ok(c, f->in_mac, f->vtep));
}

static __always_inline int xf_stage_hit(struct xdp_md *ctx, struct xf_ctx *c,
                                        struct xf_flow *f, int related)
{
    if (!related && !(f->flags & XF_FLOW_REVERSE))
        c->v.rule_stat = f->rule_stat;
    /* Allowed, but its TTL expires here: the kernel sends time-exceeded. */
    if (f->verdict == XF_V_REDIRECT && c->p.ttl <= 1)
        return xf_decide(c, XF_V_PASS, XF_R_TTL);
    c->v.flow_hit = 1;
    c->v.rule_id = f->rule_id;
#ifndef XF_TRACE
    __sync_fetch_and_add(&f->packets, 1);
    __sync_fetch_and_add(&f->bytes, c->len);
    f->last_seen_ns = bpf_ktime_get_coarse_ns();
    if (c->p.tcp_flags & ~f->tcp_flags) {
        f->tcp_flags |= c->p.tcp_flags;
        if (c->p.tcp_flags & (TCPHDR_FIN | TCPHDR_RST))
            f->flags |= XF_FLOW_CLOSING;
    }
#endif
    /* An ICMP error about a flow is the connection's, not what its rule allowed: only the
     * tenant's limit applies to it. */
    return xf_act_flow(ctx, c, f, related ? XF_R_RELATED : XF_R_FLOW,
                       related ? 0 : xf_flow_policer(f));
}

/* --- route ------------------------------------------------------------------------- */

/* A tenant's packet to what is neither its endpoint nor its route: out of an uplink,
 * translated, when its source has a floating IP (which wins) or its tenant a SNAT (TCP,
 * UDP and ICMP echo: what a port can be given for); else no route, as without NAT. Only
 * for the node's own VMs (a floating IP's is a local endpoint; a decapsulated packet's
 * source is not). The next hop: for the reply of what came in from outside, back to the
 * MAC it came from; for what a VM starts, the node's FIB (bpf_fib_lookup: an uplink and
 * a resolved neighbour, else dropped and counted, never sent untranslated). */
static __always_inline __u8 xf_nat_route(struct xdp_md *ctx, struct xf_ctx *c,
                                         struct xf_flow_key *k, struct xf_flow *f)
{
    f->verdict = XF_V_DROP;
    if ((k->dst[0] | k->dst[1] | (k->dst[2] ^ bpf_htonl(0xffff))) || c->decap_vtep)
        return XF_R_NO_ROUTE;
    struct xf_nat_key nk = {};
    nk.tenant = k->tenant;
    nk.addr = k->src[3];
    struct xf_nat *n = xf_nat.lookup(&nk);
    if (!n || n->kind != XF_NAT_FIP) {
        nk.addr = 0;
        n = xf_nat.lookup(&nk);
        if (!n || n->kind != XF_NAT_SNAT)
            return XF_R_NO_ROUTE;
        if (k->proto != IPPROTO_TCP && k->proto != IPPROTO_UDP &&
            !(k->proto == IPPROTO_ICMP && (k->dport >> 8) == ICMP_ECHO))
            return XF_R_NO_ROUTE;
    }
    if (c->mode == XF_MODE_PORT) {
        xf_nat_prog.call(ctx, XF_MODE_NAT_OUT - 1);
        return XF_R_NAT_NO_ROUTE;       /* the NAT program is not loaded */
    }
    struct xf_port *up;
    if (c->mode == XF_MODE_NAT_IN) {
        up = xf_port_of(ctx->ingress_ifindex);
        if (!up)
            return XF_R_NAT_NO_ROUTE;
        f->out_ifindex = ctx->ingress_ifindex;
        __builtin_memcpy(f->dmac, c->p.smac, ETH_ALEN);
    } else {
        __u32 zero = 0;
        struct xf_scratch *sc = xf_scratch.lookup(&zero);
        if (!sc)
            return XF_R_NAT_NO_ROUTE;
        struct bpf_fib_lookup *fp = &sc->fib;
        __builtin_memset(fp, 0, sizeof(*fp));
        fp->family = AF_INET;
        fp->l4_protocol = k->proto;
        fp->ipv4_src = n->addr;
        fp->ipv4_dst = k->dst[3];
        fp->ifindex = ctx->ingress_ifindex;
        int rc = bpf_fib_lookup(ctx, fp, sizeof(*fp), 0);
        if (rc == BPF_FIB_LKUP_RET_NO_NEIGH)
            return XF_R_NAT_NO_NEIGH;
        /* The kernel's FIB lookup answers only for an interface that forwards: said
         * apart from "no route", so the operator sees which setting is missing. */
        if (rc == BPF_FIB_LKUP_RET_FWD_DISABLED)
            return XF_R_NAT_FORWARDING_OFF;
        if (rc != BPF_FIB_LKUP_RET_SUCCESS)
            return XF_R_NAT_NO_ROUTE;
        up = xf_port_of(fp->ifindex);
        if (!up || !(up->flags & XF_PORT_UPLINK))
            return XF_R_NAT_NO_ROUTE;
        f->out_ifindex = fp->ifindex;
        __builtin_memcpy(f->dmac, fp->dmac, ETH_ALEN);
    }
    f->out_port = up->slot;
    __builtin_memcpy(f->smac, up->mac, ETH_ALEN);
    f->verdict = XF_V_REDIRECT;
    f->flags |= XF_FLOW_SNAT | (n->kind == XF_NAT_FIP ? XF_FLOW_FIP : 0);
    f->vtep = n->addr;
    f->encap_sport = k->sport;    /* a floating IP keeps ports; a SNAT's: xf_nat_claim */
    return XF_R_RULE_ALLOW;
}

/* Where a flow key's destination goes: fills *f (verdict, output, MACs, the overlay's
 * outer headers, a NAT's rewrite) and returns the reason. */
static __always_inline __u8 xf_route(struct xdp_md *ctx, struct xf_ctx *c,
                                     struct xf_flow_key *k, struct xf_flow *f)
{
    __u16 tenant = k->tenant;
    __u32 *dst = k->dst;
    struct xf_ep_key ek = {};
    ek.tenant = tenant;
    __builtin_memcpy(ek.addr, dst, 16);
    struct xf_endpoint *ep = xf_endpoints.lookup(&ek);
    if (!ep) {
        struct xf_route_key rk = {};
        rk.prefixlen = 32 + 128;
        rk.tenant = tenant;
        __builtin_memcpy(rk.addr, dst, 16);
        struct xf_route *rt = xf_routes.lookup(&rk);
        if (!rt)
            return xf_nat_route(ctx, c, k, f);
        if (rt->action == XF_RT_KERNEL) {
            f->verdict = XF_V_PASS;
            return XF_R_ROUTE_KERNEL;
        }
        if (rt->action != XF_RT_VIA) {
            f->verdict = XF_V_DROP;
            return XF_R_ROUTE_DROP;
        }
        __builtin_memcpy(ek.addr, rt->via, 16);
        ep = xf_endpoints.lookup(&ek);
        if (!ep) {
            f->verdict = XF_V_DROP;
            return XF_R_NO_ROUTE;
        }
    }
    if (ep->flags & XF_EP_LOCAL) {
        f->verdict = XF_V_PASS;
        return XF_R_LOCAL;
    }
    if (ep->flags & XF_EP_REMOTE) {
        if (!(ep->vtep_mac[0] | ep->vtep_mac[1] | ep->vtep_mac[2] | ep->vtep_mac[3] |
              ep->vtep_mac[4] | ep->vtep_mac[5])) {
            f->verdict = XF_V_PASS;     /* the agent resolves it; the kernel asks now */
            return XF_R_NO_NEIGH;
        }
        f->flags |= XF_FLOW_ENCAP;
        f->vtep = ep->vtep;
        f->vni = ep->vni;
        __builtin_memcpy(f->vtep_mac, ep->vtep_mac, ETH_ALEN);
        f->encap_sport = xf_encap_sport(k);
    }
    f->verdict = XF_V_REDIRECT;
    f->out_ifindex = ep->ifindex;
    f->out_port = ep->port;
    __builtin_memcpy(f->dmac, ep->mac, ETH_ALEN);
    __builtin_memcpy(f->smac, ep->port_mac, ETH_ALEN);
    return XF_R_RULE_ALLOW;
}

/* --- classify ---------------------------------------------------------------------- */

/* Tuple-space search: one exact-match lookup per mask of the tenant's generation, masks
 * ordered by the best rank they hold, stopping once nothing left can win. Returns the
 * best match's action, or 0 when no rule matches. */
static __always_inline __u8 xf_classify(__u16 tenant, __u32 gen, struct xf_flow_key *fk,
                                        __u16 in_port, struct xf_match *best)
{
    best->rank = 0;
    best->rule_id = 0;
    best->stat = 0;
    best->action = 0;
    best->policer = 0;
    struct xf_mask_key mk = {};
    mk.tenant = tenant;
    mk.generation = gen;
    struct xf_mask_set *ms = xf_masks.lookup(&mk);
    if (!ms)
        return 0;
    /* ICMP rules see type and code, not the echo id. */
    __u16 sport = (fk->proto == IPPROTO_ICMP || fk->proto == IPPROTO_ICMPV6) ? 0 : fk->sport;
    struct xf_rule_key k = {};
    k.generation = gen;
    k.tenant = tenant;
    __u32 count = ms->count;

    for (__u32 i = 0; i < XF_MAX_MASKS; i++) {
        /* Hide the index from clang's induction rewriting, which turns the two bounds
         * into one pointer comparison the verifier cannot follow. */
        __u32 idx = i;
        asm volatile("" : "+r"(idx));
        if (idx >= count || idx >= XF_MAX_MASKS)
            break;
        struct xf_mask *m = &ms->masks[idx];
        /* Ranks are unique per rule: a mask whose best is the match found (the same rule,
         * another of its port-range prefixes) or lower cannot beat it, nor can any after. */
        if (best->rank >= m->max_rank)
            break;
        k.mask_idx = m->key_idx;
        k.proto = fk->proto & m->proto;
        k.in_port = in_port & m->in_port;
        k.src[0] = fk->src[0] & m->src[0];
        k.src[1] = fk->src[1] & m->src[1];
        k.src[2] = fk->src[2] & m->src[2];
        k.src[3] = fk->src[3] & m->src[3];
        k.dst[0] = fk->dst[0] & m->dst[0];
        k.dst[1] = fk->dst[1] & m->dst[1];
        k.dst[2] = fk->dst[2] & m->dst[2];
        k.dst[3] = fk->dst[3] & m->dst[3];
        k.sport = sport & m->sport;
        k.dport = fk->dport & m->dport;
        struct xf_rule *r = xf_rules.lookup(&k);
        if (r && r->rank > best->rank) {
            best->rank = r->rank;
            best->rule_id = r->rule_id;
            best->stat = r->stat;
            best->action = r->action;
            best->policer = r->policer;
        }
    }
    return best->action;
}

/* A new entry counts against its tenant's quota (t->flows, added to atomically: several
 * CPUs install at once); replacing an entry that exists (a stale one) does not, and is
 * done at the quota too, or a tenant at its quota would re-judge its flows after every
 * rule change until they aged out. Returns 0 when cached, -1 when the insert failed
 * (counted), 1 when the quota refused a new entry. */
static __always_inline int xf_insert(struct xf_flow_key *k, struct xf_flow *f, __u16 port,
                                     struct xf_tenant *t, int at_quota)
{
#ifndef XF_TRACE
    int rc;
    if (at_quota) {
        if (!xf_flows.lookup(k))
            return 1;
        rc = xf_flows.update(k, f);
    } else {
        rc = xf_flows.insert(k, f);
        if (rc == -EEXIST)
            rc = xf_flows.update(k, f);
        else if (!rc && t)
            __sync_fetch_and_add(&t->flows, 1);
    }
    if (rc) {
        xf_count(port, XF_V_NONE, XF_R_INSERT_FAILED, 0);
        return -1;
    }
#endif
    return 0;
}

/* Is this miss the reply of a flow the table knows? Its stale reply entry f (arriving on
 * the port and with the MAC the entry was made for) or, its reply entry missing (a failed
 * insert, an eviction), the forward entry it answers. Then the forward direction sc->ck,
 * arriving on j->in_port, is what gets judged. */
static __always_inline int xf_reply_of(struct xf_ctx *c, struct xf_flow *f,
                                       struct xf_scratch *sc, struct xf_judgement *j)
{
    if (!xf_reverse_key(&c->fk, &sc->ck))
        return 0;
    if (f) {
        if (f->generation == c->gen || !(f->flags & XF_FLOW_REVERSE) ||
            f->in_port != c->slot || !xf_from_ok(c, f->in_mac, f->vtep))
            return 0;
        j->in_port = f->out_port;
        return 1;
    }
    struct xf_flow *fw = xf_flows.lookup(&sc->ck);
    if (!fw || (fw->flags & XF_FLOW_REVERSE) || fw->verdict != XF_V_REDIRECT ||
        fw->out_port != c->slot || !xf_from_ok(c, fw->dmac, fw->vtep))
        return 0;
    j->in_port = fw->in_port;
    j->keep_fwd = fw->generation == c->gen;
    return 1;
}

/* A miss, or a flow made under an older rule set: judge it by the rules (a current flow
 * judged for another port is a plain miss for this one). The forward result being built
 * is sc->nf for the key sc->ck. */
static __always_inline int xf_stage_classify(struct xdp_md *ctx, struct xf_ctx *c,
                                             struct xf_flow *f,
                                             struct xf_scratch *sc, struct xf_judgement *j,
                                             __u8 mode)
{
    if (f && f->generation != c->gen) {
        c->v.stale = 1;
        xf_count(c->slot, XF_V_NONE, XF_R_FLOW_STALE, 0);
    }
    /* A reply: its connection lives on if the rules still allow the forward direction,
     * so judge that first; otherwise judge the packet on its own. */
    j->in_port = c->slot;
    j->as_reply = xf_reply_of(c, f, sc, j);
    if (!j->as_reply)
        sc->ck = c->fk;

    __u64 now = bpf_ktime_get_coarse_ns();
    /* At most two judgements, one copy of the code (the verifier walks the classifier
     * once per copy): a reply's forward direction, then the packet on its own. */
#pragma nounroll
    for (int attempt = 0; attempt < 2; attempt++) {
        /* On its own, a packet must come from its port's own MAC and addresses. */
        if (!j->as_reply && (((c->port_flags & XF_PORT_SECURITY) &&
                               !xf_src_ok(c->tenant, c->slot, c->p.smac, c->p.src)) ||
                              (c->decap_vtep && !xf_remote_src_ok(c))))
            return xf_decide(c, XF_V_DROP, XF_R_SPOOF);
        __builtin_memset(&sc->nf, 0, sizeof(sc->nf));
        sc->nf.generation = c->gen;
        sc->nf.created_ns = now;
        sc->nf.last_seen_ns = now;
        /* The node's own addresses too: the rules judge them before the kernel sees them.
         * Either order decides the same (the classifier only writes j->r, and has no
         * side effect before the route's NAT tail call). The order is the verifier's:
         * the port program walks the mask loop fewer times with the rules first (not
         * once more per outcome of the route), the NAT programs with the route first
         * (`mode` is a compile-time constant: each program has one order). Measured
         * at 32 masks: port 869k rules first, 916k route first; NAT-out 818k / 980k. */
        if (mode == XF_MODE_PORT)
            xf_classify(c->tenant, c->cls_gen, &sc->ck, j->in_port, &j->r);
        j->reason = xf_route(ctx, c, &sc->ck, &sc->nf);
        if (mode != XF_MODE_PORT)
            xf_classify(c->tenant, c->cls_gen, &sc->ck, j->in_port, &j->r);
        if (!j->as_reply || (j->r.action == XF_A_ALLOW && sc->nf.verdict == XF_V_REDIRECT))
            break;
        /* The forward direction is no longer allowed and forwarded: the packet is new
         * traffic. */
        j->as_reply = 0;
        j->keep_fwd = 0;
        sc->ck = c->fk;
        j->in_port = c->slot;
    }

    if (!j->r.action)
        return xf_default(c, XF_R_DEFAULT);
    c->v.rule_id = j->r.rule_id;
    if (!j->as_reply)
        c->v.rule_stat = j->r.stat;
    xf_count_rule(j->r.rule_id);
    if (j->r.action == XF_A_DENY)
        return xf_decide(c, XF_V_DROP, XF_R_RULE_DENY);
    return XF_NEXT;
}

/* --- install ----------------------------------------------------------------------- */

/* Stateful: the reply direction of an allowed flow is installed with the forward one
 * (redirects only; what goes to the kernel comes back through the kernel). Builds it in
 * sc->rf for the key sc->rk; returns 1 when the reply has somewhere to go. */
static __always_inline int xf_reverse_flow(struct xdp_md *ctx, struct xf_ctx *c,
                                           struct xf_scratch *sc, struct xf_judgement *j)
{
    __builtin_memset(&sc->rf, 0, sizeof(sc->rf));
    if (sc->nf.verdict != XF_V_REDIRECT || j->r.action != XF_A_ALLOW ||
        !xf_reverse_key(&sc->ck, &sc->rk))
        return 0;
    sc->rf.generation = c->gen;
    sc->rf.created_ns = sc->nf.created_ns;
    sc->rf.last_seen_ns = sc->nf.created_ns;
    sc->rf.rule_id = j->r.rule_id;
    sc->rf.flags = XF_FLOW_REVERSE;
    sc->rf.in_port = sc->nf.out_port;
    __builtin_memcpy(sc->rf.in_mac, sc->nf.dmac, ETH_ALEN);   /* replies come from it */
    int routed = xf_route(ctx, c, &sc->rk, &sc->rf) == XF_R_RULE_ALLOW;
    sc->rf.reason = XF_R_RULE_ALLOW;
    /* Replies of what was sent over the overlay come back from that VTEP. */
    if (sc->nf.flags & XF_FLOW_ENCAP)
        sc->rf.vtep = sc->nf.vtep;
    return routed;
}

/* --- NAT: the direction from outside -------------------------------------------------- */

/* A packet from outside that is no current flow's hit, in its VM tenant's terms: the
 * destination its flow (SNAT) or floating address stands for. It is then judged as that
 * tenant's traffic: as the reply of the VM's flow, or (a floating IP) as new traffic to
 * the VM, which the tenant's rules judge as they would on the VM's own address. */
static __always_inline int xf_nat_judge_in(struct xf_ctx *c, struct xf_flow *f)
{
    __u16 *port = c->fk.proto == IPPROTO_ICMP ? &c->fk.sport : &c->fk.dport;
    c->nat_hint = *port;
    if (c->nat_kind == XF_NAT_SNAT) {
        if (!f)
            return xf_decide(c, XF_V_PASS, XF_R_NAT_NO_FLOW);
        c->fk.dst[3] = f->vtep;
        *port = f->encap_sport;
    } else {
        c->fk.dst[3] = c->nat_to;
    }
    c->fk.tenant = c->tenant;
    return XF_NEXT;
}

/* Make entry `in` of key ki (to a VM, in its tenant's terms) the entry of packets from
 * outside: keyed on the external side, to nat_addr at nat_port (TCP/UDP: the
 * destination port; ICMP: the echo id), translating to the VM's address and port. */
static __always_inline void xf_nat_in_entry(struct xf_flow_key *ki, struct xf_flow *in,
                                            __be32 nat_addr, __u16 nat_port)
{
    __u16 *port = ki->proto == IPPROTO_ICMP ? &ki->sport : &ki->dport;
    in->flags |= XF_FLOW_DNAT;
    in->vtep = ki->dst[3];
    in->encap_sport = *port;
    in->vni = ki->tenant;
    ki->tenant = XF_TENANT_EXTERNAL;
    ki->dst[3] = nat_addr;
    *port = nat_port;
}

/* Is e the external-side entry of the same flow as `in` (an older one of it)? */
static __always_inline int xf_nat_same(struct xf_flow *e, struct xf_flow *in)
{
    return (e->flags & XF_FLOW_DNAT) && e->vni == in->vni && e->vtep == in->vtep &&
           e->encap_sport == in->encap_sport;
}

/* Take SNAT port *ki's for entry `in`: insert its key if nobody holds it (BPF_NOEXIST:
 * two CPUs cannot both get it), or take over an older entry of the same flow. */
static __always_inline int xf_nat_take(struct xf_flow_key *ki, struct xf_flow *in,
                                       struct xf_tenant *t, int at_quota)
{
#ifdef XF_TRACE
    struct xf_flow *e = xf_flows.lookup(ki);
    return !e || xf_nat_same(e, in);
#else
    if (!at_quota) {
        int rc = xf_flows.insert(ki, in);
        if (!rc) {
            if (t)
                __sync_fetch_and_add(&t->flows, 1);
            return 1;
        }
        if (rc != -EEXIST)
            return 0;
    }
    struct xf_flow *e = xf_flows.lookup(ki);
    return e && xf_nat_same(e, in) && !xf_flows.update(ki, in);
#endif
}

/* One SNAT port search. */
struct xf_claim {
    __u32 lo;              /* the range */
    __u32 range;
    __u32 h;               /* where the search starts: a hash of the flow */
    __u32 tid;             /* its tenant (the quota counts its claim) */
    __u16 hint;            /* tried first: the port the flow held */
    __u16 port;            /* the port taken; 0: none yet */
    __u8  at_quota;
    __u8  icmp;            /* the port is the key's sport (an echo id), else its dport */
    __u8  pad[2];
};

/* Try the i-th candidate port for the reply entry being built (sc->rk / rf). Returns 1
 * once a port is taken. */
static __always_inline int xf_nat_try(__u32 i, struct xf_claim *cl, struct xf_scratch *sc)
{
    __u32 cand = cl->lo + (cl->h + i) % cl->range;
    if (i == 0 && cl->hint >= cl->lo && cl->hint - cl->lo < cl->range)
        cand = cl->hint;
    if (cl->icmp)
        sc->rk.sport = cand;
    else
        sc->rk.dport = cand;
    __u32 tid = cl->tid;
    struct xf_tenant *t = xf_tenants.lookup(&tid);
    if (!xf_nat_take(&sc->rk, &sc->rf, t, cl->at_quota))
        return 0;
    cl->port = cand;
    return 1;
}

/* A SNAT flow's port: the external-side key (protocol, remote address and port, SNAT
 * address and port) is the claim, so no two flows of any tenants share one. Tried: the
 * port it held (judged again), then from a hash of the flow on, at most XF_NAT_TRIES.
 * The forward direction is sc->ck / nf, its reply sc->rk / rf. Returns 0 with the reply
 * entry in the table and nf's port set, or -1: exhausted. */
static __always_inline int xf_nat_claim(struct xf_ctx *c, struct xf_scratch *sc, int at_quota)
{
    struct xf_nat_key nk = {};
    nk.tenant = sc->ck.tenant;
    struct xf_nat *n = xf_nat.lookup(&nk);
    if (!n || n->kind != XF_NAT_SNAT || !n->port_lo || n->port_hi < n->port_lo)
        return -1;
    struct xf_claim cl = {};
    cl.lo = n->port_lo;
    cl.range = (__u32)n->port_hi - n->port_lo + 1;
    cl.h = xf_flow_hash(&sc->ck);
    cl.tid = c->tenant;
    cl.hint = c->nat_hint;
    cl.at_quota = at_quota;
    cl.icmp = sc->rk.proto == IPPROTO_ICMP;
    xf_nat_in_entry(&sc->rk, &sc->rf, sc->nf.vtep, 0);
    /* (bpf_loop would let the verifier walk the try once, not once per try and per path
     * that reaches the search; BCC 0.26 cannot load its callback. The tries are what
     * the verifier's budget for this program allows.) */
#pragma nounroll
    for (__u32 i = 0; i < XF_NAT_TRIES; i++) {
        if (i >= cl.range || xf_nat_try(i, &cl, sc))
            break;
    }
    if (!cl.port)
        return -1;
    sc->nf.encap_sport = cl.port;
    return 0;
}

/* Key the direction from outside on the external side (a SNAT flow claiming its port
 * there). Returns XF_NEXT, or the action for a packet that cannot be translated. *done:
 * the reply entry is in the table already (the claim). */
static __always_inline int xf_nat_install(struct xf_ctx *c, struct xf_scratch *sc,
                                          struct xf_judgement *j, int have_rev,
                                          struct xf_tenant *t, int at_quota, int *done)
{
    if (sc->nf.flags & XF_FLOW_SNAT) {
        if (!have_rev)       /* a floating IP's one-way traffic (no reply to expect) */
            return (sc->nf.flags & XF_FLOW_FIP) ? XF_NEXT : xf_decide(c, XF_V_DROP, XF_R_NO_ROUTE);
        if (sc->nf.flags & XF_FLOW_FIP) {
            xf_nat_in_entry(&sc->rk, &sc->rf, sc->nf.vtep, sc->nf.encap_sport);
            sc->rf.flags |= XF_FLOW_FIP;
            return XF_NEXT;
        }
        if (xf_nat_claim(c, sc, at_quota)) {
            xf_count_nat_kind(c->tenant, XF_NATC_EXHAUSTED, c->len);
            return xf_decide(c, XF_V_DROP, XF_R_NAT_EXHAUSTED);
        }
        *done = 1;
        return XF_NEXT;
    }
    /* From outside to a VM: its reply leaves by its floating IP (a SNAT flow always
     * starts inside). */
    if (have_rev && (sc->rf.flags & XF_FLOW_FIP)) {
        xf_nat_in_entry(&sc->ck, &sc->nf, sc->rf.vtep, sc->rf.encap_sport);
        sc->nf.flags |= XF_FLOW_FIP;
        return XF_NEXT;
    }
    if (c->nat_kind == XF_NAT_FIP && !j->as_reply) {
        xf_nat_in_entry(&sc->ck, &sc->nf, c->p.dst[3], c->p.proto == IPPROTO_ICMP ?
                        c->p.sport : c->p.dport);
        sc->nf.flags |= XF_FLOW_FIP;
        return XF_NEXT;
    }
    /* From outside, and nothing to translate it to (its flow is no longer allowed). */
    if (c->nat_kind)
        return xf_decide(c, XF_V_PASS, XF_R_NAT_NO_FLOW);
    return XF_NEXT;
}

static __always_inline int xf_stage_install(struct xdp_md *ctx, struct xf_ctx *c,
                                            struct xf_scratch *sc, struct xf_judgement *j,
                                            __u8 mode)
{
    sc->nf.rule_id = j->r.rule_id;
    sc->nf.rule_stat = j->r.stat;
    if (j->r.policer)                 /* the forward direction is the rule's; a reply not */
        sc->nf.flags |= XF_FLOW_POLICED;
    sc->nf.in_port = j->in_port;
    if (j->r.action == XF_A_PASS) {
        sc->nf.verdict = XF_V_PASS;
        sc->nf.out_ifindex = 0;
        sc->nf.out_port = 0;
        j->reason = XF_R_RULE_PASS;
    } else if (c->decap_vtep && !j->as_reply &&
               ((sc->nf.flags & XF_FLOW_ENCAP) ||
                (mode == XF_MODE_PORT && j->reason == XF_R_NO_NEIGH))) {
        /* From the overlay back into it: no node is a transit for another, also while
         * the far VTEP's underlay neighbour is not resolved (no_neigh: a remote endpoint
         * without its outer MAC yet), or the kernel would get it. Only the port program
         * decapsulates: the NAT programs leave the test out (the verifier's budget). */
        return xf_decide(c, XF_V_DROP, XF_R_NO_ROUTE);
    } else if (sc->nf.verdict == XF_V_DROP) {
        /* Allowed, but nowhere to go: not cached, so a new endpoint or route takes
         * effect without waiting for the flow to age. */
        return xf_decide(c, XF_V_DROP, j->reason);
    }
    /* Allowed, but its TTL expires here: the kernel sends time-exceeded. Not cached: it
     * was not forwarded. */
    if (c->p.ttl <= 1 && sc->nf.verdict == XF_V_REDIRECT)
        return xf_decide(c, XF_V_PASS, XF_R_TTL);
    sc->nf.reason = j->reason;
    if (c->decap_vtep && !j->as_reply)
        sc->nf.vtep = c->decap_vtep;    /* its packets must keep coming from that VTEP */
    int have_rev = xf_reverse_flow(ctx, c, sc, j);
    /* The MAC the forward direction's packets carry: this one's, or for a reply the
     * forward sender's (where the reply goes). */
    if (j->as_reply)
        __builtin_memcpy(sc->nf.in_mac, sc->rf.dmac, ETH_ALEN);
    else
        __builtin_memcpy(sc->nf.in_mac, c->p.smac, ETH_ALEN);

    /* The packet's own direction carries its first count. */
    struct xf_flow *own = j->as_reply ? &sc->rf : &sc->nf;
    __u8 tflags = c->p.proto == IPPROTO_TCP ? c->p.tcp_flags : 0;
    own->packets = 1;
    own->bytes = c->len;
    own->tcp_flags = tflags;
    if (tflags & (TCPHDR_FIN | TCPHDR_RST))
        own->flags |= XF_FLOW_CLOSING;
    /* A tenant at its flow quota gets the verdict it was judged, its new entries
     * uncached (counted once a packet): a flood of new flows fills its own share of the
     * table, never another tenant's. */
    __u32 tid = c->tenant;
    struct xf_tenant *t = xf_tenants.lookup(&tid);
    int at_quota = t && t->max_flows && t->flows >= t->max_flows;
    int refused = 0;
    int rev_done = 0;
    if (c->mode != XF_MODE_PORT) {
        int rc = xf_nat_install(c, sc, j, have_rev, t, at_quota, &rev_done);
        if (rc != XF_NEXT)
            return rc;
    }
    /* The reply first: a full table then leaves no forward entry without its reply
     * path. A forward entry still current (a reply re-creating its entry) is kept. */
    if (have_rev && !rev_done)
        refused |= xf_insert(&sc->rk, &sc->rf, c->slot, t, at_quota) > 0;
    if (!j->keep_fwd)
        refused |= xf_insert(&sc->ck, &sc->nf, c->slot, t, at_quota) > 0;
    if (refused)
        xf_count(c->slot, XF_V_NONE, XF_R_FLOW_QUOTA, 0);

    if (j->as_reply && !have_rev)
        return xf_decide(c, XF_V_DROP, XF_R_NO_ROUTE);
    if (j->as_reply)
        return xf_act_flow(ctx, c, &sc->rf, XF_R_RULE_ALLOW, xf_flow_policer(&sc->rf));
    return xf_act_flow(ctx, c, &sc->nf, sc->nf.reason, xf_flow_policer(&sc->nf));
}

/* --- the pipeline -------------------------------------------------------------------- */

/* The pipeline, as program `mode` runs it (a constant: each program has its own copy). */
static __always_inline int xf_pipeline(struct xdp_md *ctx, __u8 mode)
{
    void *data = (void *)(long)ctx->data;
    void *data_end = (void *)(long)ctx->data_end;
    struct xf_ctx c = {};
    c.len = data_end - data;
    c.mode = mode;

    struct xf_port *port = NULL;
    int rc = mode == XF_MODE_NAT_IN ? xf_stage_port_nat(ctx, &c, &port)
                                    : xf_stage_port(ctx, &c, &port);
    if (rc == XF_NEXT)
        rc = mode == XF_MODE_PORT ? xf_stage_parse(ctx, &c) : xf_stage_parse_v4(ctx, &c);
    if (rc == XF_NEXT)
        rc = xf_stage_boundary(ctx, &c, port);
    if (rc != XF_NEXT)
        return xf_finish(ctx, &c, rc);

    int related = 0;
    struct xf_flow *f = xf_stage_flow(ctx, &c, &related);
    /* A NAT flow (current or not, or an ICMP error about one) is the NAT program's. */
    if (mode == XF_MODE_PORT && f && (f->flags & (XF_FLOW_SNAT | XF_FLOW_DNAT))) {
        xf_nat_prog.call(ctx, XF_MODE_NAT_OUT - 1);
        return xf_finish(ctx, &c, xf_decide(&c, XF_V_DROP, XF_R_NAT_NO_ROUTE));
    }
    if (xf_is_hit(&c, f))
        return xf_finish(ctx, &c, xf_stage_hit(ctx, &c, f, related));

    /* The slow path's working set lives in a per-CPU scratch row: on the stack it would
     * not fit the verifier's 512 bytes next to the parser's and the classifier's. */
    __u32 zero = 0;
    struct xf_scratch *sc = xf_scratch.lookup(&zero);
    if (!sc)
        return xf_finish(ctx, &c, xf_default(&c, XF_R_DEFAULT));
    struct xf_judgement j = {};
    if (mode == XF_MODE_NAT_IN)
        rc = xf_nat_judge_in(&c, f);
    else if (f && (f->flags & XF_FLOW_SNAT))
        c.nat_hint = f->encap_sport;       /* judged again: keep its SNAT port */
    if (rc == XF_NEXT)
        rc = xf_stage_classify(ctx, &c, f, sc, &j, mode);
    if (rc == XF_NEXT)
        rc = xf_stage_install(ctx, &c, sc, &j, mode);
    return xf_finish(ctx, &c, rc);
}

int xdpflow_port(struct xdp_md *ctx)
{
    return xf_pipeline(ctx, XF_MODE_PORT);
}

/* Tail-called from xdpflow_port (xf_nat_prog[0]) for an uplink's packets to a floating
 * or SNAT address, and ARP for one. */
int xdpflow_nat_in(struct xdp_md *ctx)
{
    return xf_pipeline(ctx, XF_MODE_NAT_IN);
}

/* Tail-called from xdpflow_port (xf_nat_prog[1]) for a VM's packets a NAT translates. */
int xdpflow_nat_out(struct xdp_md *ctx)
{
    return xf_pipeline(ctx, XF_MODE_NAT_OUT);
}
