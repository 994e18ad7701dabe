/* xdpflow datapath: checksum helpers (RFC 1071 sums, RFC 1624 incremental updates). */
#pragma once

static __always_inline __u16 xf_csum_fold(__u32 sum)
{
    sum = (sum & 0xffff) + (sum >> 16);
    sum = (sum & 0xffff) + (sum >> 16);
    return ~sum & 0xffff;
}

/* Replace one 16-bit word of a checksummed header: HC' = ~(~HC + ~m + m'). All values in
 * network order, as they sit in the packet. */
static __always_inline void xf_csum_replace2(__u16 *csum, __u16 old, __u16 new_)
{
    __u32 sum = (__u16)~*csum;
    sum += (__u16)~old;
    sum += new_;
    sum = (sum & 0xffff) + (sum >> 16);
    sum = (sum & 0xffff) + (sum >> 16);
    *csum = ~sum & 0xffff;
}

/* Replace a 32-bit field (an IPv4 address, network order) of a checksummed header. */
static __always_inline void xf_csum_replace4(__u16 *csum, __be32 old, __be32 new_)
{
    xf_csum_replace2(csum, (__u16)old, (__u16)new_);
    xf_csum_replace2(csum, (__u16)(old >> 16), (__u16)(new_ >> 16));
}

/* Decrement the IPv4 TTL and fix the header checksum incrementally. */
static __always_inline void xf_ipv4_dec_ttl(struct iphdr *iph)
{
    __u16 old = *(__u16 *)&iph->ttl;    /* TTL and protocol share a 16-bit word */
    iph->ttl--;
    xf_csum_replace2(&iph->check, old, *(__u16 *)&iph->ttl);
}
