/* xdpflow datapath: proxy ARP and IPv6 neighbour advertisements. A VM asking for any
 * address its tenant knows (an endpoint, a route, a next hop) is answered with the port's
 * MAC, as OVN's ARP responder does, so VMs need no help from the kernel. The asker's own
 * address, gratuitous ARP and duplicate-address detection are never answered.
 * Needs xf_tenant_knows() from the program file (BCC rewrites map calls there only).
 * The functions return XDP_TX with the reply written in place, XDP_PASS (untouched) when
 * the address is the node's own, or -1 when the datapath does not answer. */
#pragma once

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

/* Returns XDP_TX with the reply written in place, or -1 when not answered. */
static __always_inline int xf_arp_reply(struct xdp_md *ctx, struct xf_pkt *p,
                                        struct xf_port *port)
{
    void *data = (void *)(long)ctx->data;
    void *data_end = (void *)(long)ctx->data_end;
    struct ethhdr *eth = data;
    __u32 off = p->l3_off & 0x3f;
    struct xf_arp *arp = data + off;
    if ((void *)(arp + 1) > data_end)
        return -1;
    if (arp->htype != bpf_htons(1) || arp->ptype != bpf_htons(0x0800) || arp->hlen != 6 ||
        arp->plen != 4 || arp->op != bpf_htons(1))
        return -1;
    __be32 tpa = arp->tpa, spa = arp->spa;
    if (tpa == spa || spa == 0)        /* gratuitous ARP, or a probe (duplicate detection) */
        return -1;
    __u32 addr[4] = {0, 0, bpf_htonl(0xffff), tpa};
    int who = xf_tenant_knows(port->tenant, port->slot, addr);
    if (who == XF_NB_KERNEL)
        return XDP_PASS;
    if (who != XF_NB_DATAPATH)
        return -1;

    __u8 asker[6];
    __builtin_memcpy(asker, arp->sha, 6);
    arp->op = bpf_htons(2);
    __builtin_memcpy(arp->tha, asker, 6);
    arp->tpa = spa;
    __builtin_memcpy(arp->sha, port->mac, 6);
    arp->spa = tpa;
    __builtin_memcpy(eth->h_dest, asker, 6);
    __builtin_memcpy(eth->h_source, port->mac, 6);
    return XDP_TX;
}

#define XF_ND_LEN 72   /* IPv6 header + NA (24) + target link-layer address option (8) */

/* Answers a neighbour solicitation with a neighbour advertisement (Router, Solicited,
 * Override) carrying the port's MAC. Returns XDP_TX, or -1 when not answered. */
static __always_inline int xf_nd_reply(struct xdp_md *ctx, struct xf_pkt *p,
                                       struct xf_port *port)
{
    void *data = (void *)(long)ctx->data;
    void *data_end = (void *)(long)ctx->data_end;
    __u32 off = p->l3_off & 0x3f;
    struct ipv6hdr *ip6 = data + off;
    __u8 *icmp = (__u8 *)(ip6 + 1);
    if (icmp + 24 > (__u8 *)data_end)
        return -1;
    /* RFC 4861 7.1.1: hop limit 255, code 0, no extension headers in front of it here. */
    if (ip6->nexthdr != XF_IPPROTO_ICMPV6 || icmp[0] != 135 || icmp[1] != 0 ||
        ip6->hop_limit != 255)
        return -1;
    __u32 src0 = ((__u32 *)&ip6->saddr)[0] | ((__u32 *)&ip6->saddr)[1] |
                 ((__u32 *)&ip6->saddr)[2] | ((__u32 *)&ip6->saddr)[3];
    if (src0 == 0)                      /* duplicate-address detection */
        return -1;
    __u32 target[4];
    __builtin_memcpy(target, icmp + 8, 16);
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
    icmp = (__u8 *)(ip6 + 1);
    if (icmp + 32 > (__u8 *)data_end || (void *)(eth + 1) > data_end)
        return -1;

    __builtin_memcpy(eth->h_dest, eth->h_source, 6);
    __builtin_memcpy(eth->h_source, port->mac, 6);
    ip6->payload_len = bpf_htons(32);
    ip6->hop_limit = 255;
    __builtin_memcpy(&ip6->daddr, &ip6->saddr, 16);
    __builtin_memcpy(&ip6->saddr, target, 16);
    icmp[0] = 136;
    icmp[1] = 0;
    icmp[2] = 0;
    icmp[3] = 0;
    icmp[4] = 0xe0;                     /* Router | Solicited | Override */
    icmp[5] = 0;
    icmp[6] = 0;
    icmp[7] = 0;
    /* target stays at icmp[8..23] */
    icmp[24] = 2;                       /* target link-layer address option */
    icmp[25] = 1;
    __builtin_memcpy(icmp + 26, port->mac, 6);

    /* Checksum over the pseudo-header (addresses, length 32, next header 58) and the
     * 32 bytes of the message. */
    __u32 sum = 32 + XF_IPPROTO_ICMPV6;
    __u16 *w = (__u16 *)&ip6->saddr;
#pragma unroll
    for (int i = 0; i < 16; i++)
        sum += bpf_ntohs(w[i]);
    w = (__u16 *)icmp;
#pragma unroll
    for (int i = 0; i < 16; i++)
        sum += bpf_ntohs(w[i]);
    __u16 c = xf_csum_fold(sum);
    icmp[2] = c >> 8;
    icmp[3] = c & 0xff;
    return XDP_TX;
}
