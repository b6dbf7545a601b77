"""The memory switches change memory, not the run: activation checkpointing of the frozen LLM's
layers, ``optimizer_in_bwd=True`` and bitsandbytes' 8-bit AdamW (it runs on the CPU), each
against the same tiny run without it (``tests/test_training.py``'s workspace and command)."""

from __future__ import annotations

import pytest
import torch
from test_training import medcap, read_losses, train_args, workspace  # noqa: F401 - the fixture

pytestmark = pytest.mark.slow  # five short training runs
# two epochs of two steps (8 records, batch 4); no clipping, which optimizer_in_bwd cannot do
STEPS = ("epochs=2", "clip_grad_norm=null", "optimizer.lr=1e-3", "lr_scheduler.num_warmup_steps=1")


@pytest.fixture(scope="module")
def baseline(workspace, tmp_path_factory):  # noqa: F811
    out = tmp_path_factory.mktemp("baseline")
    medcap(*train_args(workspace, out, *STEPS))
    losses = read_losses(out / "log")
    assert len(losses) == 4
    return losses


def run(workspace, tmp_path, *switch: str) -> list[float]:  # noqa: F811
    medcap(*train_args(workspace, tmp_path / "run", *STEPS, *switch))
    return read_losses(tmp_path / "run" / "log")


def test_activation_checkpointing_gives_the_same_losses(workspace, baseline, tmp_path):  # noqa: F811
    losses = run(workspace, tmp_path, "enable_activation_checkpointing=True")
    assert losses == pytest.approx(baseline, rel=1e-6)


def test_optimizer_in_backward_gives_the_same_losses(workspace, baseline, tmp_path):  # noqa: F811
    losses = run(workspace, tmp_path, "optimizer_in_bwd=True")
    # the same AdamW per tensor; the loss is divided by its token count before backward instead of
    # the gradients after it, so the last bits may differ
    assert losses == pytest.approx(baseline, rel=1e-4)
    state = torch.load(tmp_path / "run" / "checkpoint" / "recipe_state.pt", weights_only=True)
    # one optimizer per trainable tensor, saved for resuming
    assert len(state["optimizer"]["in_backward"]) > 1


def test_optimizer_in_backward_refuses_clipping(workspace, tmp_path):  # noqa: F811
    args = train_args(workspace, tmp_path, "optimizer_in_bwd=True", "clip_grad_norm=1.0")
    proc = medcap(*args, check=False)
    assert proc.returncode != 0
    assert "optimizer_in_bwd=True" in proc.stderr and "clip_grad_norm=null" in proc.stderr


def test_8bit_adamw_runs_on_the_cpu_close_to_adamw(workspace, baseline, tmp_path):  # noqa: F811
    losses = run(workspace, tmp_path, "optimizer._component_=bitsandbytes.optim.AdamW8bit")
    assert losses[0] == pytest.approx(baseline[0], rel=1e-6)  # before any update: the same model
    # then quantised moments: close to AdamW, not equal
    assert losses == pytest.approx(baseline, rel=0.05)
    assert losses != pytest.approx(baseline, rel=1e-7)
    state = torch.load(tmp_path / "run" / "checkpoint" / "recipe_state.pt", weights_only=False)

    def tensors(tree):  # bitsandbytes nests its quantised state in a dict of its own
        if isinstance(tree, dict):
            return [t for v in tree.values() for t in tensors(v)]
        return [tree] if isinstance(tree, torch.Tensor) else []

    assert any(t.dtype == torch.uint8 for t in tensors(state["optimizer"]["state"]))
