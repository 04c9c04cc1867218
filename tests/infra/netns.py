"""Two network namespaces standing in for two hosts, for multi-node tests on one machine.

``NetnsPair`` creates namespaces ``pt-<pid>-<tag>-a`` and ``pt-<pid>-<tag>-b`` joined by a veth
pair: side A has 10.77.0.1/24, side B 10.77.0.2/24; loopback is up in both. Traffic only ever
goes to those addresses or to loopback: the namespaces have no route anywhere else.

Needs root and a working ``ip netns`` (iproute2). ``unavailable_reason()`` says why not, for a
clean skip. No pytest in here; the fixture is in ``tests/infra/fixtures.py``.

    with NetnsPair() as ns:
        p = ns.popen("a", [sys.executable, "-c", "..."])      # runs inside namespace A
        ns.a.addr, ns.a.ifname                                 # "10.77.0.1", "ptv…a"

Pitfalls a multi-node launch hits here exactly as on real clusters: the machine's hostname does
not resolve inside the namespaces (torchrun's c10d rendezvous host must be told
``--rdzv_conf=is_host=1`` and each agent needs ``--local_addr``), and gloo needs
``GLOO_SOCKET_IFNAME`` set to the veth name of its side.
"""

from __future__ import annotations

import os
import re
import secrets
import shutil
import subprocess
from dataclasses import dataclass
from typing import Sequence

PREFIX = "pt-"
SUBNET_PREFIX = "10.77.0"
PREFIXLEN = 24


class NetnsError(RuntimeError):
    pass


@dataclass(frozen=True)
class Side:
    name: str      # namespace name
    ifname: str    # veth interface inside it
    addr: str      # its IPv4 address


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    p = subprocess.run(["ip", *args], capture_output=True, text=True, timeout=30)
    if check and p.returncode != 0:
        raise NetnsError(f"ip {' '.join(args)} failed (rc={p.returncode}): {p.stderr.strip()}")
    return p


def list_netns() -> list[str]:
    p = _ip("netns", "list", check=False)
    return [line.split()[0] for line in p.stdout.splitlines() if line.strip()]


_probe_result: str | None = None
_probed = False


def unavailable_reason() -> str | None:
    """None if namespaces can be used here, else a short reason (for pytest.skip)."""
    global _probe_result, _probed
    if _probed:
        return _probe_result
    _probed = True
    if os.geteuid() != 0:
        _probe_result = "network namespaces need root"
    elif shutil.which("ip") is None:
        _probe_result = "iproute2 (`ip`) not installed; run .ci/install_system_deps.sh"
    else:
        name = f"{PREFIX}{os.getpid()}-probe"
        try:
            _ip("netns", "add", name)
            _ip("netns", "exec", name, "ip", "link", "set", "lo", "up")
        except (NetnsError, OSError, subprocess.TimeoutExpired) as e:
            _probe_result = f"`ip netns` does not work here: {e}"
        finally:
            _ip("netns", "del", name, check=False)
    return _probe_result


def cleanup_stale() -> list[str]:
    """Delete ``pt-<pid>-…`` namespaces whose creating process no longer exists."""
    removed = []
    for name in list_netns():
        m = re.match(rf"{re.escape(PREFIX)}(\d+)-", name)
        if not m:
            continue
        pid = int(m.group(1))
        try:
            os.kill(pid, 0)
            continue  # owner alive
        except ProcessLookupError:
            pass
        except PermissionError:
            continue
        if _ip("netns", "del", name, check=False).returncode == 0:
            removed.append(name)
    return removed


class NetnsPair:
    """Context manager: two namespaces joined by a veth pair. Always cleans up on exit."""

    def __init__(self, tag: str | None = None):
        tag = tag or secrets.token_hex(3)
        base = f"{PREFIX}{os.getpid()}-{tag}"
        # Interface names are limited to 15 characters.
        self.a = Side(f"{base}-a", f"ptv{tag}a"[:15], f"{SUBNET_PREFIX}.1")
        self.b = Side(f"{base}-b", f"ptv{tag}b"[:15], f"{SUBNET_PREFIX}.2")
        self._procs: list[subprocess.Popen] = []
        self._created: list[str] = []

    # ---- lifecycle ------------------------------------------------------------------------
    def create(self) -> "NetnsPair":
        reason = unavailable_reason()
        if reason:
            raise NetnsError(reason)
        cleanup_stale()
        try:
            for side in (self.a, self.b):
                _ip("netns", "add", side.name)
                self._created.append(side.name)
            _ip("link", "add", self.a.ifname, "type", "veth", "peer", "name", self.b.ifname)
            for side in (self.a, self.b):
                _ip("link", "set", side.ifname, "netns", side.name)
                _ip("-n", side.name, "addr", "add", f"{side.addr}/{PREFIXLEN}", "dev", side.ifname)
                _ip("-n", side.name, "link", "set", side.ifname, "up")
                _ip("-n", side.name, "link", "set", "lo", "up")
        except Exception:
            self.close()
            raise
        return self

    def close(self) -> None:
        for p in self._procs:
            if p.poll() is None:
                p.kill()
                try:
                    p.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    pass
        self._procs.clear()
        # Deleting a namespace destroys the veth end inside it, and with it the peer.
        for name in reversed(self._created):
            _ip("netns", "del", name, check=False)
        self._created.clear()
        # In case the veth was created but never moved into a namespace.
        _ip("link", "del", self.a.ifname, check=False)

    def __enter__(self) -> "NetnsPair":
        return self.create()

    def __exit__(self, *exc) -> None:
        self.close()

    # ---- running commands -----------------------------------------------------------------
    def side(self, which: str | Side) -> Side:
        if isinstance(which, Side):
            return which
        return {"a": self.a, "b": self.b, self.a.name: self.a, self.b.name: self.b}[which]

    def command(self, which: str | Side, argv: Sequence[str]) -> list[str]:
        """The argv that runs ``argv`` inside the namespace."""
        return ["ip", "netns", "exec", self.side(which).name, *map(str, argv)]

    def popen(self, which: str | Side, argv: Sequence[str], **kw) -> subprocess.Popen:
        """Start ``argv`` inside namespace ``which`` ("a" or "b"); killed on close() if still running."""
        p = subprocess.Popen(self.command(which, argv), **kw)
        self._procs.append(p)
        return p

    def run(self, which: str | Side, argv: Sequence[str], **kw) -> subprocess.CompletedProcess:
        return subprocess.run(self.command(which, argv), **kw)


def run_in_netns(name: str, argv: Sequence[str], **kw) -> subprocess.Popen:
    """Popen ``argv`` inside the named namespace (``ip netns exec NAME …``)."""
    return subprocess.Popen(["ip", "netns", "exec", name, *map(str, argv)], **kw)
