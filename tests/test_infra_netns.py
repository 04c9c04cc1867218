"""Two network namespaces stand in for two hosts: torchrun's c10d rendezvous joins them and a
gloo all_reduce runs across the veth pair (10.77.0.1 <-> 10.77.0.2).

What is needed, as on a real multi-node cluster where hostnames do not resolve:
  * the rendezvous host's agent gets ``--rdzv_conf=is_host=1`` (it cannot tell from the endpoint
    address that it is the host, because its hostname does not resolve inside the namespace);
  * every agent gets ``--local_addr=<its own address>`` (advertised to the other agents and used
    as MASTER_ADDR for the workers);
  * gloo gets ``GLOO_SOCKET_IFNAME=<the veth name on that side>``.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

if str(Path(__file__).resolve().parents[1]) not in sys.path:  # `pytest` without `python -m`
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from helpers import HUNG  # noqa: E402
from tests.infra import netns as netns_mod
from tests.infra.fixtures import netns_pair  # noqa: F401  (pytest fixture)

WORKER = r"""
import os, torch, torch.distributed as dist
dist.init_process_group("gloo")
rank, world = dist.get_rank(), dist.get_world_size()
t = torch.tensor([float(rank + 1), 10.0 * (rank + 1)])
dist.all_reduce(t)
dist.barrier()
with open(os.path.join(os.environ["OUT_DIR"], f"rank{rank}.txt"), "w") as f:
    f.write(f"{world} {t[0].item()} {t[1].item()} {os.environ['MASTER_ADDR']}\n")
dist.destroy_process_group()
"""

PORT = 29400


def _torchrun(ns, side, worker, out_dir, is_host):
    argv = [
        sys.executable, "-m", "torch.distributed.run",
        "--nnodes=2", "--nproc_per_node=1",
        "--rdzv_backend=c10d", f"--rdzv_endpoint={ns.a.addr}:{PORT}", "--rdzv_id=pt-netns-test",
        f"--local_addr={side.addr}",
        "--max_restarts=0",
    ]
    if is_host:
        argv.append("--rdzv_conf=is_host=1,join_timeout=60")
    else:
        argv.append("--rdzv_conf=join_timeout=60")
    argv.append(str(worker))
    env = dict(os.environ, GLOO_SOCKET_IFNAME=side.ifname, OUT_DIR=str(out_dir),
               OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    env.pop("MASTER_ADDR", None)
    env.pop("MASTER_PORT", None)
    return ns.popen(side, argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def test_gloo_all_reduce_across_two_namespaces(netns_pair, tmp_path):
    ns = netns_pair
    worker = tmp_path / "worker.py"
    worker.write_text(WORKER)
    t0 = time.monotonic()
    host = _torchrun(ns, ns.a, worker, tmp_path, is_host=True)
    time.sleep(0.5)
    other = _torchrun(ns, ns.b, worker, tmp_path, is_host=False)
    outs = {}
    for name, p in (("a", host), ("b", other)):
        try:
            outs[name], _ = p.communicate(timeout=HUNG)
        except subprocess.TimeoutExpired:
            p.kill()
            outs[name] = p.communicate()[0]
    print(f"\n[netns] torchrun across namespaces took {time.monotonic() - t0:.1f}s")
    for name, p in (("a", host), ("b", other)):
        assert p.returncode == 0, f"torchrun in namespace {name} failed:\n{outs[name]}"
    results = [(tmp_path / f"rank{r}.txt").read_text().split() for r in (0, 1)]
    for world, x, y, master in results:
        assert int(world) == 2
        assert float(x) == 3.0 and float(y) == 30.0
        assert master in (ns.a.addr, ns.b.addr)


def test_netns_cleanup_leaves_nothing_behind():
    reason = netns_mod.unavailable_reason()
    if reason:
        import pytest
        pytest.skip(reason)
    with netns_mod.NetnsPair() as ns:
        names = (ns.a.name, ns.b.name)
        assert set(names) <= set(netns_mod.list_netns())
        # Loopback and the veth address work inside; the peer is reachable over TCP.
        srv = ns.popen("a", [sys.executable, "-c",
                             "import socket;s=socket.socket();s.setsockopt(socket.SOL_SOCKET,socket.SO_REUSEADDR,1);"
                             f"s.bind(('{ns.a.addr}',{PORT + 1}));s.listen();c,_=s.accept();c.sendall(b'ok')"])
        cli = ns.run("b", [sys.executable, "-c",
                           "import socket,time\n"
                           "for i in range(50):\n"
                           "    try:\n"
                           f"        s=socket.create_connection(('{ns.a.addr}',{PORT + 1}),timeout=2);break\n"
                           "    except OSError: time.sleep(0.1)\n"
                           "print(s.recv(2).decode())"], capture_output=True, text=True, timeout=30)
        assert cli.stdout.strip() == "ok", cli.stderr
        srv.wait(timeout=10)
    left = set(netns_mod.list_netns()) & set(names)
    assert not left, f"namespaces left behind: {left}"
