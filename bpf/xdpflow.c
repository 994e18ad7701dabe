/* xdpflow datapath: the XDP program attached to every port. It wires the pipeline
 *
 *   parse -> tenant (ingress port) -> flow table (hit, current generation: act)
 *     miss -> local? -> classify (tuple-space search) -> route -> install flow + reverse
 *     -> act (drop | pass | redirect with MAC rewrite and TTL decrement) -> count
 *
 * Built with -DXF_TRACE it is the trace build: the same pipeline run by BPF_PROG_TEST_RUN
 * for `xdpflowctl trace`, which records what it decided and writes no flow or counter. */
#include <uapi/linux/bpf.h>
#include <linux/in.h>
#include <linux/if_ether.h>
#include <linux/ip.h>
#include <linux/ipv6.h>
#include <linux/tcp.h>
#include <linux/udp.h>

#include "xf_consts.h"
#include "xf_structs.h"
#include "xf_maps.h"
#include "xf_csum.h"
#include "xf_parse.h"
/* Map accesses stay in this file: BCC rewrites map calls in the main file only. */
/* Does the tenant know this address (and does it live behind another port than the
 * asker's)? */
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

#define TCP_FIN 0x01
#define TCP_RST 0x04

struct xf_verdict {
    __u32 rule_id;
    __u32 out_ifindex;
    __u16 out_port;
    __u8  verdict;
    __u8  reason;
    __u8  flow_hit;
    __u8  stale;
};

static __always_inline void xf_count(__u16 tenant, __u16 port, __u8 verdict, __u8 reason,
                                     __u64 bytes)
{
#ifndef XF_TRACE
    /* A per-CPU array row per (port slot, verdict, reason): an array lookup costs a
     * fraction of a hash lookup on every packet. The agent knows each slot's tenant. */
    __u32 idx = ((__u32)port * XF_V_MAX + (verdict & 7)) * XF_R_ROWS + (reason & (XF_R_ROWS - 1));
    struct xf_counter *c = xf_stats.lookup(&idx);
    if (c) {
        c->packets++;      /* per-CPU: no atomics needed */
        c->bytes += bytes;
    }
#endif
}

#ifndef XF_TRACE
/* A monitor event for a packet some listener may want, paid for from this CPU's token
 * bucket: a flood costs at most the configured rate of events; the rest only counts. */
static __always_inline void xf_monitor(struct xdp_md *ctx, struct xf_mon_cfg *mc,
                                       __u16 tenant, __u16 port, struct xf_verdict *v,
                                       __u64 bytes)
{
    if (!(mc->verdicts & (1u << (v->verdict & 31))) || !(mc->reasons & (1u << (v->reason & 31))))
        return;
    if ((mc->tenant && mc->tenant != tenant) || (mc->port && mc->port != port))
        return;
    __u32 zero = 0;
    struct xf_mon_cpu *mb = xf_mon_cpu.lookup(&zero);
    if (!mb)
        return;
    __u64 now = bpf_ktime_get_ns();
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
    e->ts_ns = now;
    e->rule_id = v->rule_id;
    e->len = bytes;
    e->out_ifindex = v->out_ifindex;
    e->tenant = tenant;
    e->port = port;
    e->out_port = v->out_port;
    e->verdict = v->verdict;
    e->reason = v->reason;
    e->flow_hit = v->flow_hit;
    e->pad = 0;
    /* 1..XF_EVENT_BYTES by arithmetic the verifier follows (XF_EVENT_BYTES is a power
     * of two; frames are never empty): clang turns range checks into tests on a copy. */
    __u64 n = bytes < XF_EVENT_BYTES ? bytes : XF_EVENT_BYTES;
    n = ((n - 1) & (XF_EVENT_BYTES - 1)) + 1;
    if (bpf_xdp_load_bytes(ctx, 0, e->data, n))
        n = 0;
    e->cap_len = n;
    xf_events.ringbuf_submit(e, 0);
    mb->sent++;
}
#endif

