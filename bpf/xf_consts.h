/* xdpflow datapath: constants shared with the agent (agent/abi.py mirrors them and a test
 * checks the mirror). */
#pragma once

/* Map sizes have one home, the agent's config ([datapath] defaults in agent/config.py):
 * the agent always passes them as -D flags, so the C keeps no second copy. */
#if !defined(XF_FLOW_TABLE_SIZE) || !defined(XF_MAX_RULE_ENTRIES) || !defined(XF_MAX_MASKS) || \
    !defined(XF_MAX_ENDPOINTS) || !defined(XF_MAX_ROUTES) || !defined(XF_MAX_PORTS)
#error "map sizes come from the agent as -D flags (agent/datapath.py Datapath.cflags)"
#endif
#ifndef XF_BUILD_ID
#define XF_BUILD_ID 0                /* set to tell builds of one source apart (upgrades) */
#endif
#ifndef XF_PIN_DIR
#define XF_PIN_DIR "/sys/fs/bpf/xdpflow"
#endif

#define XF_PORT_INDEX 16384          /* ifindexes below this find their port in an array */
#define XF_MAX_TENANTS 65536         /* tenant ids are 1..65535; the array is indexed by id */
#define XF_MAX_VLAN_DEPTH 2          /* 802.1Q / 802.1ad tags parsed before L3 */
#define XF_MAX_IPV6_EXT 6            /* IPv6 extension headers walked before giving up */
#define XF_MAX_IPV6_EXT_BYTES 2048   /* ... and where the L4 header must start by then */
#define XF_FRAG_TABLE_SIZE 8192      /* first fragments remembered for their later fragments */
#define XF_MAX_RULE_IDS 262144       /* rules whose classification hits are counted */
#define XF_RULE_STATS 65536          /* per-rule packet/byte counter slots (0 unused) */
#define XF_MASK_SETS 8192            /* (tenant, generation) mask sets: configured tenants x 2 */
#define XF_PORT_SRC_ENTRIES (2 * XF_MAX_ENDPOINTS)  /* port security: endpoints + allowed prefixes */
#define XF_IPV4_MIN_MTU 68           /* RFC 791 */
#define XF_IPV6_MIN_MTU 1280         /* RFC 8200 5 */
#define XF_EVENT_BYTES 128           /* packet bytes a monitor event carries */
#define XF_EVENT_RING_PAGES 64       /* monitor ring buffer: 256 KiB, about 1,500 events */
#define XF_MAX_POLICERS 16384        /* tenants and rules with a rate limit, together */
#define XF_POLICER_RULE 0x80000000   /* xf_policers key of a rule's limit: rule id | this;
                                      * a tenant's is its id */
