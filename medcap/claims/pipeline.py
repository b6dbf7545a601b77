"""``make claims``: medcap (LLM frozen) against the usual recipe (LLM + LoRA), both trained on
the same image-caption pairs only, evaluated on what neither was trained for.

Every step is a ``medcap run`` command (printed before it runs), on the demo's assets (the
mini SLAKE and SmolLM2-135M-Instruct, built by ``medcap.demo.pipeline.prepare`` and reused):

1. train each variant at each learning rate of the grid on ``slake_train.json`` (captions only,
   no question) for the same number of steps; pick each variant's rate by caption CIDEr on
   ``slake_val.json`` (the validation groups; test is never looked at for this);
2. evaluate both picked models on the test split: the VQA questions (open and closed), the
   same questions reworded (``probes.REWORDINGS``), the captions, and plain-text prompts with
   no image (``probes.TEXT_PROMPTS``: only those the untouched LLM answers right are kept);
3. paired-bootstrap intervals of (a) - (b) per measure, a verdict per claim
   (``claims.json``, ``claims.html``).

    python -m medcap.claims                 # the full run (about 17 minutes on 2 cores)
    python -m medcap.claims --quick         # a check of the wiring: a few steps, a few items
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from medcap.claims.probes import TEXT_PROMPTS, TextPrompt, reword
from medcap.claims.variants import LORA_ALPHA, LORA_RANK, VARIANTS
from medcap.demo.pipeline import (
    EVAL_CONFIG,
    ROOT,
    TRAIN_CONFIG,
    DemoError,
    DemoPaths,
    medcap_run,
    model_overrides,
    prepare,
    run_command,
)
from medcap.evaluation.outputs import EvalOutputs
from medcap.models.checkpoints import epoch_checkpoints

LR_GRID = (3e-4, 1e-3)  # the same grid for both variants


@dataclass(frozen=True)
class Plan:
    """How much each step does: the full run, or ``--quick``."""

    epochs: int
    max_steps_per_epoch: int | None
    warmup_steps: int
    lr_grid: tuple[float, ...]
    limit: int | None  # test items per evaluation (None: all)
    batch_size: int | None = None  # training rows per step (None: the config's)
    text_per_kind: int | None = None  # plain-text prompts asked per kind (None: all of them)

    def text_prompts(self) -> list[TextPrompt]:
        """``TEXT_PROMPTS``, or its first ``text_per_kind`` of each kind (every kind kept)."""
        if self.text_per_kind is None:
            return list(TEXT_PROMPTS)
        seen: dict[str, int] = {}
        out = []
        for p in TEXT_PROMPTS:
            seen[p.kind] = seen.get(p.kind, 0) + 1
            if seen[p.kind] <= self.text_per_kind:
                out.append(p)
        return out

    @classmethod
    def full(cls) -> Plan:
        return cls(epochs=8, max_steps_per_epoch=None, warmup_steps=4, lr_grid=LR_GRID, limit=None)

    @classmethod
    def quick(cls) -> Plan:
        # two steps of two rows (the second, after warmup, changes the weights); 4 text prompts of each kind
        return cls(epochs=1, max_steps_per_epoch=2, warmup_steps=1, lr_grid=LR_GRID[-1:], limit=4, batch_size=2,
                   text_per_kind=4)  # fmt: skip


def lr_tag(lr: float) -> str:
    return f"{lr:.0e}".replace("-0", "-")


def train_variant(paths: DemoPaths, out: Path, variant: str, lr: float, plan: Plan) -> Path:
    """One caption-only training run; the last epoch's checkpoint (earlier ones are removed)."""
    if out.exists():
        shutil.rmtree(out)
    overrides: dict[str, Any] = {
        **model_overrides(paths),
        "output_dir": out,
        "dataset.source": f"[{paths.data / 'slake_train.json'}]",
        "epochs": plan.epochs,
        "optimizer.lr": lr,
        "lr_scheduler.num_warmup_steps": plan.warmup_steps,
        "verify_frozen_llm": True,  # the base LLM is bitwise unchanged in both variants
    }
    if plan.max_steps_per_epoch:
        overrides["max_steps_per_epoch"] = plan.max_steps_per_epoch
    if plan.batch_size:
        overrides["batch_size"] = plan.batch_size
    if variant == "lora":
        overrides |= {"llm_lora_rank": LORA_RANK, "llm_lora_alpha": LORA_ALPHA}
    run_command(medcap_run("full_finetune_single_device", TRAIN_CONFIG, overrides),
                f"train {VARIANTS[variant]} on captions only, lr {lr:g}")  # fmt: skip
    found = epoch_checkpoints(out / "checkpoint")
    if not found:
        raise DemoError(f"training wrote no checkpoint in {out / 'checkpoint'}")
    for older in found[:-1]:
        older.unlink()
    return found[-1]


def generate(paths: DemoPaths, out: Path, checkpoint: Path, what: str, limit: int | None, **task: Any) -> EvalOutputs:
    """One ``medcap run generate`` into a fresh folder."""
    if out.exists():
        shutil.rmtree(out)
    overrides = {**model_overrides(paths), "output_dir": out, "vision_checkpoint": checkpoint, **task}
    if limit:
        overrides["limit"] = limit
    run_command(medcap_run("generate", EVAL_CONFIG, overrides), what)
    return EvalOutputs.for_checkpoint(out, checkpoint)