/* Count the packet, tell a listening monitor, and return its XDP action. Every exit goes
 * through here (by the macro below, which passes the caller's ctx). */
static __always_inline int xf_finish_ctx(struct xdp_md *ctx, __u16 tenant, __u16 port,
                                         struct xf_verdict *v, __u64 bytes, int action)
{
    xf_count(tenant, port, v->verdict, v->reason, bytes);
#if !defined(XF_TRACE) && !defined(XF_NO_MONITOR)   /* the latter: a benchmark's baseline */
    /* With no listener, this read is all the monitor costs. */
    __u32 mzero = 0;
    struct xf_mon_cfg *mc = xf_mon.lookup(&mzero);
    if (mc && mc->listeners)
        xf_monitor(ctx, mc, tenant, port, v, bytes);
#endif
#ifdef XF_TRACE
    __u32 zero = 0;
    struct xf_trace *t = xf_trace_rec.lookup(&zero);
    if (t) {
        t->tenant = tenant;
        t->rule_id = v->rule_id;
        t->out_ifindex = v->out_ifindex;
        t->out_port = v->out_port;
        t->in_port = port;
        t->verdict = v->verdict;
        t->reason = v->reason;
        t->flow_hit = v->flow_hit;
        t->stale = v->stale;
    }
#endif
    return action;
}
#define xf_finish(tenant, port, v, bytes, action) \
    xf_finish_ctx(ctx, tenant, port, v, bytes, action)

static __always_inline int xf_verdict_action(__u8 verdict)
{
    return verdict == XF_V_PASS ? XDP_PASS : XDP_DROP;
}

/* The reply direction of a flow key: addresses and ports swapped; an ICMP echo request
 * becomes its reply and back. Returns 0 when the protocol has no reply direction. */
static __always_inline int xf_reverse_key(struct xf_flow_key *in, struct xf_flow_key *out)
{
    out->tenant = in->tenant;
    out->proto = in->proto;
    out->pad = 0;
    __builtin_memcpy(out->src, in->dst, 16);
    __builtin_memcpy(out->dst, in->src, 16);
    if (in->proto == XF_IPPROTO_TCP || in->proto == XF_IPPROTO_UDP) {
        out->sport = in->dport;
        out->dport = in->sport;
        return 1;
    }
    out->sport = in->sport;             /* the echo id */
    __u8 type = in->dport >> 8;
    if (in->proto == XF_IPPROTO_ICMP && (type == 8 || type == 0)) {
        out->dport = (type == 8 ? 0 : 8) << 8;
        return 1;
    }
    if (in->proto == XF_IPPROTO_ICMPV6 && (type == 128 || type == 129)) {
        out->dport = (type == 128 ? 129 : 128) << 8;
        return 1;
    }
    out->dport = in->dport;
    return 0;
}

/* Tuple-space search: one exact-match lookup per mask of the tenant's generation, masks
 * ordered by the best rank they hold, stopping once nothing left can win. The best match
 * is kept as scalars, not a map pointer: far fewer verifier states. Returns its action,
 * or 0 when no rule matches. */
struct xf_match {
    __u32 rank;
    __u32 rule_id;
    __u8  action;
};

static __always_inline __u8 xf_classify(__u16 tenant, __u32 gen, struct xf_flow_key *fk,
                                        __u16 in_port, struct xf_match *best)
{
    best->rank = 0;
    best->rule_id = 0;
    best->action = 0;
    struct xf_mask_key mk = {};
    mk.tenant = tenant;
    mk.generation = gen;
    struct xf_mask_set *ms = xf_masks.lookup(&mk);
    if (!ms)
        return 0;
    /* ICMP rules see type and code, not the echo id. */
    __u16 sport = (fk->proto == XF_IPPROTO_ICMP || fk->proto == XF_IPPROTO_ICMPV6) ? 0 : fk->sport;
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
        if (best->rank > m->max_rank)
            break;
        k.mask_idx = idx;
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
            best->action = r->action;
        }
    }
    return best->action;
}

