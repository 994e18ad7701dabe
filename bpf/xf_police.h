/* xdpflow datapath: rate limits (struct xf_policer, a token bucket kept as GCRA). The
 * lookup is the caller's (map calls stay in xdpflow.c); this header holds the arithmetic.
 *
 * Several CPUs: one bucket shared by all, charged with atomic adds. A packet adds its
 * cost to tat and looks at what was there before: if that puts tat further than the burst
 * ahead of now it takes the cost back and is refused. Two CPUs racing each see the
 * other's charge, so the node as a whole passes rate x time + burst. (A per-CPU bucket
 * with rate/N each needs no atomics but passes only rate/N when one CPU gets all the
 * traffic, as one flow does with RSS, and up to N x burst at once.) */
#pragma once

/* What a packet of `len` bytes costs in this bucket, in ns. */
static __always_inline __u64 xf_police_cost(struct xf_policer *pl, __u64 len)
{
    return (pl->flags & XF_POL_BYTES) ? (len * pl->cost) >> 16 : pl->cost;
}

/* The credit the bucket holds at `now`, in ns (the burst when idle). */
static __always_inline __u64 xf_police_credit(struct xf_policer *pl, __u64 now)
{
    __u64 tat = pl->tat_ns;
    if ((__s64)(tat - now) <= 0)
        return pl->burst_ns;
    __u64 ahead = tat - now;
    return ahead >= pl->burst_ns ? 0 : pl->burst_ns - ahead;
}

/* Charge a packet costing `cost` ns: 1 when it conforms, 0 when it is over the limit. */
static __always_inline int xf_police_charge(struct xf_policer *pl, __u64 cost, __u64 now)
{
    /* Bigger than the whole bucket: it never fits. */
    if (cost > pl->burst_ns)
        goto refuse;
    __u64 tat = pl->tat_ns;
    /* Idle (a full bucket): the schedule restarts from now with this packet, one atomic.
     * When another CPU changed tat meanwhile, charge as below: tat is then recent. */
    if ((__s64)(tat - now) < 0 &&
        __sync_val_compare_and_swap(&pl->tat_ns, tat, now + cost) == tat)
        return 1;
    __u64 before = __sync_fetch_and_add(&pl->tat_ns, cost);
    if ((__s64)(before + cost - now) <= (__s64)pl->burst_ns)
        return 1;
    __sync_fetch_and_sub(&pl->tat_ns, cost);
refuse:
    __sync_fetch_and_add(&pl->dropped, 1);
    return 0;
}
