"""`python -m launch`: the plan and the exact commands (dry run), and elastic restarts that resume
from the latest checkpoint after a worker dies."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from helpers import HUNG, TINY

import launch.__main__ as launch_main
import launch.slurm

REPO = Path(__file__).resolve().parent.parent


def test_dry_run_local_prints_plan_and_torchrun_command(capsys):
    assert launch_main.main(["--dry-run", *TINY, "launcher.nproc_per_node=2", "launcher.max_restarts=3"]) == 0
    out = capsys.readouterr().out
    assert "plan: 1 node(s) x 2 process(es) = 2 ranks = tp 1 x dp 2 | ZeRO-1" in out
    assert "tokens/step" in out and "est. memory per rank" in out
    command = out.split("command: ", 1)[1]
    assert "-m launch.agent --nproc_per_node=2 --standalone --max_restarts=3" in command
    assert "-m pretrain.train model.hidden_size=64" in command


def test_threads_per_process_sets_the_workers_omp_threads(capsys):
    assert launch_main.main(["--dry-run", *TINY, "launcher.nproc_per_node=2", "launcher.threads_per_process=3"]) == 0
    assert "command: OMP_NUM_THREADS=3 " in capsys.readouterr().out
    assert launch_main.main(["--dry-run", *TINY, "launcher.threads_per_process=-1"]) == 2
    assert "launcher.threads_per_process" in capsys.readouterr().err


def test_dry_run_multinode_without_slurm_names_rendezvous():
    out = subprocess.run([sys.executable, "-m", "launch", "--dry-run", "launcher.nnodes=2", "launcher.nproc_per_node=1",
                          "launcher.rdzv_endpoint=127.0.0.1:29411", "launcher.local_addr=127.0.0.1",
                          "launcher.rdzv_timeout=7"], capture_output=True, text=True, cwd=REPO, timeout=HUNG)
    assert out.returncode == 0, out.stderr
    assert "GLOO_SOCKET_IFNAME=lo" in out.stdout  # the interface of launcher.local_addr
    assert ("--nnodes=2 --rdzv_backend=c10d --rdzv_endpoint=127.0.0.1:29411 --rdzv_id=pretrain-default "
            "--rdzv_conf=join_timeout=7,read_timeout=7,is_host=1 --local_addr=127.0.0.1") in out.stdout
    missing = subprocess.run([sys.executable, "-m", "launch", "--dry-run", "launcher.nnodes=2"],
                             capture_output=True, text=True, cwd=REPO, timeout=HUNG)
    assert missing.returncode == 2 and "launcher.rdzv_endpoint" in missing.stderr


def test_dry_run_slurm_outside_allocation_prints_sbatch(capsys, monkeypatch):
    monkeypatch.delenv("SLURM_JOB_ID", raising=False)
    assert launch_main.main(["--dry-run", "launcher=slurm", "model=1b", "parallel.tp=2", "launcher.nnodes=2",
                             "launcher.partition=gpu", "launcher.time=04:00:00"]) == 0
    out = capsys.readouterr().out
    assert "plan: 2 node(s)" in out
    command = out.split("command: ", 1)[1].split()
    assert command[0].endswith("sbatch")
    assert command[1:4] == ["--nodes=2", "--partition=gpu", "--time=04:00:00"]
    assert command.index(str(REPO / "slurm" / "pretrain.sh")) < command.index("model=1b")
    assert "launcher=slurm" not in command  # the script adds it; Hydra rejects it twice


def test_dry_run_slurm_inside_allocation_prints_srun(capsys, monkeypatch):
    monkeypatch.setenv("SLURM_JOB_ID", "4242")
    monkeypatch.setenv("SLURM_JOB_NUM_NODES", "2")
    monkeypatch.setenv("SLURM_JOB_NAME", "my-run")
    monkeypatch.setattr(launch.slurm, "first_node", lambda: "gpu-node-007")
    assert launch_main.main(["--dry-run", "launcher=slurm", *TINY, "launcher.nproc_per_node=4"]) == 0
    out = capsys.readouterr().out
    assert "plan: 2 node(s) x 4 process(es) = 8 ranks" in out
    command = out.split("command: ", 1)[1].split()
    assert command[0].endswith("srun")
    assert ["--nodes=2", "--ntasks=2", "--ntasks-per-node=1", "--kill-on-bad-exit=1"] == command[1:5]
    port = launch.slurm.PORT_BASE + 4242 % launch.slurm.PORT_RANGE
    for arg in ["--nnodes=2", "--nproc_per_node=4", "--rdzv_backend=c10d", f"--rdzv_endpoint=gpu-node-007:{port}",
                "--rdzv_id=slurm-4242", "run.name=my-run-4242"]:  # named after the job: its requeues resume
        assert arg in command


def _workers(pid: int) -> list[int]:
    """Worker processes (children running pretrain.train) of the agent with this pid."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            ppid = int(stat.read_text().rsplit(")", 1)[1].split()[1])
            cmdline = (stat.parent / "cmdline").read_bytes()
        except (OSError, IndexError, ValueError):
            continue
        if ppid == pid and b"pretrain.train" in cmdline:
            found.append(int(stat.parent.name))
    return found


