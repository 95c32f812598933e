"""Refuse connections to PostgreSQL during a restore by rewriting pg_hba.conf (and undo it).

Why this module exists: the runbook says "block new connections to port 5432 with iptables"
and terminate the rest, so that no application writes while the dump is loaded. We block at
PostgreSQL's own door instead:

* iptables is not a dependable tool here: newer stemcells and containers switch between the
  legacy and nft back-ends, the test VMs share the host's kernel modules, and a rule added by
  a tool that then crashes blocks the port until a person removes it. A pg_hba.conf rewrite
  works wherever PostgreSQL runs, is visible (a header names what was done and where the
  original is) and is undone by moving one file back.
* The re-cloned standbys must still reach the primary (replication and the repmgr user), and
  local access (peer over the socket, loopback) must keep working for psql/repmgr on the VM.
  The blocked file therefore keeps: every `local` line; every `host*` line *narrowed* to each
  cluster node address and loopback that it matched; then `host all all all reject`. Nothing
  is widened except that `samenet` lines are narrowed to the node addresses without knowing
  the netmask (the nodes of one deployment share a network); host-name address fields
  cannot be evaluated offline and are dropped (documented limitation).

The original is kept next to the file as `<hba>.pgrecovery-orig` (same owner and mode); that
file's presence is the record that the block is in place and how to undo it.
"""

from __future__ import annotations

import ipaddress
import re
import shlex
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

HEADER = "# pgrecovery: connections blocked during a restore"
ORIG_SUFFIX = ".pgrecovery-orig"
LOOPBACK = ("127.0.0.1", "::1")

_HOST_TYPES = {"host", "hostssl", "hostnossl", "hostgssenc", "hostnogssenc"}
_KEYWORD_ADDRS = {"all", "samehost", "samenet"}


@dataclass(frozen=True)
class HbaLine:
    type: str
    database: str
    user: str
    address: str | None
    mask: str | None
    rest: tuple[str, ...]
    """method and options, as written."""


def _tokens(line: str) -> list[str]:
    lexer = shlex.shlex(line, posix=False)
    lexer.whitespace_split = True
    lexer.commenters = "#"
    lexer.quotes = '"'
    return list(lexer)


def parse_line(line: str) -> HbaLine | None:
    """One pg_hba record, or None for comments, blanks and lines we do not rewrite."""
    stripped = line.strip()
    if not stripped or stripped.startswith("#"):
        return None
    tokens = _tokens(stripped)
    if not tokens:
        return None
    kind = tokens[0]
    if kind == "local" and len(tokens) >= 4:
        return HbaLine(kind, tokens[1], tokens[2], None, None, tuple(tokens[3:]))
    if kind in _HOST_TYPES and len(tokens) >= 5:
        address, mask, rest = tokens[3], None, tokens[4:]
        if len(tokens) >= 6 and _is_ip(tokens[4]) and "/" not in tokens[3]:
            mask, rest = tokens[4], tokens[5:]
        return HbaLine(kind, tokens[1], tokens[2], address, mask, tuple(rest))
    return None


def _is_ip(text: str) -> bool:
    try:
        ipaddress.ip_address(text)
    except ValueError:
        return False
    return True


def _network(line: HbaLine) -> ipaddress.IPv4Network | ipaddress.IPv6Network | None:
    if line.address is None:
        return None
    try:
        if line.mask is not None:
            return ipaddress.ip_network(f"{line.address}/{line.mask}", strict=False)
        return ipaddress.ip_network(line.address, strict=False)
    except ValueError:
        return None


def matches(line: HbaLine, address: str) -> bool:
    """Whether a host line could admit a client at `address` (see module docstring)."""
    if line.address is None:
        return False
    if line.address in ("all", "samenet"):
        return True
    if line.address == "samehost":
        return address in LOOPBACK
    network = _network(line)
    if network is None:
        return False  # a host name: not evaluated offline
    ip = ipaddress.ip_address(address)
    return ip.version == network.version and ip in network


def _host_cidr(address: str) -> str:
    ip = ipaddress.ip_address(address)
    return f"{ip}/{32 if ip.version == 4 else 128}"


def blocked_hba(original: str, allowed: Iterable[str], *, orig_path: str) -> str:
    """The pg_hba.conf text that admits only local, loopback and `allowed` addresses."""
    addresses: list[str] = []
    for a in (*LOOPBACK, *allowed):
        ip = str(ipaddress.ip_address(a))  # raises on a host name: callers pass IPs
        if ip not in addresses:
            addresses.append(ip)
    out = [
        HEADER,
        f"# original: {orig_path}  (restore it and reload PostgreSQL to undo)",
    ]
    seen: set[str] = set()
    for raw in original.splitlines():
        rec = parse_line(raw)
        if rec is None:
            continue
        if rec.type == "local":
            text = " ".join(["local", rec.database, rec.user, *rec.rest])
            if text not in seen:
                seen.add(text)
                out.append(text)
            continue
        for address in addresses:
            if matches(rec, address):
                text = " ".join([rec.type, rec.database, rec.user, _host_cidr(address),
                                 *rec.rest])
                if text not in seen:
                    seen.add(text)
                    out.append(text)
    out.append("host all all all reject")
    return "\n".join(out) + "\n"


def is_blocked(text: str) -> bool:
    return text.startswith(HEADER)


_IPV4ISH = re.compile(r"^[0-9a-fA-F:.]+$")


def ip_addresses(addresses: Sequence[str]) -> list[str]:
    """The IP literals among node addresses (host names cannot be matched in pg_hba)."""
    return [a for a in addresses if _IPV4ISH.match(a) and _is_ip(a)]
