"""Start the workers with torch's elastic agent: on this node, or on several nodes without SLURM.

One node: `--standalone`. Several nodes (launcher.nnodes > 1): run the same `python -m launch` on
every node with launcher.rdzv_endpoint=<first node>[:port]; the agents meet in a c10d rendezvous
there. launch/slurm.py builds the same agent command for `srun`.
"""

from __future__ import annotations

import fcntl
import functools
import socket
import struct
import sys

from launch.plan import Plan
from pretrain.config import Config, ConfigError

DEFAULT_PORT = 29500


def agent_command(cfg: Config, plan: Plan, overrides: list[str], endpoint: str | None, rdzv_id: str,
                  is_host: bool | None = None) -> list[str]:
    """The elastic agent's command (torchrun's arguments; see launch/agent.py) as an argument list.

    endpoint None = a one-node run (`--standalone`). is_host True tells the agent it hosts the
    rendezvous (needed where hostnames do not resolve); None lets torchrun work it out.
    """
    launcher = cfg.launcher
    command = [sys.executable, "-m", "launch.agent", f"--nproc_per_node={plan.nproc_per_node}"]
    if endpoint is None:
        command.append("--standalone")
    else:
        conf = f"join_timeout={launcher.rdzv_timeout},read_timeout={launcher.rdzv_timeout}"
        if is_host:
            conf += ",is_host=1"
        command += [f"--nnodes={plan.nnodes}", "--rdzv_backend=c10d", f"--rdzv_endpoint={endpoint}",
                    f"--rdzv_id={rdzv_id}", f"--rdzv_conf={conf}"]
        if launcher.local_addr:
            command.append(f"--local_addr={launcher.local_addr}")
    command.append(f"--max_restarts={launcher.max_restarts}")
    if torchrun_accepts("--shutdown_timeout"):  # torchrun gained it after torch 2.11; older ones wait 30 s
        command.append(f"--shutdown_timeout={launcher.shutdown_timeout}")
    return [*command, "-m", "pretrain.train", *overrides]


@functools.cache
def torchrun_accepts(option: str) -> bool:
    """Whether this torch's torchrun has `option` (the launcher runs on torch versions of several years)."""
    from torch.distributed.run import get_args_parser

    return any(option in action.option_strings for action in get_args_parser()._actions)


def torchrun_command(cfg: Config, plan: Plan, overrides: list[str]) -> list[str]:
    """The worker command as an argument list (user strings are never pasted into a shell)."""
    launcher = cfg.launcher
    if launcher.nnodes == 1 and not launcher.rdzv_endpoint:
        return agent_command(cfg, plan, overrides, None, "")
    if not launcher.rdzv_endpoint:
        raise ConfigError(f"config error: launcher.rdzv_endpoint: launcher.nnodes={launcher.nnodes} without SLURM "
                          "needs the rendezvous address: run `python -m launch launcher.nnodes=N "
                          "launcher.rdzv_endpoint=<first node>[:port] ...` on every node (or use launcher=slurm)")
    host, _, port = launcher.rdzv_endpoint.partition(":")
    port = port or str(launcher.rdzv_port or DEFAULT_PORT)
    is_host = bool(launcher.local_addr) and launcher.local_addr == host
    return agent_command(cfg, plan, overrides, f"{host}:{port}", f"pretrain-{cfg.run.name}", is_host or None)


def interface_of(addr: str) -> str | None:
    """The name of the network interface that has IPv4 address addr on this machine, if any."""
    siocgifaddr = 0x8915
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        for _, name in socket.if_nameindex():
            try:
                packed = fcntl.ioctl(s.fileno(), siocgifaddr, struct.pack("256s", name.encode()[:15]))
            except OSError:
                continue  # no IPv4 address
            if socket.inet_ntoa(packed[20:24]) == addr:
                return name
    return None


def worker_env(cfg: Config, environ: dict[str, str]) -> dict[str, str]:
    """Environment the agents and workers need beyond the caller's (only what is not already set).

    With launcher.local_addr, gloo and NCCL use that address's interface: on a machine with several
    networks they otherwise pick the one the hostname resolves to, which other nodes may not reach.
    """
    env: dict[str, str] = {}
    if cfg.launcher.local_addr:
        ifname = interface_of(cfg.launcher.local_addr)
        if ifname is None:
            raise ConfigError(f"config error: launcher.local_addr: no network interface here has address "
                              f"{cfg.launcher.local_addr}; give this node's own address")
        for key in ("GLOO_SOCKET_IFNAME", "NCCL_SOCKET_IFNAME"):
            if key not in environ:
                env[key] = ifname
    return env