def test_elastic_restart_resumes_after_a_worker_is_killed(tmp_path):
    run_dir, steps = tmp_path / "run", 300
    log = tmp_path / "launch.log"
    with open(log, "w") as out:
        agent = subprocess.Popen([sys.executable, "-m", "launch", *TINY, f"train.max_steps={steps}",
                                  "checkpoint.interval=20", "launcher.nproc_per_node=2", "launcher.max_restarts=1",
                                  f"run.dir={run_dir}"], stdout=out, stderr=subprocess.STDOUT, cwd=REPO)
    try:
        deadline = time.monotonic() + 900  # an upper bound for a loaded machine; ~20 s idle
        while not (run_dir / "checkpoints" / "latest").exists():
            assert agent.poll() is None and time.monotonic() < deadline, log.read_text()[-3000:]
            time.sleep(0.1)
        victims = _workers(agent.pid)
        assert len(victims) == 2, victims
        os.kill(victims[1], signal.SIGKILL)
        assert agent.wait(timeout=HUNG) == 0, log.read_text()[-3000:]
    finally:
        if agent.poll() is None:
            agent.kill()
    text = log.read_text()
    assert "resuming from" in text, text[-3000:]
    assert (run_dir / "checkpoints" / f"step_{steps:08d}").is_dir()


def test_slurm_run_name_is_unique_per_job_and_stable_across_requeues(monkeypatch):
    monkeypatch.setenv("SLURM_JOB_NAME", "pretrain")
    monkeypatch.delenv("SLURM_ARRAY_JOB_ID", raising=False)
    names = []
    for job_id in ("100", "101", "100"):  # two jobs of the same name; the first requeued (same id)
        monkeypatch.setenv("SLURM_JOB_ID", job_id)
        names.append(launch.slurm.job_overrides(["model=tiny"])[-1])
    assert names == ["run.name=pretrain-100", "run.name=pretrain-101", "run.name=pretrain-100"]
    monkeypatch.setenv("SLURM_ARRAY_JOB_ID", "200")
    monkeypatch.setenv("SLURM_ARRAY_TASK_ID", "3")
    assert launch.slurm.job_overrides([])[-1] == "run.name=pretrain-200_3"
    assert launch.slurm.job_overrides(["run.dir=/x"]) == ["run.dir=/x"]  # an explicit run is kept


def test_more_processes_than_gpus_is_a_config_error(capsys):
    import torch

    gpus = torch.cuda.device_count()
    args = ["--dry-run", f"launcher.nproc_per_node={gpus + 1}"] + (["train.device=cuda"] if not gpus else [])
    assert launch_main.main(args) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and ("launcher.nproc_per_node" in err if gpus else "train.device" in err), err


def test_a_world_of_one_needs_no_port():
    """`python -m pretrain.train`, an in-process build() and `torchrun --nproc_per_node=1` meet in an
    in-process store. The port they once picked was free when chosen and taken when bound, so a busy
    machine could fail a run of one with EADDRINUSE; here MASTER_PORT names a port this test holds."""
    import socket

    script = ("import torch, torch.distributed as dist\n"
              "from pretrain.parallel.groups import destroy, init_distributed\n"
              "dims = init_distributed(1, 'cpu')\n"
              "t = torch.ones(2)\n"
              "dist.all_reduce(t)\n"
              "print(dims.world_size, dims.dp, t.tolist())\n"
              "destroy()\n"
              "init_distributed(1, 'cpu')\n"  # a second build in the same process (as tests and notebooks do)
              "print('again', dist.get_world_size())\n")
    with socket.socket() as held:
        held.bind(("127.0.0.1", 0))
        held.listen()
        env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
        env.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(held.getsockname()[1]), PYTHONPATH=str(REPO))
        out = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=HUNG)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.splitlines() == ["1 1 [1.0, 1.0]", "again 1"]


def _launch_two_ranks(tmp_path: Path, *overrides: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "launch", *TINY, "launcher.nproc_per_node=2",
                           f"run.dir={tmp_path / 'run'}", *overrides],
                          capture_output=True, text=True, cwd=REPO, timeout=HUNG)