/* Where a destination goes: fills *f (verdict, output, MACs) and returns the reason. */
static __always_inline __u8 xf_route(__u16 tenant, __u32 *dst, struct xf_flow *f)
{
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
        if (!rt) {
            f->verdict = XF_V_DROP;
            return XF_R_NO_ROUTE;
        }
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
    f->verdict = XF_V_REDIRECT;
    f->out_ifindex = ep->ifindex;
    f->out_port = ep->port;
    __builtin_memcpy(f->dmac, ep->mac, 6);
    __builtin_memcpy(f->smac, ep->port_mac, 6);
    return XF_R_RULE_ALLOW;
}

static __always_inline int xf_insert(struct xf_flow_key *k, struct xf_flow *f, __u16 tenant,
                                     __u16 port)
{
#ifndef XF_TRACE
    if (xf_flows.update(k, f)) {
        xf_count(tenant, port, XF_V_NONE, XF_R_INSERT_FAILED, 0);
        return -1;
    }
#endif
    return 0;
}

/* Act on a flow's flattened result. */
static __always_inline int xf_act(struct xdp_md *ctx, struct xf_pkt *p, struct xf_flow *f)
{
    if (f->verdict != XF_V_REDIRECT)
        return xf_verdict_action(f->verdict);
    void *data = (void *)(long)ctx->data;
    void *data_end = (void *)(long)ctx->data_end;
    struct ethhdr *eth = data;
    if ((void *)(eth + 1) > data_end)
        return XDP_DROP;
    __builtin_memcpy(eth->h_dest, f->dmac, 6);
    __builtin_memcpy(eth->h_source, f->smac, 6);
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
    return bpf_redirect(f->out_ifindex, 0);
}

static __always_inline int xf_is_multicast(struct xf_pkt *p)
{
    __u8 *d = (__u8 *)p->dst;
    if (p->family == 6)
        return d[0] == 0xff;
    return (d[12] & 0xf0) == 0xe0 || p->dst[3] == 0xffffffff;
}

