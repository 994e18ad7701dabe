/* xdpflow datapath: proxy ARP and IPv6 neighbour advertisements. A VM asking for any
 * address its tenant knows (an endpoint, a route, a next hop) is answered with the port's
 * MAC, as OVN's ARP responder does, so VMs need no help from the kernel. The asker's own
 * address, gratuitous ARP and duplicate-address detection are never answered.
 * Needs xf_tenant_knows() and xf_src_ok() from the program file (BCC rewrites map calls
 * there only).
 * The functions return XDP_TX with the reply written in place, XDP_PASS (untouched) when
 * the address is the node's own, or -1 when the datapath does not answer. */
#pragma once

/* struct arphdr of linux/if_arp.h stops before the addresses (their sizes vary with the
 * hardware and protocol); Ethernet + IPv4 ARP spelled out. */
struct xf_arp {
    __be16 htype;
    __be16 ptype;
    __u8   hlen;
    __u8   plen;
    __be16 op;
    __u8   sha[6];
    __be32 spa;
    __u8   tha[6];
    __be32 tpa;
} __attribute__((packed));

/* Port security for ARP: the sender's hardware address is the frame's, and its protocol
 * address one the port may send from (0.0.0.0, a probe, claims none). */
static __always_inline int xf_arp_src_ok(struct xdp_md *ctx, struct xf_pkt *p, __u16 tenant,
                                         __u16 slot)
{
    void *data = (void *)(long)ctx->data;
    void *data_end = (void *)(long)ctx->data_end;
    struct xf_arp *arp = data + (p->l3_off & 0x3f);
    if ((void *)(arp + 1) > data_end || !xf_mac_eq(arp->sha, p->smac))
        return 0;
    __u32 addr[4] = {0, 0, bpf_htonl(0xffff), arp->spa};
    return arp->spa == 0 || xf_src_ok(tenant, slot, p->smac, addr);
}

/* Port security for neighbour discovery: the source address (the unspecified address
 * only for solicitations: duplicate-address detection), an advertisement's target (the
 * address it speaks for), and a first source/target link-layer address option, which
 * must be the frame's MAC. */
static __always_inline int xf_nd_src_ok(struct xdp_md *ctx, struct xf_pkt *p, __u16 tenant,
                                        __u16 slot)
{
    void *data = (void *)(long)ctx->data;
    void *data_end = (void *)(long)ctx->data_end;
    __u8 type = p->icmp_type;
    int unspec = !(p->src[0] | p->src[1] | p->src[2] | p->src[3]);
    if (unspec ? (type != NDISC_NEIGHBOUR_SOLICITATION && type != NDISC_ROUTER_SOLICITATION)
               : !xf_src_ok(tenant, slot, p->smac, p->src))
        return 0;
    if (p->l4_off > XF_MAX_IPV6_EXT_BYTES)
        return 0;
    __u32 off = p->l4_off;
    XF_BOUND(off, 0xfff);
    if (type != NDISC_NEIGHBOUR_SOLICITATION && type != NDISC_NEIGHBOUR_ADVERTISEMENT)
        return 1;
    struct nd_msg *m = data + off;
    if ((void *)(m + 1) > data_end)
        return 1;                   /* no target: nothing more to check */
    if (type == NDISC_NEIGHBOUR_ADVERTISEMENT &&
        !xf_src_ok(tenant, slot, p->smac, (__u32 *)&m->target))
        return 0;
    struct xf_nd_lladdr {
        struct nd_opt_hdr hdr;
        __u8 addr[ETH_ALEN];
    } *o = (void *)(m + 1);
    if ((void *)(o + 1) > data_end || o->hdr.nd_opt_len != 1 ||
        (o->hdr.nd_opt_type != ND_OPT_SOURCE_LL_ADDR && o->hdr.nd_opt_type != ND_OPT_TARGET_LL_ADDR))
        return 1;
    return xf_mac_eq(o->addr, p->smac);
}

/* An Ethernet/IPv4 ARP request worth answering: not gratuitous ARP, not a probe
 * (duplicate-address detection). */
static __always_inline int xf_arp_is_request(struct xf_arp *arp)
{
    return arp->htype == bpf_htons(ARPHRD_ETHER) && arp->ptype == bpf_htons(ETH_P_IP) &&
           arp->hlen == ETH_ALEN && arp->plen == 4 && arp->op == bpf_htons(ARPOP_REQUEST) &&
           arp->tpa != arp->spa && arp->spa != 0;
}

/* Turn the request into its reply in place: `mac` has the asked-for address. */
static __always_inline void xf_arp_write_reply(struct ethhdr *eth, struct xf_arp *arp,
                                               __u8 *mac)
{
    __be32 tpa = arp->tpa, spa = arp->spa;
    __u8 asker[6];
    __builtin_memcpy(asker, arp->sha, 6);
    arp->op = bpf_htons(ARPOP_REPLY);
    __builtin_memcpy(arp->tha, asker, 6);
    arp->tpa = spa;
    __builtin_memcpy(arp->sha, mac, 6);
    arp->spa = tpa;
    __builtin_memcpy(eth->h_dest, asker, 6);
    __builtin_memcpy(eth->h_source, mac, 6);
}

