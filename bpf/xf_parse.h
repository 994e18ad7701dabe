/* xdpflow datapath: the one packet parser.
 *
 * Contract: xf_parse() reads Ethernet, up to XF_MAX_VLAN_DEPTH VLAN tags, then ARP, IPv4
 * (options, fragments) or IPv6 (up to XF_MAX_IPV6_EXT extension headers), then TCP, UDP,
 * ICMP or ICMPv6. Every read is bounds-checked against data_end; nothing is written.
 * It returns 0 and fills *p, or an XF_R_PARSE_* reason when the packet does not parse.
 * Addresses are copied in network order (IPv4 mapped into ::ffff:0:0/96); ports, ids and
 * lengths are converted to host order. A later fragment has no L4 header: p->frag says so
 * and the ports are left 0 for the fragment table to fill. p->vlan_depth counts the tags
 * seen, also when the packet then fails to parse. */
#pragma once

/* Fragment fields. IPv4 frag_off (host order after bpf_ntohs):
 *
 *    15  14  13  12                                  0
 *   +---+---+---+-------------------------------------+
 *   | 0 |DF |MF |   fragment offset (8-byte units)     |   IP_MF, IP_OFFSET (net/ip.h)
 *   +---+---+---+-------------------------------------+
 *
 * IPv6 fragment header frag_off (struct frag_hdr, host order after bpf_ntohs):
 *
 *    15                                      3   2   1   0
 *   +------------------------------------------+-------+---+
 *   |   fragment offset (8-byte units)          |  res  |M  |  IP6_OFFSET, IP6_MF (net/ipv6.h)
 *   +------------------------------------------+-------+---+
 */

/* Mask a value in its register where clang cannot drop the mask as redundant: the
 * verifier needs the bound on the very register that indexes the packet. */
#define XF_BOUND(v, mask) asm volatile("%0 &= " #mask : "+r"(v))

struct xf_vlan_hdr {
    __be16 tci;
    __be16 proto;
};

struct xf_pkt {
    __u32 src[4];
    __u32 dst[4];
    __u32 frag_id;
    __u32 icmp_mtu;        /* frag needed / packet too big: the MTU it reports */
    __u16 l3_off;          /* offset of the ARP / IP header */
    __u16 l4_off;          /* offset of the L4 header (when present) */
    __u16 sport;           /* host order; ICMP echo: the id */
    __u16 dport;           /* host order; ICMP: type << 8 | code */
    __be16 eth_proto;      /* network order, after the tags */
    __u8  vlan_depth;
    __u8  family;          /* 4, 6, or 0 for non-IP */
    __u8  proto;
    __u8  ttl;             /* TTL / hop limit */
    __u8  tcp_flags;
    __u8  frag;            /* XF_FRAG_* */
    __u8  icmp_type;
    __u8  icmp_code;
    __u8  smac[ETH_ALEN];  /* the frame's source MAC */
    __u8  frag_proto;      /* the protocol a fragment header names (IPv4: the protocol) */
    __u8  pad;
};

static __always_inline int xf_is_vlan(__be16 proto)
{
    return proto == bpf_htons(ETH_P_8021Q) || proto == bpf_htons(ETH_P_8021AD);
}

static __always_inline int xf_is_ipv6_ext(__u8 nh)
{
    return nh == IPPROTO_HOPOPTS || nh == IPPROTO_ROUTING || nh == IPPROTO_DSTOPTS ||
           nh == IPPROTO_FRAGMENT || nh == IPPROTO_AH;
}

static __always_inline int xf_is_icmp_echo(__u8 proto, __u8 type)
{
    if (proto == IPPROTO_ICMP)
        return type == ICMP_ECHO || type == ICMP_ECHOREPLY;
    if (proto == IPPROTO_ICMPV6)
        return type == ICMPV6_ECHO_REQUEST || type == ICMPV6_ECHO_REPLY;
    return 0;
}

