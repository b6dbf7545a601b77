"""Evaluate vision checkpoints: the LLM is loaded once, then for each checkpoint every task
(captions, SLAKE, VQA-RAD) answers what its CSV does not hold yet, appending row by row (a rerun
resumes), is scored, and lands in ``metrics_{ckpt}.json``. Under torchrun each rank answers its
share of the items (``sharding``); rank 0 merges, scores and writes the summaries."""

from __future__ import annotations

import glob
import re
import time
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from omegaconf import DictConfig, ListConfig
from torchtune import config, training
from tqdm import tqdm

from medcap.distributed import end_distributed, launched_by_torchrun, setup_device, world_size_and_rank
from medcap.errors import ConfigError
from medcap.evaluation import sharding
from medcap.evaluation.answering import DESCRIBE, VQA_MODES, Answerer, Decoding
from medcap.evaluation.judge import ModelBackend, run_judge
from medcap.evaluation.outputs import CSV_COLUMNS, EXTRA_COLUMNS, EvalOutputs
from medcap.evaluation.tasks import CaptionTask, EvalItem, Task, VQATask, tasks_from_config, user_message
from medcap.generation import compile_decoding
from medcap.io import ResumableCSV, atomic_write_json
from medcap.models import assembly
from medcap.models.checkpoints import load_vision_checkpoint

JUDGE_MAX_NEW_TOKENS = 20  # the original forced this for its in-process judge