def test_bad_input_that_every_worker_meets_is_printed_once_without_torchruns_report(tmp_path):
    """Both ranks stop on the missing checkpoint; the agent prints their line once and exits 2."""
    out = _launch_two_ranks(tmp_path, f"checkpoint.init_from={tmp_path / 'nowhere'}")
    assert out.returncode == 2, out.stderr[-3000:]
    assert out.stderr.splitlines() == [f"{tmp_path / 'nowhere'}: no such file or directory; give a step directory, "
                                       "a run's checkpoints/ or a run directory"], out.stderr[-3000:]


def test_a_crashed_worker_is_named_in_one_line_after_the_tracebacks(tmp_path):
    out = _launch_two_ranks(tmp_path, "train.max_steps=4", "faults.kill_step=2", "faults.rank=1")
    assert out.returncode == 1, out.stderr[-3000:]
    last = out.stderr.strip().splitlines()[-1]
    assert last.startswith("launch: rank 1 (pid ") and "was killed by SIGKILL" in last, out.stderr[-3000:]
    assert "ChildFailedError" not in out.stderr and "closing signal" not in out.stderr, out.stderr[-3000:]


def test_each_distinct_worker_line_is_kept_once_lowest_rank_first(tmp_path, monkeypatch, capsys):
    from pretrain import fatal

    monkeypatch.setenv(fatal.ERRORS_DIR_ENV, str(tmp_path))
    for rank, line in [(3, "shard 7 is missing"), (1, "bad value"), (0, "shard 7 is missing"), (12, "bad value")]:
        monkeypatch.setenv("RANK", str(rank))
        fatal.report(line)
    assert fatal.collected(tmp_path) == ["shard 7 is missing", "bad value"]
    assert capsys.readouterr().err == ""
    monkeypatch.delenv(fatal.ERRORS_DIR_ENV)  # no agent: straight to stderr
    fatal.report("bad value")
    assert capsys.readouterr().err == "bad value\n"


def test_workers_die_with_a_killed_agent(tmp_path):
    """A kill -9 of the agent (the OOM killer, or of the launcher's process group: the workers sit in
    sessions of their own) must not leave workers training into the run directory, nor their data
    loader processes behind."""
    run_dir = tmp_path / "run"
    log = tmp_path / "launch.log"
    with open(log, "w") as out:
        agent = subprocess.Popen([sys.executable, "-m", "launch", *TINY, f"train.max_steps={10**6}",
                                  "launcher.nproc_per_node=2", "data.num_workers=1", f"run.dir={run_dir}"],
                                 stdout=out, stderr=subprocess.STDOUT, cwd=REPO)
    try:
        deadline = time.monotonic() + 900  # an upper bound for a loaded machine; ~15 s idle
        while True:  # until both workers train, each with its data loader process started
            workers = _workers(agent.pid)
            loaders = [child for w in workers for child in _children(w)]
            if (run_dir / "metrics.jsonl").exists() and len(workers) == 2 and all(_children(w) for w in workers):
                break
            assert agent.poll() is None and time.monotonic() < deadline, (workers, loaders, log.read_text()[-3000:])
            time.sleep(0.1)
    finally:
        agent.kill()
        agent.wait()
    deadline = time.monotonic() + 300  # a loader still importing torch ends when it gets to its check
    while any(_alive(pid) for pid in workers + loaders) and time.monotonic() < deadline:
        time.sleep(0.1)
    left = {pid: Path(f"/proc/{pid}/stat").read_text()[:120] for pid in workers + loaders if _alive(pid)}
    assert not left, (left, log.read_text()[-3000:])


def _children(pid: int) -> list[int]:
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            if int(stat.read_text().rsplit(")", 1)[1].split()[1]) == pid:
                found.append(int(stat.parent.name))
        except (OSError, IndexError, ValueError):
            continue
    return found


def _alive(pid: int) -> bool:
    """Running, not a zombie waiting for its (re)parent to reap it."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def test_workers_join_the_agents_store_unless_the_run_can_restart(tmp_path):
    """Without restarts the workers use the agent's TCPStore, which already listens, so no port is
    left free between the agent choosing it and worker rank 0 binding it (another socket took it
    once under load: EADDRINUSE). Runs that can restart get a fresh store per attempt instead."""
    script = tmp_path / "report.py"
    script.write_text("import os\nprint('agent store:', os.environ.get('TORCHELASTIC_USE_AGENT_STORE'))\n")
    env = {k: v for k, v in os.environ.items() if k != "TORCH_DISABLE_SHARE_RDZV_TCP_STORE"}
    for restarts, expected in (("0", "True"), ("1", "False")):
        out = subprocess.run([sys.executable, "-m", "launch.agent", "--standalone", "--nproc_per_node=1",
                              f"--max_restarts={restarts}", str(script)],
                             capture_output=True, text=True, cwd=REPO, timeout=HUNG, env=env)
        assert out.returncode == 0, out.stderr[-3000:]
        assert f"agent store: {expected}" in out.stdout, (restarts, out.stdout, out.stderr[-2000:])