def reworded_slake(paths: DemoPaths, root: Path) -> Path:
    """A SLAKE root whose test questions are reworded; the images are the mini SLAKE's."""
    root.mkdir(parents=True, exist_ok=True)
    if not (root / "imgs").exists():
        os.symlink(paths.slake / "imgs", root / "imgs", target_is_directory=True)
    rows = json.loads((paths.slake / "test.json").read_text(encoding="utf-8"))
    for row in rows:
        row["original_question"], row["question"] = row["question"], reword(row["question"])
    (root / "test.json").write_text(json.dumps(rows, indent=1), encoding="utf-8")
    return root


def text_answers(paths: DemoPaths, checkpoint: Path | None, prompts: list[TextPrompt]) -> list[str]:
    """Greedy replies to ``prompts`` with no image: the LLM (adapted or not) on its own.
    In process: ``medcap run generate`` answers images; these prompts have none."""
    from omegaconf import OmegaConf

    from medcap.evaluation.answering import Answerer, Decoding
    from medcap.evaluation.tasks import EvalItem, user_message
    from medcap.models.assembly import load_for_inference
    from medcap.settings import GenerateSettings

    cfg = OmegaConf.load(ROOT / "recipes" / "configs" / f"{EVAL_CONFIG}.yaml")
    for key, value in model_overrides(paths).items():
        OmegaConf.update(cfg, key, str(value))
    settings = GenerateSettings.from_config(cfg)
    loaded = load_for_inference(settings, checkpoint)
    answerer = Answerer(loaded.model, loaded.tokenizer, Decoding(max_new_tokens=settings.max_new_tokens),
                        batch_size=settings.batch_size, dtype=loaded.dtype, step=loaded.step)  # fmt: skip
    items = [EvalItem(i, None, [user_message(None, p.prompt)], p.expected) for i, p in enumerate(prompts)]
    replies = {item.index: reply for item, _, reply in answerer.answer(items, two_turn=False)}
    return [replies[i] for i in range(len(items))]


def text_scores(replies: list[str], prompts: list[TextPrompt] = TEXT_PROMPTS) -> list[float]:
    return [float(p.check(r)) for p, r in zip(prompts, replies)]


def select_lr(paths: DemoPaths, work: Path, variant: str, plan: Plan) -> dict[str, Any]:
    """Train at each rate of the grid; keep the one with the best caption CIDEr on validation."""
    runs = []
    for lr in plan.lr_grid:
        run_dir = work / variant / f"lr_{lr_tag(lr)}"
        checkpoint = train_variant(paths, run_dir / "train", variant, lr, plan)
        val = generate(paths, run_dir / "eval_val", checkpoint, f"{variant}, lr {lr:g}: caption the validation images",
                       None, test_metrics=True, dataset_source=paths.data / "slake_val.json")  # fmt: skip
        metrics = val.read_metrics().get("captions", {})
        runs.append({"lr": lr, "checkpoint": str(checkpoint), "val_CIDEr": metrics.get("CIDEr"),
                     "val_ROUGE-L": metrics.get("ROUGE-L")})  # fmt: skip
    best = max(runs, key=lambda r: (r["val_CIDEr"] or 0.0, r["val_ROUGE-L"] or 0.0))  # ties: the first rate
    return {"runs": runs, "lr": best["lr"], "checkpoint": Path(best["checkpoint"])}


def evaluate_variant(paths: DemoPaths, work: Path, variant: str, checkpoint: Path, reworded: Path, plan: Plan) -> dict:
    out = work / variant / "test"
    vqa = generate(paths, out / "vqa", checkpoint, f"{variant}: answer the test questions", plan.limit,
                   test_slake=True, dataset_source=paths.slake)  # fmt: skip
    rew = generate(paths, out / "reworded", checkpoint, f"{variant}: answer the reworded test questions", plan.limit,
                   test_slake=True, dataset_source=reworded)  # fmt: skip
    cap = generate(paths, out / "captions", checkpoint, f"{variant}: caption the test images", plan.limit,
                   test_metrics=True, dataset_source=paths.data / "slake_test.json")  # fmt: skip
    print(f"\n== {variant}: plain-text prompts, no image (in process)", flush=True)
    replies = text_answers(paths, checkpoint, plan.text_prompts())
    return {"vqa": vqa.rows("slake"), "reworded": rew.rows("slake"), "captions": cap.rows("captions"),
            "caption_metrics": cap.read_metrics().get("captions", {}), "text": replies}  # fmt: skip


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output_dir", type=Path, default=Path("demo_output"),
                        help="the demo's folder (its mini SLAKE and converted LLM are reused); results go to claims/")  # fmt: skip
    parser.add_argument("--quick", action="store_true",
                        help="a few small steps, one learning rate, a few items")  # fmt: skip
    args = parser.parse_args(argv)
    from medcap.claims.report import compare, write_claims

    start = time.perf_counter()
    plan = Plan.quick() if args.quick else Plan.full()
    paths = DemoPaths(args.output_dir.resolve())
    work = paths.root / ("claims_quick" if args.quick else "claims")
    prepare(paths, {})
    reworded = reworded_slake(paths, work / "SLAKE_reworded")
    print("\n== the untouched LLM on the plain-text prompts (which of them it gets right)", flush=True)
    prompts = plan.text_prompts()
    untouched = text_answers(paths, None, prompts)
    chosen, results = {}, {}
    for variant in VARIANTS:
        chosen[variant] = select_lr(paths, work, variant, plan)
    for variant in VARIANTS:
        results[variant] = evaluate_variant(paths, work, variant, chosen[variant]["checkpoint"], reworded, plan)
    table = compare(results, untouched, prompts)
    return write_claims(work, plan, chosen, results, untouched, table, time.perf_counter() - start, prompts)
