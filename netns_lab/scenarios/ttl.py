"""TTL / hop limit 1: the packet would expire at the node, so neither path forwards it (the
node's stack takes it and, having no address for the tenant, answers nothing); TTL 2
arrives with TTL 1."""
from . import Send

DESCRIPTION = __doc__

SENDS = [
    Send("blue1", f'Ether(src=me.mac, dst=me.gw)/IP(src=me.ip, dst=vm("blue2").ip, ttl={t})'
                  f'/UDP(sport={45000 + t}, dport=7100)/N', f"udp/7100 with TTL {t}")
    for t in (1, 2, 3, 64, 255)
] + [
    Send("blue1", f'Ether(src=me.mac, dst=me.gw)/IPv6(src=me.ip6, dst=vm("blue2").ip6, '
                  f'hlim={h})/UDP(sport={45100 + h}, dport=7100)/N', f"udp6 with hop limit {h}")
    for h in (1, 2, 64)
] + [
    Send("blue1", 'Ether(src=me.mac, dst=me.gw)/IP(src=me.ip, dst=vm("blue2").ip, ttl=1)'
                  '/ICMP(id=501)/N', "ping with TTL 1"),
    Send("blue2", 'Ether(src=me.mac, dst=me.gw)/IP(src=me.ip, dst=vm("blue3").ip, ttl=1)'
                  '/UDP(sport=45200, dport=7100)/N', "TTL 1 on a denied flow"),
    Send("red1", 'Ether(src=me.mac, dst=me.gw)/IP(src=me.ip, dst=vm("red2").ip, ttl=1)'
                 '/UDP(sport=45201, dport=7000)/N', "red: TTL 1"),
    Send("blue1", 'Ether(src=me.mac, dst=me.gw)/IP(src=me.ip, dst="10.0.0.99", ttl=1)'
                  '/UDP(sport=45202, dport=7100)/N', "TTL 1 to an unknown address"),
]