def expand_checkpoints(spec: Any) -> list[Path | None]:
    """A file, a glob (``meta_model_*.pt``, in epoch order) or a list; None = untrained."""
    if spec is None:
        return [None]
    specs = list(spec) if isinstance(spec, (list, tuple, ListConfig)) else [spec]
    paths: list[Path] = []
    for s in specs:
        s = str(s)
        if any(ch in s for ch in "*?["):
            matches = glob.glob(s)
            if not matches:
                raise FileNotFoundError(f"vision_checkpoint={s}: no file matches")
            key = lambda p: [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", p)]  # noqa: E731
            paths += [Path(p) for p in sorted(matches, key=key)]
        else:
            paths.append(Path(s))
    return paths


class Evaluator:
    def __init__(self, cfg: DictConfig):
        self.cfg = cfg
        self.distributed = launched_by_torchrun()
        # each rank takes its own GPU (LOCAL_RANK); a long timeout: rank 0 scores and judges alone
        self.device = setup_device(cfg.get("device", "cuda"), self.distributed, timeout=timedelta(hours=12))
        self.world_size, self.rank = world_size_and_rank()
        self.dtype = assembly.resolve_precision(self.device, cfg.get("dtype", "bf16"))
        training.set_seed(seed=cfg.get("seed"))
        self.rng = torch.Generator(device=self.device).manual_seed(int(cfg.get("seed") or 0))
        self.output_dir = Path(cfg.output_dir)
        self.vqa_mode = cfg.get("vqa_mode", "describe_then_answer")
        if self.vqa_mode not in VQA_MODES:
            raise ValueError(f"vqa_mode={self.vqa_mode!r}; expected one of {VQA_MODES}")
        self.decoding = Decoding(
            max_new_tokens=int(cfg.max_new_tokens),
            temperature=float(cfg.get("temperature") or 0.0),
            top_k=cfg.get("top_k"),
            max_prompt_len=cfg.get("dataset_max_seq_len"),
        )
        self.tokenizer = config.instantiate(cfg.tokenizer)
        self.answerer: Answerer | None = None

    def load(self, ckpt: Path | None) -> Answerer:
        """The LLM once; then only the vision weights change between checkpoints."""
        if self.answerer is None:
            # the vision side stays fp32 and runs under autocast, as in training
            model = assembly.build_model(self.cfg, self.tokenizer, self.dtype, vision_checkpoint=ckpt)
            model.to(self.device).eval()
            if self.cfg.get("compile"):  # a one-off compile per batch size, then faster steps
                compile_decoding(model)
            tqdm.write(f"vision encoder weights: {model.visual.weights}")
            self.answerer = Answerer(
                model, self.tokenizer, self.decoding, batch_size=int(self.cfg.get("batch_size", 8)),
                dtype=self.dtype, rng=self.rng, reuse_first_turn=bool(self.cfg.get("two_turn_cache", True)),
            )  # fmt: skip
        elif ckpt is not None:
            load_vision_checkpoint(self.answerer.model, ckpt)
        return self.answerer

    def answer_one(self, image: str, prompt: str) -> str:
        """Single-image inference: ``image=scan.dcm prompt="..."`` prints the answer."""
        ckpts = expand_checkpoints(self.cfg.get("vision_checkpoint"))
        if len(ckpts) > 1:
            raise ValueError("image= takes one vision_checkpoint, not a glob or a list")
        answerer = self.load(ckpts[0])
        item = EvalItem(-1, Path(image), [user_message(Path(image), prompt)], "")
        results = list(answerer.answer([item], two_turn=False))
        if not results:
            raise ValueError(f"the prompt is longer than dataset_max_seq_len={self.decoding.max_prompt_len}")
        answer = results[0][2]
        print(answer)
        return answer

    def run_task(self, task: Task, outputs: EvalOutputs) -> list[dict[str, str]]:
        """Generate what the task's CSV does not hold yet, appending row by row; return all rows."""
        if self.distributed:
            return self.run_shard(task, outputs)
        answerer = self.answerer
        answerer.skipped = 0
        items = task.items
        with ResumableCSV(outputs.task_csv(task.name), CSV_COLUMNS + EXTRA_COLUMNS) as out:
            todo = [it for it in items if it.index not in out.done]
            bar = tqdm(total=len(items), initial=len(items) - len(todo), desc=f"{task.name} [{outputs.tag}]",
                       unit="item", dynamic_ncols=True)  # fmt: skip
            for it, description, generated in answerer.answer(todo, task.two_turn):
                out.add(task.row(it, description, generated))
                bar.update(1)
            bar.close()
        done = out.done
        if answerer.skipped:
            tqdm.write(
                f"{task.name} [{outputs.tag}]: {answerer.skipped} items skipped: prompt longer than "
                f"dataset_max_seq_len={self.decoding.max_prompt_len}"
            )
        return [done[it.index] for it in items if it.index in done]

    def run_shard(self, task: Task, outputs: EvalOutputs) -> list[dict[str, str]]:
        """This rank's share into its part file; then rank 0 merges the parts into the CSV."""
        final = outputs.task_csv(task.name)
        done = sharding.done_rows(final)
        mine = [it for it in sharding.shard(task.items, self.world_size, self.rank) if it.index not in done]
        self.answerer.skipped = 0
        with ResumableCSV(sharding.part_path(final, self.rank), CSV_COLUMNS + EXTRA_COLUMNS) as out:
            bar = tqdm(total=len(mine), desc=f"{task.name} [{outputs.tag}] rank {self.rank}", unit="item",
                       dynamic_ncols=True, position=self.rank)  # fmt: skip
            for it, description, generated in self.answerer.answer(mine, task.two_turn):
                out.add(task.row(it, description, generated))
                bar.update(1)
            bar.close()
        skipped = torch.tensor([self.answerer.skipped], device=self.device)
        dist.all_reduce(skipped)  # every rank is here: the parts are complete
        self.answerer.skipped = int(skipped)
        if self.rank == 0:
            sharding.merge(final, [it.index for it in task.items], CSV_COLUMNS + EXTRA_COLUMNS)
        dist.barrier()
        rows = sharding.done_rows(final)
        return [rows[it.index] for it in task.items if it.index in rows]

    def run(self) -> dict[str, Any]:
        try:
            return self._run()
        finally:
            if self.distributed:
                end_distributed()

    def _run(self) -> dict[str, Any]:
        cfg = self.cfg
        if cfg.get("image"):
            if self.distributed:
                raise ConfigError("image= answers one image: run it in one process, without --nproc_per_node")
            return {"answer": self.answer_one(cfg.image, cfg.get("prompt") or DESCRIBE)}
        tasks = tasks_from_config(cfg, two_turn=self.vqa_mode == "describe_then_answer")
        if cfg.get("eval_vqa") and not any(isinstance(t, VQATask) for t in tasks):
            tqdm.write("eval_vqa=True judges VQA answers (test_slake / test_vqarad): no VQA task here, nothing to judge")
        results: dict[str, Any] = {}
        for ckpt in expand_checkpoints(cfg.get("vision_checkpoint")):
            outputs = EvalOutputs.for_checkpoint(self.output_dir, ckpt)
            self.load(ckpt)
            for task in tasks:
                start = time.perf_counter()
                rows = self.run_task(task, outputs)
                if self.rank != 0:  # rank 0 scores, judges and writes the summaries
                    continue
                summary = task.score(rows, outputs)
                summary.update(checkpoint=str(ckpt) if ckpt else None, seconds=round(time.perf_counter() - start, 1),
                               vqa_mode=None if isinstance(task, CaptionTask) else self.vqa_mode,
                               skipped_too_long=self.answerer.skipped)  # fmt: skip
                tqdm.write(task.report(outputs.tag, summary))
                if cfg.get("eval_vqa") and isinstance(task, VQATask):
                    summary["judge"] = self.judge(task, outputs)
                results.setdefault(outputs.tag, {})[task.name] = summary
                self.write_metrics(outputs, results[outputs.tag])
        return results

    def judge(self, task: Task, outputs: EvalOutputs) -> dict[str, Any]:
        """``eval_vqa=True`` (the original's in-process judge): the LLM already loaded says RIGHT
        or WRONG for each answer (greedy, at most 20 tokens, the strict verdict parser), written
        to ``acc_out_{kind}_{ckpt}.csv`` / ``acc_{kind}_{ckpt}.csv``; resumes like the answers."""
        backend = ModelBackend(self.answerer.model, self.tokenizer, max_new_tokens=JUDGE_MAX_NEW_TOKENS)
        summary = run_judge(outputs.task_csv(task.name), backend, batch_size=self.answerer.batch_size,
                            outputs=outputs.judged(task.name))  # fmt: skip
        a = summary["all"]
        tqdm.write(f"{task.name} [{outputs.tag}] judged by the loaded LLM: accuracy {a['accuracy']} (right {a['right']}, "
                   f"wrong {a['wrong']}, unparsed {a['unparsed']}; {outputs.judged(task.name)[1].name})")  # fmt: skip
        return summary

    @staticmethod
    def write_metrics(outputs: EvalOutputs, tasks: dict[str, Any]) -> None:
        """``metrics_{ckpt}.json``: every task of this checkpoint so far, merged with what an
        earlier run of other tasks (captions, then SLAKE, say) wrote there."""
        merged = outputs.read_metrics()
        merged.update(tasks)
        atomic_write_json(outputs.metrics, merged, indent=2)
