"""Scenarios for the two-node overlay lab (netns_lab/labs/overlay.toml): node a holds
blue1, blue3 and red1, node b blue2, blue4 and red2; blue and red use the same addresses
and MACs, with VNIs 5010 and 5020. See netns_lab/scenarios/__init__.py for the format."""


def to(dst: str, ip: str = "") -> str:
    """The start of a frame from the sending VM to `dst` (a VM's name, or an address);
    `ip`: more IP fields ('flags="DF"')."""
    addr = f'"{dst}"' if dst[0].isdigit() else f'vm("{dst}").ip'
    return f'Ether(src=me.mac, dst=me.gw)/IP(src=me.ip, dst={addr}{", " + ip if ip else ""})'


def udp(dst: str, sport: int, dport: int) -> str:
    return to(dst) + f"/UDP(sport={sport}, dport={dport})/N"


def syn(dst: str, sport: int, dport: int) -> str:
    return to(dst) + f'/TCP(sport={sport}, dport={dport}, flags="S", seq=1000)/N'


def echo(dst: str, ident: int) -> str:
    return to(dst) + f"/ICMP(id={ident}, seq=1)/N"
