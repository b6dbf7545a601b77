"""``medcap estimate ... nproc=2``: one rank's FSDP2 step traced on fake tensors and a fake
process group, against the same step run by two real processes (gloo, CPU) and measured by the
same tracker (``FSDPMemTracker``) on real tensors.

Run as a script (``torchrun --nproc_per_node 2 tests/test_estimate_fsdp.py OUT``) it is that
real step: each rank writes the peak its tracker saw to ``OUT/rank{R}.json``.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from test_estimate import ANSWER, IMAGE_TOKENS, SEQ, SPEC, device, options, train_cfg

from medcap.distributed import fully_shard_model
from medcap.errors import ConfigError
from medcap.estimate import estimate, settings_for
from medcap.estimate.fsdp import FSDPStepTracker, as_step_kinds
from medcap.estimate.model import model_on_meta
from medcap.models.llms import rope_init

ROOT = Path(__file__).resolve().parents[1]
BATCH = 2


def measure_one_rank(out: Path) -> None:
    """One rank of the real FSDP2 step: the model with random weights, sharded as the recipe
    shards it, AdamW stepped once on zero gradients (its state, as from step 2 on), then one
    step through the model's own code under the tracker."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh

    dist.init_process_group("gloo")
    rank = dist.get_rank()
    settings = settings_for(train_cfg())
    torch.manual_seed(0)
    model = model_on_meta(
        settings, settings.torch_dtype, checkpointing=settings.enable_activation_checkpointing
    )
    model = model.to_empty(device="cpu")
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.02)
    rope_init(model.decoder)
    model = fully_shard_model(model, init_device_mesh("cpu", (dist.get_world_size(),)))
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4)
    for p in params:
        p.grad = torch.zeros_like(p)
    opt.step()
    opt.zero_grad(set_to_none=True)
    torch.manual_seed(1 + rank)
    tokens = torch.randint(0, SPEC.vocab_size, (BATCH, SEQ))
    tokens[:, 1 : 1 + IMAGE_TOKENS] = model.image_token_id
    labels = torch.full_like(tokens, -100)
    labels[:, -ANSWER:] = tokens[:, -ANSWER:]
    size = model.visual.preprocess.size
    images = torch.randn(BATCH, 3, size, size)
    tracker = FSDPStepTracker(model, opt)
    tracker.track_inputs((tokens, labels, images))
    with tracker:
        logits, targets = model(tokens, images=images, labels=labels)
        F.cross_entropy(logits, targets, reduction="sum").backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    (out / f"rank{rank}.json").write_text(json.dumps(as_step_kinds(tracker.peak())))
    dist.barrier()
    dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def measured(tmp_path_factory) -> list[dict[str, int]]:
    out = tmp_path_factory.mktemp("fsdp_measured")
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(ROOT), str(ROOT / "tests")]),
        "OMP_NUM_THREADS": "1",
    }
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
         "--master_port", str(_free_port()), str(Path(__file__)), str(out)],
        capture_output=True, text=True, cwd=ROOT, env=env, timeout=600,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    return [json.loads((out / f"rank{r}.json").read_text()) for r in range(2)]


@pytest.fixture(scope="module")
def per_rank():
    return estimate(train_cfg(), options(nproc=2), device(2**34))


@pytest.mark.slow  # two torchrun processes: about a minute on 2 shared cores
def test_per_rank_estimate_within_15_percent_of_two_real_fsdp2_processes(per_rank, measured):
    for peak in measured:  # both ranks hold the same shapes
        assert abs(per_rank.peak_bytes - peak["Total"]) / peak["Total"] < 0.15, (per_rank.breakdown, peak)


def test_sharding_saves_memory_and_the_breakdown_sums_to_the_total(per_rank):
    single = estimate(train_cfg(), options(), device(2**34))
    assert per_rank.peak_bytes < single.peak_bytes
    assert sum(per_rank.breakdown.values()) == per_rank.peak_bytes
    # each rank keeps half of every weight and of the optimizer state
    assert per_rank.breakdown["frozen weights"] == pytest.approx(
        single.breakdown["frozen weights"] / 2, rel=0.05
    )
    assert per_rank.breakdown["optimizer state"] == pytest.approx(
        single.breakdown["optimizer state"] / 2, rel=0.05
    )
    assert per_rank.breakdown["all-gathered weights"] > 0


def test_what_the_distributed_recipe_refuses_is_refused():
    with pytest.raises(ConfigError, match="optimizer_in_bwd=True runs in one process"):
        estimate(train_cfg("optimizer_in_bwd=True"), options(nproc=2), device(2**34))
    with pytest.raises(ConfigError, match="bitsandbytes optimizers cannot run under FSDP2"):
        estimate(
            train_cfg("optimizer._component_=bitsandbytes.optim.AdamW8bit"), options(nproc=2), device(2**34)
        )
    with pytest.raises(ConfigError, match="nproc=0"):
        estimate(train_cfg(), options(nproc=0), device(2**34))


def test_distributed_preflight_checks_one_ranks_share(per_rank):
    """A budget between one rank's FSDP2 peak and the one-device peak: two ranks fit, one does not."""
    from medcap.estimate.preflight import PreflightError, preflight

    settings = settings_for(train_cfg())
    single = estimate(train_cfg(), options(), device(2**34))
    budget = int((per_rank.peak_bytes + single.peak_bytes) / 2 * 1.05)  # preflight counts 5% for the allocator
    assert per_rank.required_bytes < budget < single.required_bytes
    preflight(settings, torch.device("cuda"), world_size=2, mem_get_info=lambda: (budget, budget))
    with pytest.raises(PreflightError, match="does not fit"):
        preflight(settings, torch.device("cuda"), mem_get_info=lambda: (budget, budget))
    small = per_rank.peak_bytes // 2
    with pytest.raises(PreflightError, match="estimated peak per rank of 2, .* does not fit"):
        preflight(settings, torch.device("cuda"), world_size=2, mem_get_info=lambda: (small, small))


def test_distributed_recipe_runs_the_preflight_before_the_process_group(monkeypatch, tmp_path):
    """Under torchrun the recipe refuses with one rank's estimate before any process group or file."""
    import torch.distributed as dist
    from omegaconf import OmegaConf

    from medcap.cli import load_recipe
    from medcap.estimate.preflight import PreflightError

    recipe = load_recipe("full_finetune_single_device")
    seen = {}

    def refuse(settings, device, world_size=1):
        seen["world_size"], seen["group"] = world_size, dist.is_initialized()
        raise PreflightError("preflight: refused")

    monkeypatch.setattr(recipe, "preflight", refuse)
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("LOCAL_RANK", "0")
    cfg = train_cfg("device=cpu", f"tokenizer.path={tmp_path}/missing.model", f"output_dir={tmp_path}")
    with pytest.raises(PreflightError):
        recipe.VisionFinetuneRecipe(OmegaConf.create(OmegaConf.to_container(cfg, resolve=True)), distributed=True)
    assert seen == {"world_size": 4, "group": False}


if __name__ == "__main__":
    measure_one_rank(Path(sys.argv[1]))
