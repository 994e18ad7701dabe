/* xdpflow datapath: NAT rewrites (issue 11), floating IPs and SNAT, IPv4. A NAT flow's
 * entry says what to write (struct xf_flow: vtep, encap_sport); this header writes it,
 * with incremental checksums (RFC 1624): the IPv4 header's, the TCP/UDP checksum through
 * its pseudo-header (a UDP checksum of 0, none, stays 0), the ICMP checksum over an echo
 * id. An ICMP error about a translated flow is translated back: its outer address as
 * the flow's own packets, and inside it the quoted packet (which went the other way) the
 * other side's address and port, the quoted IP and L4 checksums and the ICMP checksum,
 * which covers the quoted bytes. No map access here (BCC rewrites map calls in the main
 * file only). Both return 0, or -1 when the packet is cut short of what they write. */
#pragma once

/* RFC 768: a UDP checksum that computes to 0 is sent as all ones (0 means none). */
#define XF_UDP_CSUM_MANGLED 0xffff

/* Pointers below are bounds-checked where they end up: clang turns a choice between two
 * fields into one pointer with a variable offset, whose range the verifier knows only
 * from a check of its own. A pointer that may be NULL is made opaque before it is
 * returned: else clang tests the caller's NULL check as the bounds check again, which
 * the verifier cannot follow. */
#define XF_OPAQUE(v) asm volatile("" : "+r"(v))

/* Where a TCP/UDP/ICMP header at l4 keeps its checksum, or NULL (UDP without one, or not
 * in the packet: a quoted header may be cut after 8 bytes). */
static __always_inline __u16 *xf_l4_csum(void *l4, __u8 proto, void *data_end)
{
    __u16 *ck;
    if (proto == IPPROTO_TCP)
        ck = &((struct tcphdr *)l4)->check;
    else if (proto == IPPROTO_UDP)
        ck = &((struct udphdr *)l4)->check;
    else if (proto == IPPROTO_ICMP)
        ck = &((struct icmphdr *)l4)->checksum;
    else
        return NULL;
    if ((void *)(ck + 1) > data_end || (proto == IPPROTO_UDP && *ck == 0))
        ck = NULL;
    XF_OPAQUE(ck);
    return ck;
}

/* Where a header at l4 keeps its "port": TCP/UDP source (src) or destination, an ICMP
 * echo's id (either way: `echo` says the ICMP header is one); NULL for what has none. */
static __always_inline __u16 *xf_l4_port(void *l4, __u8 proto, int echo, int src,
                                         void *data_end)
{
    __u16 *pp;
    if (proto == IPPROTO_TCP || proto == IPPROTO_UDP)
        pp = src ? &((struct udphdr *)l4)->source : &((struct udphdr *)l4)->dest;
    else if (proto == IPPROTO_ICMP && echo)
        pp = &((struct icmphdr *)l4)->un.echo.id;
    else
        return NULL;
    if ((void *)(pp + 1) > data_end)
        pp = NULL;
    XF_OPAQUE(pp);
    return pp;
}

/* The IPv4 address field a translation writes: the destination (DNAT) or source. */
static __always_inline __be32 *xf_ip_addr(struct iphdr *iph, int dst, void *data_end)
{
    __be32 *a = dst ? &iph->daddr : &iph->saddr;
    if ((void *)(a + 1) > data_end)
        a = NULL;
    XF_OPAQUE(a);
    return a;
}

/* Write addr and port (network order) over old ones a checksum at ck covers: through
 * the pseudo-header for TCP/UDP (with_addr), directly for an ICMP id. */
static __always_inline void xf_l4_csum_fix(__u16 *ck, __u8 proto, __be32 old, __be32 addr,
                                           __u16 old_port, __u16 port)
{
    if (!ck)
        return;
    if (proto != IPPROTO_ICMP)
        xf_csum_replace4(ck, old, addr);
    if (old_port != port)
        xf_csum_replace2(ck, old_port, port);
    if (proto == IPPROTO_UDP && *ck == 0)
        *ck = XF_UDP_CSUM_MANGLED;
}