int xdpflow_port(struct xdp_md *ctx)
{
    void *data = (void *)(long)ctx->data;
    void *data_end = (void *)(long)ctx->data_end;
    __u64 len = data_end - data;
    struct xf_verdict v = {};
    __u32 ifindex = ctx->ingress_ifindex;

    struct xf_port *port;
    if (ifindex < XF_PORT_INDEX) {
        port = xf_port_index.lookup(&ifindex);
        if (port && !port->slot)
            port = NULL;            /* an empty array row */
    } else {
        port = xf_ports.lookup(&ifindex);
    }
    if (!port) {
        /* A store the compiler must keep: builds with different XF_BUILD_ID values are
         * different programs (upgrade tests replace one with the other). */
        volatile __u32 build_id = XF_BUILD_ID;
        (void)build_id;
        v.verdict = XF_V_PASS;
        v.reason = XF_R_NO_PORT;
        return xf_finish(0, 0, &v, len, XDP_PASS);
    }
    __u16 tenant = port->tenant;
    __u16 slot = port->slot;
    __u32 tid = tenant;
    struct xf_tenant *t = xf_tenants.lookup(&tid);
    if (!t || t->generation == 0) {
        v.verdict = XF_V_PASS;
        v.reason = XF_R_NO_TENANT;
        return xf_finish(tenant, slot, &v, len, XDP_PASS);
    }
    __u32 gen = t->generation;
    v.verdict = t->default_verdict == XF_V_PASS ? XF_V_PASS : XF_V_DROP;
    int dflt = xf_verdict_action(v.verdict);

    struct xf_pkt p = {};
    int err = xf_parse(ctx, &p);
    if (err) {
        v.reason = err;
        return xf_finish(tenant, slot, &v, len, dflt);
    }

    if (p.family == 0 && p.eth_proto != ETH_P_ARP_BE) {
        v.reason = XF_R_NOT_IP;
        return xf_finish(tenant, slot, &v, len, dflt);
    }

    /* Neighbour discovery: answered here (ARP request, neighbour solicitation), handed
     * to the kernel (for the node's own addresses), or the tenant default. */
    int is_arp = p.family == 0;
    if (is_arp || (p.proto == XF_IPPROTO_ICMPV6 && p.icmp_type >= 133 && p.icmp_type <= 137)) {
        int rc = is_arp ? xf_arp_reply(ctx, &p, port)
                        : (p.icmp_type == 135 ? xf_nd_reply(ctx, &p, port) : -1);
        if (rc == XDP_TX) {
            v.verdict = XF_V_TX;
            v.reason = is_arp ? XF_R_ARP_REPLY : XF_R_ND_REPLY;
        } else if (rc == XDP_PASS) {
            v.verdict = XF_V_PASS;
            v.reason = XF_R_LOCAL;
        } else {
            v.reason = is_arp ? XF_R_ARP_OTHER : XF_R_ND_OTHER;
            rc = dflt;
        }
        return xf_finish(tenant, slot, &v, len, rc);
    }

    if (xf_is_multicast(&p)) {
        v.reason = XF_R_MULTICAST;
        return xf_finish(tenant, slot, &v, len, dflt);
    }

    /* The kernel sends time-exceeded exactly as it would without offload. */
    if (p.ttl <= 1) {
        v.verdict = XF_V_PASS;
        v.reason = XF_R_TTL;
        return xf_finish(tenant, slot, &v, len, XDP_PASS);
    }

    /* Later fragments take the ports their first fragment left. */
    if (p.frag != XF_FRAG_NONE) {
        struct xf_frag_key frk = {};
        frk.tenant = tenant;
        frk.proto = p.proto;
        frk.id = p.frag_id;
        __builtin_memcpy(frk.src, p.src, 16);
        __builtin_memcpy(frk.dst, p.dst, 16);
        if (p.frag == XF_FRAG_LATER) {
            struct xf_frag *fr = xf_frags.lookup(&frk);
            if (!fr) {
                v.reason = XF_R_FRAG;
                return xf_finish(tenant, slot, &v, len, dflt);
            }
            p.sport = fr->sport;
            p.dport = fr->dport;
        } else {
#ifndef XF_TRACE
            struct xf_frag fr = {};
            fr.sport = p.sport;
            fr.dport = p.dport;
            xf_frags.update(&frk, &fr);
#endif
        }
    }

    struct xf_flow_key fk = {};
    fk.tenant = tenant;
    fk.proto = p.proto;
    __builtin_memcpy(fk.src, p.src, 16);
    __builtin_memcpy(fk.dst, p.dst, 16);
    fk.sport = p.sport;
    fk.dport = p.dport;

    struct xf_flow *f = xf_flows.lookup(&fk);

    /* An ICMP error about a flow in the table (port unreachable, too big, time exceeded
     * further on) is that flow's business: it takes the path of the flow's replies back
     * to the flow's sender, as conntrack's RELATED does, whatever the rules say about
     * ICMP. It is not cached. (Rare: the keys use the scratch row, not the stack.) */
    int related = 0;
    if (!f && xf_icmp_is_error(&p)) {
        __u32 zero = 0;
        struct xf_scratch *qs = xf_scratch.lookup(&zero);
        if (qs) {
            __builtin_memset(&qs->ck, 0, sizeof(qs->ck));
            if (xf_parse_quoted(ctx, &p, &qs->ck) == 0) {
                qs->ck.tenant = tenant;
                struct xf_flow *orig = xf_flows.lookup(&qs->ck);
                if (orig && orig->generation == gen && xf_reverse_key(&qs->ck, &qs->rk)) {
                    f = xf_flows.lookup(&qs->rk);
                    related = f != NULL;
                }
            }
        }
        if (related && !(f->generation == gen && f->in_port == slot &&
                         f->verdict == XF_V_REDIRECT)) {
            f = NULL;
            related = 0;
        }
    }

    /* A hit must be of the current generation and come from the port the flow was judged
     * for: the same tuple from another port of the tenant (a spoofing VM, or an in_port
     * rule) is judged again. */
    if (f && f->generation == gen && f->in_port == slot) {
        v.flow_hit = 1;
        v.verdict = f->verdict;
        v.reason = related ? XF_R_RELATED : XF_R_FLOW;
        v.rule_id = f->rule_id;
        v.out_ifindex = f->out_ifindex;
        v.out_port = f->out_port;
#ifndef XF_TRACE
        __sync_fetch_and_add(&f->packets, 1);
        __sync_fetch_and_add(&f->bytes, len);
        f->last_seen_ns = bpf_ktime_get_coarse_ns();
        if (p.tcp_flags & ~f->tcp_flags) {
            f->tcp_flags |= p.tcp_flags;
            if (p.tcp_flags & (TCP_FIN | TCP_RST))
                f->flags |= XF_FLOW_CLOSING;
        }
#endif
        return xf_finish(tenant, slot, &v, len, xf_act(ctx, &p, f));
    }

    /* Miss, or a flow made under an older rule set: classify again. (A current flow
     * judged for another port is a plain miss for this one.) */
    int stale = f && f->generation != gen;
    if (stale) {
        v.stale = 1;
        xf_count(tenant, slot, XF_V_NONE, XF_R_FLOW_STALE, 0);
    }

    /* A stale reply entry: its connection lives on if the new rules still allow the
     * forward direction, so judge that first; otherwise judge the packet on its own. */
    /* The slow path's working set lives in a per-CPU scratch row: on the stack it would
     * not fit the verifier's 512 bytes next to the parser's and the classifier's. */
    __u32 zero = 0;
    struct xf_scratch *sc = xf_scratch.lookup(&zero);
    if (!sc) {
        v.reason = XF_R_DEFAULT;
        return xf_finish(tenant, slot, &v, len, dflt);
    }
    __u16 c_in_port = slot;
    int as_reply = 0;
    if (stale && (f->flags & XF_FLOW_REVERSE) && xf_reverse_key(&fk, &sc->ck)) {
        as_reply = 1;
        c_in_port = f->out_port;
    } else {
        sc->ck = fk;
    }

    __u64 now = bpf_ktime_get_coarse_ns();
    __u8 rreason = 0, action = 0;
    struct xf_match r = {};
    /* At most two judgements, one copy of the code (the verifier walks the classifier
     * once per copy): a stale reply's forward direction, then the packet on its own. */
#pragma nounroll
    for (int attempt = 0; attempt < 2; attempt++) {
        __builtin_memset(&sc->nf, 0, sizeof(sc->nf));
        sc->nf.generation = gen;
        sc->nf.created_ns = now;
        sc->nf.last_seen_ns = now;
        /* Addressed to the node itself: the kernel's, before any security rule. */
        rreason = xf_route(tenant, sc->ck.dst, &sc->nf);
        if (rreason == XF_R_LOCAL && !as_reply) {
            sc->nf.reason = XF_R_LOCAL;
            sc->nf.in_port = slot;
            sc->nf.packets = 1;
            sc->nf.bytes = len;
            xf_insert(&fk, &sc->nf, tenant, slot);
            v.verdict = XF_V_PASS;
            v.reason = XF_R_LOCAL;
            return xf_finish(tenant, slot, &v, len, XDP_PASS);
        }
        action = xf_classify(tenant, gen, &sc->ck, c_in_port, &r);
        if (!as_reply || (action == XF_A_ALLOW && sc->nf.verdict == XF_V_REDIRECT))
            break;
        /* The forward direction is no longer allowed and forwarded: the packet is new
         * traffic. */
        as_reply = 0;
        sc->ck = fk;
        c_in_port = slot;
    }

    if (!action) {
        v.reason = XF_R_DEFAULT;
        return xf_finish(tenant, slot, &v, len, dflt);
    }
    v.rule_id = r.rule_id;
#ifndef XF_TRACE
    {
        __u32 rid = r.rule_id;
        struct xf_rule_stat *rs = xf_rule_hits.lookup(&rid);
        if (rs) {
            rs->hits += 1;
            rs->last_hit_ns = now;
        } else {
            struct xf_rule_stat one = {.hits = 1, .last_hit_ns = now};
            xf_rule_hits.update(&rid, &one);
        }
    }
#endif
    if (action == XF_A_DENY) {
        v.verdict = XF_V_DROP;
        v.reason = XF_R_RULE_DENY;
        return xf_finish(tenant, slot, &v, len, XDP_DROP);
    }

    sc->nf.rule_id = r.rule_id;
    sc->nf.in_port = c_in_port;
    if (action == XF_A_PASS) {
        sc->nf.verdict = XF_V_PASS;
        sc->nf.out_ifindex = 0;
        sc->nf.out_port = 0;
        rreason = XF_R_RULE_PASS;
    } else if (sc->nf.verdict == XF_V_DROP) {
        /* Allowed, but nowhere to go: not cached, so a new endpoint or route takes
         * effect without waiting for the flow to age. */
        v.verdict = XF_V_DROP;
        v.reason = rreason;
        return xf_finish(tenant, slot, &v, len, XDP_DROP);
    }
    sc->nf.reason = rreason;

    /* Stateful: the reply direction is installed with the forward one (redirects only;
     * what goes to the kernel comes back through the kernel). */
    __builtin_memset(&sc->rf, 0, sizeof(sc->rf));
    int have_rev = 0;
    if (sc->nf.verdict == XF_V_REDIRECT && action == XF_A_ALLOW &&
        xf_reverse_key(&sc->ck, &sc->rk)) {
        sc->rf.generation = gen;
        sc->rf.created_ns = now;
        sc->rf.last_seen_ns = now;
        sc->rf.rule_id = r.rule_id;
        sc->rf.flags = XF_FLOW_REVERSE;
        sc->rf.in_port = sc->nf.out_port;
        if (xf_route(tenant, sc->rk.dst, &sc->rf) == XF_R_RULE_ALLOW)
            have_rev = 1;
        sc->rf.reason = XF_R_RULE_ALLOW;
    }

    /* The packet's own direction carries its first count. */
    __u8 tflags = 0;
    if (p.proto == XF_IPPROTO_TCP)
        tflags = p.tcp_flags;
    __u8 fclose = (tflags & (TCP_FIN | TCP_RST)) ? XF_FLOW_CLOSING : 0;
    if (as_reply) {
        sc->rf.packets = 1;
        sc->rf.bytes = len;
        sc->rf.tcp_flags = tflags;
        sc->rf.flags |= fclose;
    } else {
        sc->nf.packets = 1;
        sc->nf.bytes = len;
        sc->nf.tcp_flags = tflags;
        sc->nf.flags |= fclose;
    }
    xf_insert(&sc->ck, &sc->nf, tenant, slot);
    if (have_rev)
        xf_insert(&sc->rk, &sc->rf, tenant, slot);

    if (as_reply && !have_rev) {
        v.verdict = XF_V_DROP;
        v.reason = XF_R_NO_ROUTE;
        return xf_finish(tenant, slot, &v, len, XDP_DROP);
    }
    if (as_reply) {
        v.verdict = sc->rf.verdict;
        v.reason = XF_R_RULE_ALLOW;
        v.out_ifindex = sc->rf.out_ifindex;
        v.out_port = sc->rf.out_port;
        return xf_finish(tenant, slot, &v, len, xf_act(ctx, &p, &sc->rf));
    }
    v.verdict = sc->nf.verdict;
    v.reason = sc->nf.reason;
    v.out_ifindex = sc->nf.out_ifindex;
    v.out_port = sc->nf.out_port;
    return xf_finish(tenant, slot, &v, len, xf_act(ctx, &p, &sc->nf));
}