static __always_inline int xf_parse_l4(struct xf_pkt *p, void *l4, void *l3_end, void *data_end)
{
    if (p->proto == IPPROTO_TCP) {
        struct tcphdr *th = l4;
        if ((void *)(th + 1) > data_end || (void *)(th + 1) > l3_end)
            return XF_R_PARSE_L4;
        if (th->doff < 5 || l4 + th->doff * 4 > l3_end)
            return XF_R_PARSE_L4;
        p->sport = bpf_ntohs(th->source);
        p->dport = bpf_ntohs(th->dest);
        p->tcp_flags = tcp_flag_byte(th);
    } else if (p->proto == IPPROTO_UDP) {
        struct udphdr *uh = l4;
        if ((void *)(uh + 1) > data_end || (void *)(uh + 1) > l3_end)
            return XF_R_PARSE_L4;
        __u16 ulen = bpf_ntohs(uh->len);
        /* A first fragment's UDP length covers the whole datagram, not this packet. */
        if (ulen < sizeof(*uh) || (p->frag == XF_FRAG_NONE && l4 + ulen > l3_end))
            return XF_R_PARSE_L4;
        p->sport = bpf_ntohs(uh->source);
        p->dport = bpf_ntohs(uh->dest);
    } else if (p->proto == IPPROTO_ICMP || p->proto == IPPROTO_ICMPV6) {
        /* struct icmphdr and struct icmp6hdr share this layout: type, code, checksum,
         * then the echo id. */
        struct icmphdr *ih = l4;
        if ((void *)(ih + 1) > data_end || (void *)(ih + 1) > l3_end)
            return XF_R_PARSE_L4;
        p->icmp_type = ih->type;
        p->icmp_code = ih->code;
        p->dport = ((__u16)ih->type << 8) | ih->code;
        /* Echo request/reply carry an id: the flow is (addresses, id). */
        if (xf_is_icmp_echo(p->proto, ih->type))
            p->sport = bpf_ntohs(ih->un.echo.id);
        if (p->proto == IPPROTO_ICMP)
            p->icmp_mtu = bpf_ntohs(ih->un.frag.mtu);
        else
            p->icmp_mtu = bpf_ntohl(((struct icmp6hdr *)ih)->icmp6_mtu);
    }
    return 0;
}

/* Is this ICMP / ICMPv6 message an error that quotes the packet that caused it
 * (destination unreachable, time exceeded, parameter problem; packet too big)? */
static __always_inline int xf_icmp_is_error(struct xf_pkt *p)
{
    if (p->proto == IPPROTO_ICMP)
        return p->icmp_type == ICMP_DEST_UNREACH || p->icmp_type == ICMP_TIME_EXCEEDED ||
               p->icmp_type == ICMP_PARAMETERPROB;
    if (p->proto == IPPROTO_ICMPV6)
        return p->icmp_type >= ICMPV6_DEST_UNREACH && p->icmp_type <= ICMPV6_PARAMPROB;
    return 0;
}

/* The quoted packet of an ICMP error: its addresses, protocol and ports (or echo id and
 * type) into *q, keyed as the flow table keys it (q->tenant is left to the caller).
 * Only an IPv4 header with options or a bare IPv6 header is followed. Returns 0 or -1. */
static __always_inline int xf_parse_quoted(struct xdp_md *ctx, struct xf_pkt *p,
                                           struct xf_flow_key *q)
{
    void *data = (void *)(long)ctx->data;
    void *data_end = (void *)(long)ctx->data_end;
    if (p->l4_off > XF_MAX_IPV6_EXT_BYTES)
        return -1;
    __u32 off = p->l4_off;
    XF_BOUND(off, 0xfff);
    void *inner = data + off + sizeof(struct icmphdr);
    void *l4;
    if (p->family == 4) {
        struct iphdr *iph = inner;
        if ((void *)(iph + 1) > data_end || iph->version != 4 || iph->ihl < 5)
            return -1;
        q->src[0] = 0; q->src[1] = 0; q->src[2] = bpf_htonl(0xffff); q->src[3] = iph->saddr;
        q->dst[0] = 0; q->dst[1] = 0; q->dst[2] = bpf_htonl(0xffff); q->dst[3] = iph->daddr;
        q->proto = iph->protocol;
        l4 = inner + iph->ihl * 4;
    } else {
        struct ipv6hdr *ip6 = inner;
        if ((void *)(ip6 + 1) > data_end || ip6->version != 6)
            return -1;
        __builtin_memcpy(q->src, &ip6->saddr, 16);
        __builtin_memcpy(q->dst, &ip6->daddr, 16);
        q->proto = ip6->nexthdr;
        l4 = ip6 + 1;
    }
    /* An error quotes at least 8 bytes of L4: the ports of TCP and UDP (both begin
     * with source and destination port), or an ICMP header. */
    if (l4 + 8 > data_end)
        return -1;
    if (q->proto == IPPROTO_TCP || q->proto == IPPROTO_UDP) {
        struct udphdr *uh = l4;
        q->sport = bpf_ntohs(uh->source);
        q->dport = bpf_ntohs(uh->dest);
    } else if (q->proto == IPPROTO_ICMP || q->proto == IPPROTO_ICMPV6) {
        struct icmphdr *ih = l4;
        q->sport = bpf_ntohs(ih->un.echo.id);
        q->dport = ((__u16)ih->type << 8) | ih->code;
    } else {
        return -1;
    }
    return 0;
}

