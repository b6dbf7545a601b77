"""More than one machine, rehearsed on one: two `medcap run` launchers, one process each, meet at
a c10d rendezvous on 127.0.0.1 (torchrun's own arguments, passed through) and train under FSDP2
or evaluate sharded on gloo, as two nodes would. They must give what one launcher gives."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from test_evaluation import _same_metrics, eval_overrides, read_csv, ws  # noqa: F401 (ws: the fixture)
from test_training import medcap, read_losses, train_args, workspace  # noqa: F401 (workspace: the fixture)

ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launcher_env() -> dict[str, str]:
    """The workers run the recipe files by path: medcap comes from this checkout. One thread per
    worker, as torchrun gives the one-launcher run (it sets OMP_NUM_THREADS=1 only when
    --nproc_per_node > 1): with two threads the matmuls reduce in another order, and the
    losses differ in the 7th digit."""
    return {**os.environ, "OMP_NUM_THREADS": "1",
            "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}  # fmt: skip


def node_flags(port: int, *conf: str) -> list[str]:
    rdzv_conf = ",".join(["join_timeout=300", *conf])
    return ["--nnodes", "2", "--nproc_per_node", "1", "--rdzv_backend", "c10d",
            "--rdzv_endpoint", f"127.0.0.1:{port}", "--rdzv_id", "rehearsal", "--rdzv_conf", rdzv_conf]  # fmt: skip


def two_nodes(tmp_path: Path, args_for: Callable[[int], list[str]], timeout: float = 900) -> list[tuple[int, str]]:
    """Start launcher 0, then launcher 1 (``--node_rank`` R; c10d assigns the ranks in the order
    the nodes join), each ``medcap run <torchrun flags> <args_for(R)>``; (exit code, output) of each."""
    port = free_port()
    procs, logs = [], []
    try:
        for node in (0, 1):
            log = open(tmp_path / f"node{node}.log", "w+")  # files, not pipes: no launcher blocks on a full pipe
            logs.append(log)
            cmd = [sys.executable, "-m", "medcap.cli", "run", *node_flags(port), "--node_rank", str(node),
                   *args_for(node)]  # fmt: skip
            procs.append(subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT, env=launcher_env()))
        deadline = time.monotonic() + timeout
        for p in procs:
            p.wait(timeout=max(1, deadline - time.monotonic()))
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    results = []
    for p, log in zip(procs, logs):
        log.seek(0)
        results.append((p.returncode, log.read()))
        log.close()
    return results


def all_ok(results: list[tuple[int, str]]) -> None:
    for node, (code, out) in enumerate(results):
        assert code == 0, f"node {node} exited {code}:\n{out[-5000:]}"


@pytest.mark.slow
def test_two_nodes_train_to_the_same_weights_as_one_launcher(workspace, tmp_path):  # noqa: F811
    """FSDP2 over two launchers (one rank each) against ``--nproc_per_node 2`` on one: the same
    losses and bitwise the same checkpoint, written once, by rank 0."""
    common = ("epochs=2", "optimizer.lr=1e-2", "batch_size=2", "lr_scheduler.num_warmup_steps=1")

    def dist_args(out: Path) -> list[str]:
        args = train_args(workspace, out, *common)[1:]  # without "run"
        args[0] = "full_finetune_distributed"
        args[2] = "llama3/8B_full"
        return args

    one = tmp_path / "one_launcher"
    medcap("run", "--nproc_per_node", "2", *dist_args(one))
    two = tmp_path / "two_nodes"
    all_ok(two_nodes(tmp_path, lambda node: dist_args(two)))

    losses = read_losses(two / "log")
    assert len(losses) == 4  # 8 records / (2 ranks x batch 2) = 2 steps an epoch, 2 epochs
    assert losses == read_losses(one / "log")
    assert sorted(p.name for p in (two / "checkpoint").glob("*.pt")) == sorted(
        p.name for p in (one / "checkpoint").glob("*.pt")
    )
    a = torch.load(two / "checkpoint" / "meta_model_1.pt", weights_only=True)
    b = torch.load(one / "checkpoint" / "meta_model_1.pt", weights_only=True)
    for part in ("visual", "projector"):
        assert a[part].keys() == b[part].keys()
        assert all(torch.equal(a[part][k], b[part][k]) for k in a[part]), part
    first = torch.load(two / "checkpoint" / "meta_model_0.pt", weights_only=True)
    assert not all(torch.equal(first["visual"][k], a["visual"][k]) for k in a["visual"])  # it trained
    assert not list((two / "checkpoint").glob(".medcap-shared-*"))  # the shared-folder probe is removed


@pytest.mark.slow
def test_two_nodes_evaluate_every_item_once_as_one_process(ws, tmp_path):  # noqa: F811
    """Sharded evaluation over two launchers: each rank answers its share by global rank, rank 0
    merges: the same CSVs (bytes: every item once, in order, the same answers) and metrics as one
    process, and no part file left."""
    common = ["generate", "--config", "custom_generation_config", "test_slake=True", f"dataset_source={ws['slake']}",
              "vqa_mode=describe_then_answer", "batch_size=2", f"vision_checkpoint={ws['ckpt']}/meta_model_*.pt"]  # fmt: skip
    one, two = tmp_path / "one", tmp_path / "two"
    medcap("run", *common, *eval_overrides(ws, one))
    all_ok(two_nodes(tmp_path, lambda node: [*common, *eval_overrides(ws, two)]))
    for tag in ("meta_model_0", "meta_model_1"):
        assert (two / f"test_out_slake_{tag}.csv").read_bytes() == (one / f"test_out_slake_{tag}.csv").read_bytes()
        indices = [r["index"] for r in read_csv(two / f"test_out_slake_{tag}.csv")]
        assert len(indices) == len(set(indices)) >= 4 and all(r for r in indices)
        _same_metrics(two / f"metrics_{tag}.json", one / f"metrics_{tag}.json")
    assert not list(two.glob(".*.rank*")) and not list(two.glob(".medcap-shared-*"))


@pytest.mark.slow
def test_two_nodes_without_a_shared_output_folder_fail_with_one_line(ws, tmp_path):  # noqa: F811
    """Each node given its own output_dir, as two machines without a shared filesystem would
    have: both stop before any weight is read, saying which folder must be shared."""
    common = ["generate", "--config", "custom_generation_config", "test_slake=True", f"dataset_source={ws['slake']}",
              f"vision_checkpoint={ws['ckpt']}/meta_model_0.pt"]  # fmt: skip
    results = two_nodes(tmp_path, lambda node: [*common, *eval_overrides(ws, tmp_path / f"node{node}_out")],
                        timeout=300)  # fmt: skip
    for code, out in results:
        assert code == 1
        assert "is not one folder shared by every node" in out and "cannot see the file rank 0 wrote" in out, out[-3000:]
        # the last line: this node's own failure, or (the other node having gone first, taking the
        # c10d store with it) the run lost, never "cannot reach the rendezvous"
        last = out.rstrip().splitlines()[-1]
        assert last.startswith("error: generate.py: rank 0") or last.startswith("error: lost the rendezvous"), last
    assert not list(tmp_path.glob("node*_out/test_out_*"))  # nothing answered


def test_a_node_that_cannot_meet_the_others_fails_naming_the_endpoint(tmp_path, capsys):
    """No endpoint on several nodes: refused at once. A node that cannot reach the endpoint, and
    the first node when the others never come, each fail within their rendezvous timeouts with
    one line naming the endpoint, instead of waiting torchrun's defaults (minutes)."""
    from medcap.cli import main

    with pytest.raises(SystemExit) as exit_:
        main(["run", "--nnodes", "2", "--nproc_per_node", "1", "generate", "--config", "custom_generation_config"])
    assert exit_.value.code == 1
    assert "--rdzv_endpoint HOST:PORT" in capsys.readouterr().err

    def node(port: int, conf: str) -> subprocess.Popen:
        cmd = [sys.executable, "-m", "medcap.cli", "run", "--nnodes", "2", "--nproc_per_node", "1",
               "--rdzv_backend", "c10d", "--rdzv_endpoint", f"127.0.0.1:{port}", "--rdzv_conf", conf,
               "generate", "--config", "custom_generation_config"]  # fmt: skip
        return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT,
                                env=launcher_env())  # fmt: skip

    start = time.monotonic()
    # a second machine sees the endpoint as another host's: it connects as a client (is_host=false);
    # nothing listens on its port. The first node hosts its own, and nobody else comes.
    client_port, host_port = free_port(), free_port()
    while host_port == client_port:
        host_port = free_port()
    client, alone = node(client_port, "is_host=false,read_timeout=2"), node(host_port, "join_timeout=3")
    (_, client_err), (_, alone_err) = client.communicate(timeout=120), alone.communicate(timeout=120)
    assert time.monotonic() - start < 90
    assert client.returncode == 1 and alone.returncode == 1
    last = client_err.rstrip().splitlines()[-1]
    assert last.startswith(f"error: cannot reach the rendezvous at 127.0.0.1:{client_port} (c10d)"), client_err[-3000:]
    assert "read_timeout=2 s" in last
    last = alone_err.rstrip().splitlines()[-1]
    assert last.startswith(f"error: the rendezvous at 127.0.0.1:{host_port} (c10d): not every node"), alone_err[-3000:]
    assert "join_timeout=3 s" in last
