"""``medcap estimate`` on a tiny model: the traced (fake-tensor) peak against the same step run on
real tensors, fits / does not fit against a budget, the largest batch, the breakdown, errors."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from helpers import TinyLlama

from medcap.errors import ConfigError
from medcap.estimate import Device, Options, estimate, load_config, settings_for
from medcap.estimate.model import model_on_meta
from medcap.estimate.tracing import StepMemTracker
from medcap.models.llms import rope_init
from medcap.settings import UnknownConfigKeyError

ROOT = Path(__file__).resolve().parents[1]
SPEC = TinyLlama(vocab_size=512, layers=2, dim=64, ffn=128, heads=4, kv_heads=2, max_seq_len=512)
SEQ, IMAGE_TOKENS, ANSWER = 96, 4, 8
# figures that make time irrelevant to these tests; memory is what they check
SLOW = dict(
    bf16_flops=1e12, fp32_flops=1e12, bandwidth=1e11, efficiency=1.0, op_overhead_s=0.0, fragmentation=0.0
)


def device(memory_bytes: int) -> Device:
    return Device("test budget", memory_bytes, reserve_bytes=0, **SLOW)


def train_overrides(*extra: str) -> list[str]:
    return [*SPEC.overrides(), "vision=vit_tiny", f"num_image_tokens={IMAGE_TOKENS}", "batch_size=2",
            f"dataset.max_seq_len={SEQ}", "dtype=fp32", "clip_grad_norm=null", *extra]  # fmt: skip


def train_cfg(*extra: str):
    return load_config("llama3/8B_full_single_device", train_overrides(*extra))


def options(**kw) -> Options:
    return Options(answer_tokens=ANSWER, switches=False, max_batch=False, **kw)


def measured_peak(cfg, batch_size: int) -> int:
    """The same training step on real tensors through the model's own (value-dependent) code,
    measured by MemTracker: the estimate's fake tensors and fixed shapes are what is checked."""
    settings = settings_for(cfg)
    torch.manual_seed(0)
    model = model_on_meta(
        settings, settings.torch_dtype, checkpointing=settings.enable_activation_checkpointing
    )
    model = model.to_empty(device="cpu")
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.02)
    rope_init(model.decoder)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4)
    for p in params:
        p.grad = torch.zeros_like(p)
    opt.step()
    opt.zero_grad(set_to_none=True)
    tokens = torch.randint(0, SPEC.vocab_size, (batch_size, SEQ))
    tokens[:, 1 : 1 + IMAGE_TOKENS] = model.image_token_id
    labels = torch.full_like(tokens, -100)
    labels[:, -ANSWER:] = tokens[:, -ANSWER:]
    size = model.visual.preprocess.size
    images = torch.randn(batch_size, 3, size, size)
    tracker = StepMemTracker()
    tracker.track_external(model, opt, tokens, labels, images)
    with tracker:
        logits, targets = model(tokens, images=images, labels=labels)
        F.cross_entropy(logits, targets, reduction="sum").backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    return tracker.peak()["Total"]


@pytest.fixture(scope="module")
def traced():
    """The estimate at batch 2 and the measured peaks at batch 2 and 3."""
    cfg = train_cfg()
    est = estimate(cfg, options(), device(2**34))
    return est, {2: measured_peak(cfg, 2), 3: measured_peak(cfg, 3)}


def test_estimate_within_15_percent_of_measured_peak(traced):
    est, measured = traced
    assert est.peak_bytes > 0
    assert abs(est.peak_bytes - measured[2]) / measured[2] < 0.15, (est.peak_bytes, measured[2])


def test_estimate_matches_measured_peak_without_checkpointing():
    cfg = train_cfg("enable_activation_checkpointing=False")
    est = estimate(cfg, options(), device(2**34))
    measured = measured_peak(cfg, 2)
    assert abs(est.peak_bytes - measured) / measured < 0.15, (est.peak_bytes, measured)


def test_breakdown_sums_to_total_and_names_its_parts(traced):
    est, _ = traced
    assert sum(est.breakdown.values()) == est.peak_bytes
    settings = settings_for(train_cfg())
    model = model_on_meta(settings, settings.torch_dtype)
    trainable = sum(p.numel() * 4 for p in model.parameters() if p.requires_grad)
    frozen = sum(p.numel() * 4 for p in model.parameters() if not p.requires_grad)
    # every weight is resident at the peak; AdamW holds two fp32 moments per trainable value
    assert est.breakdown["trainable weights"] == pytest.approx(trainable, rel=0.02)
    assert est.breakdown["frozen weights"] == pytest.approx(frozen, rel=0.02)
    assert est.breakdown["optimizer state"] >= 2 * trainable


def test_an_unset_token_count_is_each_connector_s_own_default():
    """num_image_tokens=null: 32 for the pooled connectors, one per patch for the per-patch ones
    (the estimate once asked patch_mlp for 32 and failed)."""
    for connector, expected in (("cls_mlp", 32), ("patch_mlp", 16), ("patch_question", 17)):
        settings = settings_for(train_cfg(f"connector={connector}", "num_image_tokens=null"))
        assert model_on_meta(settings, settings.torch_dtype).num_image_tokens == expected, connector


def test_fits_decisions_against_a_budget(traced):
    est, measured = traced
    cfg = train_cfg()
    assert estimate(cfg, options(), device(int(measured[2] * 1.2))).fits
    assert not estimate(cfg, options(), device(int(measured[2] * 0.8))).fits