#define XF_ENCAP_LEN 50              /* VXLAN's outer Ethernet, IPv4, UDP and VXLAN headers */
#define XF_VNI_ENTRIES 65536         /* decap's (VNI) and (VNI, VTEP) entries */
#define XF_NAT_ENTRIES 65536         /* xf_nat: floating IPs (two entries each) and SNATs */
#define XF_NAT_STATS 65536           /* xf_nat_stats: (tenant, kind) translation counters */
#define XF_NAT_TRIES 8               /* SNAT ports tried for a new flow (the verifier's budget) */
#define XF_TENANT_EXTERNAL 0         /* the tenant of flow keys of packets from the external
                                      * network (tenant ids are 1..65535: never a tenant's) */

/* Verdicts: what the datapath did with a packet (XF_V_NONE marks event counters). */
#define XF_V_NONE 0
#define XF_V_DROP 1
#define XF_V_PASS 2
#define XF_V_REDIRECT 3
#define XF_V_TX 4
#define XF_V_MAX 5

/* Reasons: why. Keep in step with agent/abi.py REASONS (checked by a test). */
#define XF_R_FLOW 1            /* flow-table hit */
#define XF_R_RULE_ALLOW 2      /* miss; a rule allowed: flow installed */
#define XF_R_RULE_DENY 3       /* miss; a rule denied */
#define XF_R_RULE_PASS 4       /* miss; a rule sends it to the kernel */
#define XF_R_DEFAULT 5         /* miss; no rule matched: the tenant's default verdict */
#define XF_R_NO_ROUTE 6        /* allowed, but no endpoint or route for the destination */
#define XF_R_ROUTE_KERNEL 7    /* allowed; the route hands it to the node's kernel */
#define XF_R_ROUTE_DROP 8      /* allowed; the route is a blackhole */
#define XF_R_LOCAL 9           /* addressed to the node itself: the kernel answers */
#define XF_R_TTL 10            /* TTL / hop limit would expire: the kernel answers */
#define XF_R_ARP_REPLY 11      /* proxy ARP answered */
#define XF_R_ND_REPLY 12       /* neighbour advertisement sent for a solicitation */
#define XF_R_ARP_OTHER 13      /* ARP not answered by the datapath */
#define XF_R_ND_OTHER 14       /* neighbour discovery not answered by the datapath */
#define XF_R_NOT_IP 15         /* neither IPv4, IPv6 nor ARP */
#define XF_R_MULTICAST 16      /* broadcast or multicast destination */
#define XF_R_NO_PORT 17        /* ingress interface is not a configured port */
#define XF_R_NO_TENANT 18      /* port's tenant is not configured */
#define XF_R_PARSE_ETH 19      /* truncated Ethernet header */
#define XF_R_PARSE_VLAN 20     /* truncated tag, or more tags than XF_MAX_VLAN_DEPTH */
#define XF_R_PARSE_IPV4 21     /* truncated, IHL < 5, total length that lies */
#define XF_R_PARSE_IPV6 22     /* truncated, payload length that lies, IPv4-mapped address */
#define XF_R_PARSE_EXT 23      /* IPv6 extension headers truncated or too many */
#define XF_R_PARSE_L4 24       /* TCP/UDP/ICMP header truncated or lying */
#define XF_R_FRAG 25           /* later fragment whose first fragment was not seen */
#define XF_R_INSERT_FAILED 26  /* event: a flow insert failed (table full); verdict unchanged */
#define XF_R_FLOW_STALE 27     /* event: a flow of an older generation was classified again */
#define XF_R_RELATED 28        /* an ICMP error about a flow in the table: sent to its sender */
#define XF_R_SPOOF 29          /* source MAC/address not the port's (port security) */
#define XF_R_VLAN 30           /* a VLAN-tagged frame from a port not configured for tags */
#define XF_R_ICMP_MTU 31       /* packet too big / frag needed below the IPv4/IPv6 minimum MTU */
/* 32-39: the overlay (uplink ports, VXLAN) */
#define XF_R_UPLINK_OTHER 32   /* arrived on an uplink, not for the datapath: the kernel's */
#define XF_R_VNI_UNKNOWN 33    /* VXLAN with a VNI no tenant has: dropped */
#define XF_R_VTEP_UNKNOWN 34   /* VXLAN from a VTEP with none of the VNI tenant's endpoints */
#define XF_R_MTU_KERNEL 35     /* too big for the uplink once encapsulated: the kernel's */
#define XF_R_PARSE_VXLAN 36    /* VXLAN to the node, truncated or lying: dropped */
#define XF_R_NO_NEIGH 37       /* the underlay neighbour of a VTEP is not resolved yet */
/* 40-47: NAT and rate limits; 48-51: quotas */
#define XF_R_RATELIMIT 40      /* over a tenant's or rule's rate limit (xf_policers) */
#define XF_R_NAT_NO_FLOW 41    /* to a SNAT address at a port no flow holds: the kernel's */
#define XF_R_NAT_EXHAUSTED 42  /* no SNAT port could be claimed for a new flow: dropped */
#define XF_R_NAT_NO_NEIGH 43   /* the external next hop's MAC is not resolved: dropped */
#define XF_R_NAT_NO_ROUTE 44   /* no route out of an uplink to the external address: dropped */
#define XF_R_NAT_FRAG 45       /* a fragment to a floating address: dropped (not translated) */
#define XF_R_NAT_FORWARDING_OFF 46 /* the FIB lookup refused: IPv4 forwarding off on the VM's port */
#define XF_R_FLOW_QUOTA 48     /* event: the tenant is at its flow quota: judged, not cached */
#define XF_R_MAX 49
#define XF_R_ROWS 64           /* reasons per (port, verdict) in the counter array */

/* Rule actions (classifier entries). */
#define XF_A_ALLOW 1
#define XF_A_DENY 2
#define XF_A_PASS 3

/* Route actions. */
#define XF_RT_VIA 1
#define XF_RT_KERNEL 2
#define XF_RT_DROP 3

/* Flow flags. */
#define XF_FLOW_REVERSE 0x01   /* installed as the reply direction of an allowed flow */
#define XF_FLOW_CLOSING 0x02   /* TCP FIN or RST seen: aged with the short timeout */
#define XF_FLOW_ENCAP 0x04     /* sent over VXLAN to a remote VTEP */
#define XF_FLOW_POLICED 0x08   /* its rule has a rate limit (xf_policers: rule id | XF_POLICER_RULE) */
/* NAT (issue 11): the entry's overlay bytes hold the rewrite (struct xf_flow). */
#define XF_FLOW_SNAT 0x10      /* source rewritten: a tenant's packet leaving by an uplink */
#define XF_FLOW_DNAT 0x20      /* destination rewritten: from the external network, keyed
                                * with XF_TENANT_EXTERNAL */
#define XF_FLOW_FIP 0x40       /* the translation is a floating IP's (else a SNAT's) */

/* xf_nat entry kinds. */
#define XF_NAT_FIP 1
#define XF_NAT_SNAT 2

/* xf_nat_stats kinds: translations by direction and kind, and SNAT ports not found. */
#define XF_NATC_FIP_IN 0
#define XF_NATC_FIP_OUT 1
#define XF_NATC_SNAT_IN 2
#define XF_NATC_SNAT_OUT 3
#define XF_NATC_EXHAUSTED 4

/* Port flags. */
#define XF_PORT_SECURITY 0x01  /* sources checked: the MAC and address of an endpoint of the port */
#define XF_PORT_VLAN 0x02      /* VLAN-tagged frames accepted */
#define XF_PORT_TENANT_DROP 0x04  /* its tenant's default is drop: so is a packet that finds
                                   * no tenant entry (fail closed) */
#define XF_PORT_UPLINK 0x08    /* faces the underlay/external network; belongs to no tenant */

/* Policer flags. */
#define XF_POL_BYTES 0x01      /* a bit rate: cost is per byte; else per packet */

/* Endpoint flags. */
#define XF_EP_LOCAL 0x01       /* an address of the node itself: hand to the kernel */
#define XF_EP_REMOTE 0x02      /* behind a remote VTEP (VXLAN over the uplink) */

/* Fragment state of a packet. */
#define XF_FRAG_NONE 0
#define XF_FRAG_FIRST 1
#define XF_FRAG_LATER 2