/* Returns XDP_TX with the reply written in place, or -1 when not answered. */
static __always_inline int xf_arp_reply(struct xdp_md *ctx, struct xf_pkt *p,
                                        struct xf_port *port)
{
    void *data = (void *)(long)ctx->data;
    void *data_end = (void *)(long)ctx->data_end;
    struct ethhdr *eth = data;
    __u32 off = p->l3_off & 0x3f;
    struct xf_arp *arp = data + off;
    if ((void *)(arp + 1) > data_end || (void *)(eth + 1) > data_end)
        return -1;
    if (!xf_arp_is_request(arp))
        return -1;
    __u32 addr[4] = {0, 0, bpf_htonl(0xffff), arp->tpa};
    int who = xf_tenant_knows(port->tenant, port->slot, addr);
    if (who == XF_NB_KERNEL)
        return XDP_PASS;
    if (who != XF_NB_DATAPATH)
        return -1;
    xf_arp_write_reply(eth, arp, port->mac);
    return XDP_TX;
}

/* A neighbour advertisement as sent here: the message and one target link-layer address
 * option (RFC 4861 4.4, 4.6.1). */
struct xf_nd_advert {
    struct nd_msg msg;               /* ICMPv6 header and target (net/ndisc.h) */
    struct nd_opt_hdr opt;           /* ND_OPT_TARGET_LL_ADDR, length 1 (8 bytes) */
    __u8 lladdr[ETH_ALEN];
};

#define XF_ND_LEN (sizeof(struct ipv6hdr) + sizeof(struct xf_nd_advert))

/* Answers a neighbour solicitation with a neighbour advertisement (Router, Solicited,
 * Override) carrying the port's MAC. Returns XDP_TX, or -1 when not answered. */
static __always_inline int xf_nd_reply(struct xdp_md *ctx, struct xf_pkt *p,
                                       struct xf_port *port)
{
    void *data = (void *)(long)ctx->data;
    void *data_end = (void *)(long)ctx->data_end;
    __u32 off = p->l3_off & 0x3f;
    struct ipv6hdr *ip6 = data + off;
    struct nd_msg *ns = (void *)(ip6 + 1);
    if ((void *)(ns + 1) > data_end)
        return -1;
    /* RFC 4861 7.1.1: hop limit 255, code 0, no extension headers in front of it here. */
    if (ip6->nexthdr != IPPROTO_ICMPV6 || ns->icmph.icmp6_type != NDISC_NEIGHBOUR_SOLICITATION ||
        ns->icmph.icmp6_code != 0 || ip6->hop_limit != 255)
        return -1;
    __u32 src0 = ip6->saddr.in6_u.u6_addr32[0] | ip6->saddr.in6_u.u6_addr32[1] |
                 ip6->saddr.in6_u.u6_addr32[2] | ip6->saddr.in6_u.u6_addr32[3];
    if (src0 == 0)                      /* duplicate-address detection */
        return -1;
    __u32 target[4];
    __builtin_memcpy(target, &ns->target, 16);
    int who = xf_tenant_knows(port->tenant, port->slot, target);
    if (who == XF_NB_KERNEL)
        return XDP_PASS;
    if (who != XF_NB_DATAPATH)
        return -1;

    /* Resize to exactly the advertisement. */
    int want = (int)off + XF_ND_LEN;    /* off already counts Ethernet and any tags */
    int delta = want - (int)(data_end - data);
    if (delta && bpf_xdp_adjust_tail(ctx, delta))
        return -1;
    data = (void *)(long)ctx->data;
    data_end = (void *)(long)ctx->data_end;
    struct ethhdr *eth = data;
    ip6 = data + off;
    struct xf_nd_advert *na = (void *)(ip6 + 1);
    if ((void *)(na + 1) > data_end || (void *)(eth + 1) > data_end)
        return -1;

    __builtin_memcpy(eth->h_dest, eth->h_source, ETH_ALEN);
    __builtin_memcpy(eth->h_source, port->mac, ETH_ALEN);
    ip6->payload_len = bpf_htons(sizeof(*na));
    ip6->hop_limit = 255;
    __builtin_memcpy(&ip6->daddr, &ip6->saddr, 16);
    __builtin_memcpy(&ip6->saddr, target, 16);
    __builtin_memset(&na->msg.icmph, 0, sizeof(na->msg.icmph));
    na->msg.icmph.icmp6_type = NDISC_NEIGHBOUR_ADVERTISEMENT;
    na->msg.icmph.icmp6_router = 1;
    na->msg.icmph.icmp6_solicited = 1;
    na->msg.icmph.icmp6_override = 1;
    /* the target stays where the solicitation had it */
    na->opt.nd_opt_type = ND_OPT_TARGET_LL_ADDR;
    na->opt.nd_opt_len = 1;             /* in units of 8 bytes */
    __builtin_memcpy(na->lladdr, port->mac, ETH_ALEN);

    /* Checksum over the pseudo-header (addresses, length, next header) and the message. */
    __u32 sum = sizeof(*na) + IPPROTO_ICMPV6;
    __u16 *w = (__u16 *)&ip6->saddr;
#pragma unroll
    for (int i = 0; i < 16; i++)
        sum += bpf_ntohs(w[i]);
    w = (__u16 *)na;
#pragma unroll
    for (int i = 0; i < sizeof(*na) / 2; i++)
        sum += bpf_ntohs(w[i]);
    na->msg.icmph.icmp6_cksum = bpf_htons(xf_csum_fold(sum));
    return XDP_TX;
}
