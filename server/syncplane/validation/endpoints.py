"""Where a connection may point, and where a client may send its token (pure; no I/O).

One rule set for the API's validation, the worker's own check at start (a Workflow applied
with kubectl skips the API) and the CLI:

- an absolute ``http(s)`` URL, without user info, spaces or control characters;
- never a link-local address or a cloud metadata service (``169.254.169.254`` and friends):
  they answer with the node's own credentials;
- ``https``, except on loopback (where the sandbox lives) or when the connection opts in
  with ``allowCleartext: true``: a bearer token would travel in clear text.
"""

from __future__ import annotations

import ipaddress
from urllib.parse import urlsplit

#: Metadata services reachable without a link-local address (names and the ones outside 169.254/16).
METADATA_HOSTS = frozenset({"metadata", "metadata.google.internal", "metadata.goog", "instance-data",
                            "instance-data.ec2.internal", "100.100.100.200", "fd00:ec2::254"})


def _ip(host: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    try:
        return ipaddress.ip_address(host.strip("[]"))
    except ValueError:
        return None


def is_loopback_host(host: str) -> bool:
    """``localhost``, 127.0.0.0/8 or ``::1``."""
    host = host.lower().rstrip(".")
    if host == "localhost":
        return True
    ip = _ip(host)
    return ip is not None and ip.is_loopback


def is_loopback(address: str) -> bool:
    """Whether a ``host:port`` address is on loopback."""
    return is_loopback_host(address.rsplit(":", 1)[0])


def is_metadata_or_link_local(host: str) -> bool:
    host = host.lower().rstrip(".").strip("[]")
    if host in METADATA_HOSTS:
        return True
    ip = _ip(host)
    if ip is None:
        return False
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return ip.is_link_local or str(ip) in METADATA_HOSTS


def endpoint_problem(url: str, allow_cleartext: bool = False) -> str | None:
    """What is wrong with a connection endpoint, as a field violation's description; None if nothing."""
    if any(c.isspace() or ord(c) < 0x20 or ord(c) == 0x7F for c in url):
        return "must not contain spaces or control characters"
    try:
        parts = urlsplit(url)
        host = parts.hostname or ""
        parts.port  # noqa: B018 (raises on a bad port)
    except ValueError:
        return "must be an http(s) URL"
    if parts.scheme not in ("http", "https") or not parts.netloc or not host:
        return "must be an http(s) URL"
    if "@" in parts.netloc:
        return "must not carry credentials; use credentials.name"
    if is_metadata_or_link_local(host):
        return "must not be a link-local or cloud metadata address"
    if parts.scheme == "http" and not is_loopback_host(host) and not allow_cleartext:
        return "must use https (plain http only on loopback, or with allowCleartext: true)"
    return None