@pytest.mark.slow
def test_largest_batch_that_fits(traced):
    """A budget between the measured peaks at batch 3 and 4 fits batch 3 and no more."""
    _, measured = traced
    cfg = train_cfg()
    budget = device(measured[3] + (measured[3] - measured[2]) // 2)
    est = estimate(cfg, dataclasses.replace(options(), max_batch=True), budget)
    assert est.max_batch_size == 3


@pytest.mark.slow
def test_switches_change_what_they_should():
    est = estimate(train_cfg("enable_activation_checkpointing=False"), dataclasses.replace(options(), switches=True),
                   device(2**34))  # fmt: skip
    rows = {row["change"].split("=")[0]: row for row in est.switches}
    assert rows["dataset.max_seq_len"]["peak_bytes"] < est.peak_bytes
    assert rows["optimizer._component_"]["delta_bytes"] < 0  # 8-bit state is a quarter of fp32's
    assert rows["dtype"]["peak_bytes"] < est.peak_bytes  # fp32 -> bf16 frozen LLM
    assert rows["dtype"]["change"] == "dtype=bf16"


def test_generate_kv_cache_is_counted():
    cfg = load_config("custom_generation_config", [*SPEC.overrides(), "vision=vit_tiny",
                      f"num_image_tokens={IMAGE_TOKENS}", "batch_size=3", "max_new_tokens=10", "dtype=fp32"])  # fmt: skip
    est = estimate(cfg, Options(prompt_tokens=40, switches=False, max_batch=False), device(2**34))
    head_dim = SPEC.dim // SPEC.heads
    kv = 2 * SPEC.layers * 3 * SPEC.kv_heads * (40 + 10) * head_dim * 4
    assert est.breakdown["KV cache"] == kv
    assert sum(est.breakdown.values()) == est.peak_bytes
    assert est.step_s > 0


def test_config_typo_is_an_error_naming_the_key():
    with pytest.raises(UnknownConfigKeyError, match="vision_chekpoint.*did you mean vision_checkpoint"):
        estimate(train_cfg("vision_chekpoint=x.pt"), options(), device(2**34))
    with pytest.raises(ConfigError, match="gpu=h1000"):
        estimate(train_cfg("gpu=h1000"))


@pytest.mark.slow
def test_cli_prints_the_table_then_one_json_line():
    proc = subprocess.run(
        [sys.executable, "-m", "medcap.cli", "estimate", "--config", "llama3/8B_full_single_device",
         *train_overrides(), "gpu=h100", "dataset_size=100", "switches=False", "max_batch=False"],
        capture_output=True, text=True, cwd=ROOT, timeout=600,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = proc.stdout.strip().splitlines()
    summary = json.loads(lines[-1])
    assert {"peak_bytes", "fits", "max_batch_size", "step_s"} <= set(summary)
    assert summary["fits"] is True and summary["epoch_s"] == pytest.approx(50 * summary["step_s"])
    assert "peak memory" in proc.stdout and "NVIDIA H100" in proc.stdout


def test_preflight_refuses_naming_the_switch_that_fits():
    from medcap.estimate.preflight import PreflightError, preflight

    cfg = train_cfg("enable_activation_checkpointing=False")
    without = estimate(cfg, options(), device(2**34)).peak_bytes
    with_ac = estimate(train_cfg(), options(), device(2**34)).peak_bytes
    assert with_ac < without
    budget = int((with_ac + without) / 2 * 1.05)  # preflight counts 5% for the allocator
    settings = settings_for(cfg)
    with pytest.raises(PreflightError, match=r"does not fit .* set enable_activation_checkpointing=True"):
        preflight(settings, torch.device("cuda"), mem_get_info=lambda: (budget, budget))
    preflight(
        settings, torch.device("cuda"), mem_get_info=lambda: (2 * without, 2 * without)
    )  # fits: no error
    preflight(settings.replace(preflight=False), torch.device("cuda"), mem_get_info=lambda: (1, 1))
    preflight(settings, torch.device("cpu"))  # CPU runs are not checked


def test_recipes_run_the_preflight_before_reading_anything(monkeypatch, tmp_path):
    """The training recipe refuses before the tokenizer or any weight is opened (none exist here)."""
    from omegaconf import OmegaConf

    from medcap.cli import load_recipe
    from medcap.estimate.preflight import PreflightError

    recipe = load_recipe("full_finetune_single_device")

    def refuse(settings, device):
        raise PreflightError("preflight: refused")

    monkeypatch.setattr(recipe, "preflight", refuse)
    cfg = train_cfg("device=cpu", f"tokenizer.path={tmp_path}/missing.model", f"output_dir={tmp_path}")
    run = recipe.VisionFinetuneRecipe(OmegaConf.create(OmegaConf.to_container(cfg, resolve=True)))
    with pytest.raises(PreflightError):
        run.setup()


def test_scaled_rope_models_are_traced():
    """Llama 3.1/3.2's scaled RoPE refuses to run before rope_init: the fake model rebuilds it."""
    cfg = train_cfg("model._component_=torchtune.models.llama3_2._component_builders.llama3_2")
    est = estimate(cfg, options(), device(2**34))
    assert est.peak_bytes > 0 and sum(est.breakdown.values()) == est.peak_bytes