static __always_inline int xf_parse_ipv4(struct xf_pkt *p, void *data, void *cur,
                                         void *data_end)
{
    struct iphdr *iph = cur;
    if ((void *)(iph + 1) > data_end)
        return XF_R_PARSE_IPV4;
    if (iph->version != 4 || iph->ihl < 5)
        return XF_R_PARSE_IPV4;
    __u32 hlen = iph->ihl * 4;
    __u32 tot = bpf_ntohs(iph->tot_len);
    if (tot < hlen || cur + tot > data_end || cur + hlen > data_end)
        return XF_R_PARSE_IPV4;
    void *l3_end = cur + tot;
    p->family = 4;
    p->proto = iph->protocol;
    p->frag_proto = iph->protocol;
    p->ttl = iph->ttl;
    p->src[0] = 0; p->src[1] = 0; p->src[2] = bpf_htonl(0xffff); p->src[3] = iph->saddr;
    p->dst[0] = 0; p->dst[1] = 0; p->dst[2] = bpf_htonl(0xffff); p->dst[3] = iph->daddr;
    __u16 frag = bpf_ntohs(iph->frag_off);
    p->frag_id = bpf_ntohs(iph->id);
    if (frag & IP_OFFSET)
        p->frag = XF_FRAG_LATER;
    else if (frag & IP_MF)
        p->frag = XF_FRAG_FIRST;
    void *l4 = cur + hlen;
    p->l4_off = l4 - data;
    if (p->frag == XF_FRAG_LATER)
        return 0;
    return xf_parse_l4(p, l4, l3_end, data_end);
}

/* The length of one IPv6 extension header (RFC 8200 4; AH: RFC 4302 2.2). */
static __always_inline __u32 xf_ipv6_ext_len(__u8 nh, void *eh)
{
    if (nh == IPPROTO_FRAGMENT)
        return sizeof(struct frag_hdr);
    if (nh == IPPROTO_AH)
        return ((__u32)((struct ip_auth_hdr *)eh)->hdrlen + 2) * 4;
    return ((__u32)((struct ipv6_opt_hdr *)eh)->hdrlen + 1) * 8;
}

static __always_inline int xf_ipv6_is_v4mapped(const struct in6_addr *a)
{
    return (a->in6_u.u6_addr32[0] | a->in6_u.u6_addr32[1] |
            (a->in6_u.u6_addr32[2] ^ bpf_htonl(0x0000ffff))) == 0;
}

