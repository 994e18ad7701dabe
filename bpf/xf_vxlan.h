/* xdpflow datapath: the VXLAN overlay (RFC 7348): the outer headers of a packet arriving
 * on an uplink, and encapsulation of a flow's packet for a remote VTEP. No map access
 * here (BCC rewrites map calls in the main file only): the caller looks things up.
 *
 * Underlay: IPv4 without options, no VLAN tag. Outer frame:
 *   Ethernet (14) | IPv4 (20) | UDP (8, dport 4789, checksum 0) | VXLAN (8) | inner frame */
#pragma once

#define XF_VXLAN_PORT 4789
#define XF_VXLAN_I 0x08        /* VXLAN flag I: the VNI is valid */

struct xf_vxlanhdr {
    __u8   flags;
    __u8   rsvd1[3];
    __be32 vni;                /* VNI << 8, the low byte reserved */
};

/* XF_ENCAP_LEN (xf_consts.h) is what encapsulation puts in front of the inner frame. */
#define XF_OUTER_HDRS (sizeof(struct ethhdr) + sizeof(struct iphdr) + sizeof(struct udphdr) + \
                       sizeof(struct xf_vxlanhdr))
_Static_assert(XF_ENCAP_LEN == XF_OUTER_HDRS, "XF_ENCAP_LEN is the outer headers' length");
/* What encapsulation adds to the IP packet the uplink sends: outer IP, UDP, VXLAN and the
 * inner Ethernet header, which is inside now. */
#define XF_ENCAP_OVERHEAD (XF_ENCAP_LEN - sizeof(struct ethhdr))

/* The outer headers of VXLAN to this node. */
struct xf_outer {
    __be32 saddr;              /* the sending VTEP */
    __u32  vni;
    __u32  trailer;            /* bytes after the outer IP packet (Ethernet padding) */
};

/* Is the packet VXLAN addressed to `local` (the uplink's address, network order)?
 * Returns 0 and fills *o; XF_R_UPLINK_OTHER for anything else (the node's own traffic:
 * the kernel's, untouched; fragments included, which the kernel reassembles); or
 * XF_R_PARSE_VXLAN for VXLAN to this node whose headers are truncated or lie. */
static __always_inline int xf_vxlan_parse(struct xdp_md *ctx, __be32 local, struct xf_outer *o)
{
    void *data = (void *)(long)ctx->data;
    void *data_end = (void *)(long)ctx->data_end;
    struct ethhdr *eth = data;
    struct iphdr *iph = (void *)(eth + 1);
    if ((void *)(iph + 1) > data_end || eth->h_proto != bpf_htons(ETH_P_IP))
        return XF_R_UPLINK_OTHER;
    if (iph->version != 4 || iph->ihl != 5 || iph->daddr != local ||
        iph->protocol != IPPROTO_UDP || (iph->frag_off & bpf_htons(IP_MF | IP_OFFSET)))
        return XF_R_UPLINK_OTHER;
    struct udphdr *uh = (void *)(iph + 1);
    if ((void *)(uh + 1) > data_end || uh->dest != bpf_htons(XF_VXLAN_PORT))
        return XF_R_UPLINK_OTHER;
    struct xf_vxlanhdr *vh = (void *)(uh + 1);
    if ((void *)(vh + 1) + sizeof(struct ethhdr) > data_end)
        return XF_R_PARSE_VXLAN;
    __u32 tot = bpf_ntohs(iph->tot_len);
    __u32 have = data_end - (void *)iph;
    /* At least outer IP, UDP, VXLAN and an inner Ethernet header (XF_ENCAP_LEN bytes). */
    if (tot < XF_ENCAP_LEN || tot > have || bpf_ntohs(uh->len) != tot - sizeof(struct iphdr))
        return XF_R_PARSE_VXLAN;
    if (!(vh->flags & XF_VXLAN_I))
        return XF_R_PARSE_VXLAN;
    o->saddr = iph->saddr;
    o->vni = bpf_ntohl(vh->vni) >> 8;
    o->trailer = have - tot;
    return 0;
}

/* A 32-bit hash of a flow key (also where NAT starts looking for a SNAT port). */
static __always_inline __u32 xf_flow_hash(struct xf_flow_key *k)
{
    __u32 h = k->src[0] ^ k->src[1] ^ k->src[2] ^ k->src[3] ^
              k->dst[0] ^ k->dst[1] ^ k->dst[2] ^ k->dst[3] ^
              (((__u32)k->sport << 16) | k->dport) ^ ((__u32)k->proto << 8) ^ k->tenant;
    h ^= h >> 16;           /* a 32-bit finalizer (lowbias32) */
    h *= 0x7feb352d;
    h ^= h >> 15;
    h *= 0x846ca68b;
    h ^= h >> 16;
    return h;
}

/* The outer UDP source port of a flow: a hash of its inner key, so the underlay's ECMP
 * spreads flows and keeps each on one path (RFC 7348 5), in the dynamic port range. */
static __always_inline __u16 xf_encap_sport(struct xf_flow_key *k)
{
    return 0xc000 | (xf_flow_hash(k) & 0x3fff);
}

/* Put the outer headers of flow f in front of the (already rewritten) inner frame of
 * `len` bytes and send it out of the uplink. */
static __always_inline int xf_vxlan_encap(struct xdp_md *ctx, struct xf_flow *f,
                                          struct xf_port *uplink, __u32 len)
{
    if (bpf_xdp_adjust_head(ctx, -(int)XF_ENCAP_LEN))
        return XDP_PASS;      /* no headroom: the kernel's path, never a silent drop */
    void *data = (void *)(long)ctx->data;
    void *data_end = (void *)(long)ctx->data_end;
    struct ethhdr *eth = data;
    struct iphdr *iph = (void *)(eth + 1);
    struct udphdr *uh = (void *)(iph + 1);
    struct xf_vxlanhdr *vh = (void *)(uh + 1);
    if ((void *)(vh + 1) > data_end)
        return XDP_DROP;
    __builtin_memcpy(eth->h_dest, f->vtep_mac, ETH_ALEN);
    __builtin_memcpy(eth->h_source, f->smac, ETH_ALEN);
    eth->h_proto = bpf_htons(ETH_P_IP);
    iph->version = 4;
    iph->ihl = 5;
    iph->tos = 0;
    iph->tot_len = bpf_htons(len + XF_ENCAP_OVERHEAD);
    iph->id = 0;
    iph->frag_off = bpf_htons(IP_DF);  /* bigger packets went to the kernel: never fragment */
    iph->ttl = 64;
    iph->protocol = IPPROTO_UDP;
    iph->check = 0;
    iph->saddr = uplink->local_ip[3];
    iph->daddr = f->vtep;
    __u32 sum = 0;
    __u16 *w = (__u16 *)iph;
#pragma unroll
    for (int i = 0; i < (int)(sizeof(*iph) / 2); i++)
        sum += w[i];
    iph->check = xf_csum_fold(sum);
    uh->source = bpf_htons(f->encap_sport);
    uh->dest = bpf_htons(XF_VXLAN_PORT);
    uh->len = bpf_htons(len + XF_ENCAP_OVERHEAD - sizeof(struct iphdr));
    uh->check = 0;             /* RFC 7348 5: zero over IPv4 */
    vh->flags = XF_VXLAN_I;
    vh->rsvd1[0] = vh->rsvd1[1] = vh->rsvd1[2] = 0;
    vh->vni = bpf_htonl(f->vni << 8);
    return bpf_redirect(f->out_ifindex, 0);
}
