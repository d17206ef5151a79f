"""The client's address behind the port's reverse proxy (nginx, a TLS terminator).

Behind a proxy every connection comes from the proxy, so the login throttle and the audit trail would see one
address for everyone. A proxy the operator names (`--trusted-proxy CIDR`) says whom it forwards for in
`X-Forwarded-For`, appending the address it was connected from. That header is read only when the TCP peer is
in a trusted network (from anyone else it is the client's own say, and ignored), right to left, skipping
addresses that are themselves trusted proxies: the first other one is the client (nginx's
`real_ip_recursive on`). A value that is no address there, where a trusted proxy wrote, means the header
cannot be followed: the peer's address is used, as without a proxy.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable, Sequence

from customs_edge.core.errors import CustomsEdgeError

Network = ipaddress.IPv4Network | ipaddress.IPv6Network
Address = ipaddress.IPv4Address | ipaddress.IPv6Address
MAX_HOPS = 32  # addresses read from the right of the header at most: a long list costs no more than this


def parse_networks(values: Iterable[str]) -> list[Network]:
    """`--trusted-proxy` values: an address or a network (CIDR), each; a bad one is an error naming it."""
    out: list[Network] = []
    for v in values:
        try:
            out.append(ipaddress.ip_network(v.strip(), strict=False))
        except ValueError:
            raise CustomsEdgeError(f"--trusted-proxy {v!r}: an address or network, e.g. 10.0.0.5 or 10.0.0.0/24"
                                   " (the reverse proxy's address as the console sees it)") from None
    return out


def _address(text: str) -> Address | None:
    text = text.strip()
    if text.startswith("[") and text.endswith("]"):
        text = text[1:-1]
    try:
        a = ipaddress.ip_address(text)
    except ValueError:
        return None
    if isinstance(a, ipaddress.IPv6Address) and a.ipv4_mapped is not None:
        return a.ipv4_mapped  # ::ffff:10.0.0.5 from a dual-stack socket is 10.0.0.5
    return a


class TrustedProxies:
    def __init__(self, networks: Sequence[Network] = ()) -> None:
        self.networks = list(networks)

    def trusted(self, a: Address) -> bool:
        return any(a in n for n in self.networks)

    def client(self, peer: str, forwarded_for: Sequence[str] | None) -> str:
        """The client's address: the peer's, unless the peer is a trusted proxy and X-Forwarded-For (every
        such header, in order) names an untrusted address to its right. Never raises."""
        peer_a = _address(peer)
        if not self.networks or peer_a is None or not self.trusted(peer_a) or not forwarded_for:
            return peer
        hops = ",".join(forwarded_for).split(",")[-MAX_HOPS:]
        for text in reversed(hops):
            a = _address(text)
            if a is None:
                return peer  # garbage where a trusted proxy wrote: not followed
            if not self.trusted(a):
                return a.compressed
        return peer  # every hop a proxy of ours: the nearest one we know is the peer
