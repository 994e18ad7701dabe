/* xdpflow benchmark baselines (xdpflow-lab bench datapath): the floor of a test run and
 * the cost of one 5-tuple lookup in a large hash, to put the datapath's numbers in scale. */
#include <uapi/linux/bpf.h>
#include <linux/if_ether.h>
#include <linux/ip.h>
#include <linux/udp.h>

#ifndef XF_BENCH_ENTRIES
#define XF_BENCH_ENTRIES 100000
#endif

struct bench_key {
    __u32 src;
    __u32 dst;
    __u16 sport;
    __u16 dport;
    __u8  proto;
    __u8  pad[3];
};

/* 5-tuple -> packet count, filled by the benchmark. */
BPF_TABLE("hash", struct bench_key, __u64, bench_flows, XF_BENCH_ENTRIES);

int bare_pass(struct xdp_md *ctx)
{
    return XDP_PASS;
}

int bare_lookup(struct xdp_md *ctx)
{
    void *data = (void *)(long)ctx->data;
    void *data_end = (void *)(long)ctx->data_end;
    struct ethhdr *eth = data;
    struct iphdr *iph = (void *)(eth + 1);
    struct udphdr *uh = (void *)(iph + 1);
    if ((void *)(uh + 1) > data_end)
        return XDP_DROP;
    struct bench_key k = {};
    k.src = iph->saddr;
    k.dst = iph->daddr;
    k.sport = uh->source;
    k.dport = uh->dest;
    k.proto = iph->protocol;
    __u64 *c = bench_flows.lookup(&k);
    if (!c)
        return XDP_DROP;
    __sync_fetch_and_add(c, 1);
    return XDP_PASS;
}