static __always_inline int xf_parse_ipv6(struct xf_pkt *p, void *data, void *cur,
                                         void *data_end)
{
    struct ipv6hdr *ip6 = cur;
    if ((void *)(ip6 + 1) > data_end)
        return XF_R_PARSE_IPV6;
    if (ip6->version != 6)
        return XF_R_PARSE_IPV6;
    __u32 plen = bpf_ntohs(ip6->payload_len);
    void *l3_end = (void *)(ip6 + 1) + plen;
    if (plen == 0 || l3_end > data_end)
        return XF_R_PARSE_IPV6;
    /* An IPv4-mapped address (::ffff:0:0/96) is how the datapath keys IPv4: an IPv6
     * packet carrying one would pass as the IPv4 endpoint's (port security, rules,
     * routes, flows of IPv4). It never belongs on the wire (RFC 4291 2.5.5.2): malformed.
     * (Found by the packet fuzzer, issue 14.) */
    if (xf_ipv6_is_v4mapped(&ip6->saddr) || xf_ipv6_is_v4mapped(&ip6->daddr))
        return XF_R_PARSE_IPV6;
    p->family = 6;
    p->ttl = ip6->hop_limit;
    __builtin_memcpy(p->src, &ip6->saddr, 16);
    __builtin_memcpy(p->dst, &ip6->daddr, 16);
    __u8 nh = ip6->nexthdr;
    /* The walk keeps a scalar offset, bounded each step, and derives the header
     * pointer from it: with a pointer carried from step to step every path through
     * the header kinds is a different verifier state (5^6 of them). */
    __u32 off = (void *)(ip6 + 1) - data;
    __u32 end_off = l3_end - data;

#pragma unroll
    for (int i = 0; i < XF_MAX_IPV6_EXT; i++) {
        if (!xf_is_ipv6_ext(nh))
            break;
        if (off > XF_MAX_IPV6_EXT_BYTES)
            return XF_R_PARSE_EXT;
        XF_BOUND(off, 0xfff);       /* no-op, but a bound the verifier keeps */
        struct ipv6_opt_hdr *eh = data + off;
        /* 8 bytes: the smallest extension header, and all of a fragment header. */
        if ((void *)eh + 8 > data_end || off + 8 > end_off)
            return XF_R_PARSE_EXT;
        if (nh == IPPROTO_FRAGMENT) {
            struct frag_hdr *fh = (void *)eh;
            __u16 fo = bpf_ntohs(fh->frag_off);
            p->frag_id = bpf_ntohl(fh->identification);
            p->frag_proto = fh->nexthdr;
            if (fo & IP6_OFFSET)
                p->frag = XF_FRAG_LATER;
            else if (fo & IP6_MF)
                p->frag = XF_FRAG_FIRST;
        }
        __u32 len = xf_ipv6_ext_len(nh, eh);
        nh = eh->nexthdr;
        off += len;
        if (off > end_off)
            return XF_R_PARSE_EXT;
        /* What follows a later fragment's header is the middle of the datagram, not the
         * header its next-header field names. */
        if (p->frag == XF_FRAG_LATER)
            break;
    }
    if (p->frag == XF_FRAG_LATER) {
        p->proto = nh;
        return 0;
    }
    if (xf_is_ipv6_ext(nh))
        return XF_R_PARSE_EXT;
    if (off > XF_MAX_IPV6_EXT_BYTES)
        return XF_R_PARSE_EXT;
    XF_BOUND(off, 0xfff);
    p->proto = nh;
    p->l4_off = off;
    if (p->frag == XF_FRAG_LATER)
        return 0;
    return xf_parse_l4(p, data + off, l3_end, data_end);
}

static __always_inline int xf_parse(struct xdp_md *ctx, struct xf_pkt *p)
{
    void *data = (void *)(long)ctx->data;
    void *data_end = (void *)(long)ctx->data_end;
    struct ethhdr *eth = data;
    void *cur = data + sizeof(*eth);

    if (cur > data_end)
        return XF_R_PARSE_ETH;
    __be16 proto = eth->h_proto;
    __builtin_memcpy(p->smac, eth->h_source, ETH_ALEN);

#pragma unroll
    for (int i = 0; i < XF_MAX_VLAN_DEPTH; i++) {
        if (!xf_is_vlan(proto))
            break;
        p->vlan_depth++;            /* counted before its bounds check: tagged all the same */
        struct xf_vlan_hdr *vh = cur;
        if ((void *)(vh + 1) > data_end)
            return XF_R_PARSE_VLAN;
        proto = vh->proto;
        cur = vh + 1;
    }
    if (xf_is_vlan(proto))
        return XF_R_PARSE_VLAN;

    p->eth_proto = proto;
    p->l3_off = cur - data;
    if (proto == bpf_htons(ETH_P_IP))
        return xf_parse_ipv4(p, data, cur, data_end);
    if (proto == bpf_htons(ETH_P_IPV6))
        return xf_parse_ipv6(p, data, cur, data_end);
    return 0;   /* ARP and other ethertypes: the caller decides */
}