/* The quoted packet of an ICMP error about a translated flow: its address and port on
 * the flow's far side (it went the other way) become addr and f's port, with the quoted
 * IP and L4 checksums and the ICMP checksum, which covers the quoted bytes. */
static __always_inline int xf_nat_rewrite_quoted(void *data, void *data_end,
                                                 struct xf_pkt *p, struct xf_flow *f,
                                                 int dnat, __be32 addr)
{
    __u32 off = p->l4_off;
    XF_BOUND(off, 0xff);
    struct icmphdr *ih = data + off;
    struct iphdr *in = (void *)(ih + 1);
    /* The quoted packet's address on the flow's far side: its source when the error
     * comes in (it quotes what went out), its destination when it goes out. */
    __be32 *qa = xf_ip_addr(in, !dnat, data_end);
    if ((void *)(in + 1) > data_end || !qa)
        return -1;
    __be32 qold = *qa;
    __u16 qcheck = in->check;
    xf_csum_replace4(&in->check, qold, addr);
    xf_csum_replace4(&ih->checksum, qold, addr);
    xf_csum_replace2(&ih->checksum, qcheck, in->check);
    *qa = addr;

    __u32 ihl = in->ihl * 4;
    XF_BOUND(ihl, 0x3c);
    void *l4 = (void *)in + ihl;
    __u8 proto = in->protocol;
    __u8 *qtype = l4;
    int echo = (void *)(qtype + 1) <= data_end && xf_is_icmp_echo(proto, *qtype);
    __u16 port = bpf_htons(f->encap_sport);
    __u16 *pp = xf_l4_port(l4, proto, echo, dnat, data_end);
    __u16 old_port = pp ? *pp : port;
    __u16 *ck = xf_l4_csum(l4, proto, data_end);
    if (ck) {
        __u16 was = *ck;
        xf_l4_csum_fix(ck, proto, qold, addr, old_port, port);
        xf_csum_replace2(&ih->checksum, was, *ck);
    }
    if (pp) {
        xf_csum_replace2(&ih->checksum, old_port, port);
        *pp = port;
    }
    return 0;
}

/* A NAT flow's translation of a packet: SNAT writes its source, DNAT its destination
 * (address and port). An ICMP error about the flow (`related`, f being the entry of the
 * direction it travels) gets the address, and its quoted packet the other side's
 * (xf_nat_rewrite_quoted). */
static __always_inline int xf_nat_rewrite(struct xdp_md *ctx, struct xf_pkt *p,
                                          struct xf_flow *f, int related)
{
    void *data = (void *)(long)ctx->data;
    void *data_end = (void *)(long)ctx->data_end;
    struct iphdr *iph = data + (p->l3_off & 0x3f);
    int dnat = f->flags & XF_FLOW_DNAT;
    __be32 *a = xf_ip_addr(iph, dnat, data_end);
    if ((void *)(iph + 1) > data_end || !a)
        return -1;
    __be32 addr = f->vtep;
    __be32 old = *a;
    xf_csum_replace4(&iph->check, old, addr);
    *a = addr;
    if (related)
        return xf_nat_rewrite_quoted(data, data_end, p, f, dnat, addr);
    /* A later fragment has no L4 header: the first carried the checksum. */
    if (p->frag == XF_FRAG_LATER)
        return 0;
    __u32 off = p->l4_off;
    XF_BOUND(off, 0xff);            /* IPv4: Ethernet, two tags and 60 bytes of header */
    void *l4 = data + off;
    __u16 port = bpf_htons(f->encap_sport);
    __u16 *pp = xf_l4_port(l4, p->proto, xf_is_icmp_echo(p->proto, p->icmp_type), !dnat,
                           data_end);
    __u16 old_port = pp ? *pp : port;
    xf_l4_csum_fix(xf_l4_csum(l4, p->proto, data_end), p->proto, old, addr, old_port, port);
    if (pp)
        *pp = port;
    return 0;
}
