"""Evaluate vision checkpoints with a frozen LLM: captions (test_metrics), SLAKE or VQA-RAD
(test_slake / test_vqarad), the original CSVs plus JSON summaries; or answer one image.

    medcap run generate --config custom_generation_config test_slake=True \
        dataset_source=./datasets/SLAKE vision_checkpoint='RUN/checkpoint/meta_model_*.pt' ...
    medcap run --nproc_per_node 4 generate ...     # each process answers every 4th item
    medcap run generate --config ... image=scan.dcm prompt="Is there a pleural effusion?"
    medcap run generate --config ... engine=vllm vllm_url=http://127.0.0.1:8001   # vLLM decodes

It reads top to bottom: ``setup`` (settings, device, tasks), ``load`` (the LLM once; then only the
vision weights change between checkpoints; with ``engine=vllm`` a vLLM server decodes from the
prompt embeddings medcap computes), ``evaluate`` (the loop: every checkpoint, every task:
answer what its CSV does not hold yet, appending row by row so a rerun resumes; score; judge;
``metrics_{ckpt}.json``). Each process answers its share of a task's items into its own file
(one process is world size 1: its file is the CSV), and rank 0 merges the shares, scores and
writes. Copy it to change the loop (``medcap cp generate my_eval.py``, then ``medcap run
my_eval.py ...``); the pieces it arranges live in ``medcap``.
"""

from __future__ import annotations

import sys
import time
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from omegaconf import DictConfig
from torchtune import config
from tqdm import tqdm

from medcap.distributed import (
    end_distributed,
    launched_by_torchrun,
    require_shared_folder,
    setup_device,
    world_size_and_rank,
)
from medcap.engines import VLLMClient
from medcap.engines.remote import RemoteGenerator
from medcap.errors import ConfigError, run_main
from medcap.estimate.preflight import preflight
from medcap.evaluation import sharding
from medcap.evaluation.answering import DESCRIBE, Answerer, Decoding
from medcap.evaluation.judge import ModelBackend, run_judge
from medcap.evaluation.outputs import CSV_COLUMNS, EXTRA_COLUMNS, EvalOutputs
from medcap.evaluation.tasks import CaptionTask, EvalItem, Task, VQATask, tasks_from_settings, user_message
from medcap.io import ResumableCSV, atomic_write_json, ensure_writable
from medcap.models.assembly import load_for_inference
from medcap.models.checkpoints import expand_checkpoints, latest_checkpoint, load_vision_checkpoint
from medcap.settings import GenerateSettings

JUDGE_MAX_NEW_TOKENS = 20  # the original forced this for its in-process judge
COLUMNS = CSV_COLUMNS + EXTRA_COLUMNS


class EvaluationRecipe:
    def __init__(self, settings: GenerateSettings):
        self.settings = s = settings
        self.distributed = launched_by_torchrun()
        # each rank takes its own GPU (LOCAL_RANK); a long timeout: rank 0 scores and judges alone
        self.device = setup_device(s.device, self.distributed, timeout=timedelta(hours=12))
        self.world_size, self.rank = world_size_and_rank()
        # on several machines rank 0 merges the ranks' part files there: one folder every node mounts
        require_shared_folder(s.output_dir, "output_dir")
        self.decoding = Decoding(max_new_tokens=s.max_new_tokens, temperature=s.temperature, top_k=s.top_k,
                                 max_prompt_len=s.dataset_max_seq_len)  # fmt: skip
        self.answerer: Answerer | None = None
        self.vllm: VLLMClient | None = None
        if s.engine == "vllm":  # a wrong URL fails now, not after the LLM has loaded
            self.vllm = VLLMClient(s.vllm_url, s.vllm_model, timeout_s=s.vllm_timeout_s)
            self.vllm.models()

    # ------------------------------------------------------------------ setup
    def load(self, ckpt: Path | None) -> Answerer:
        """The LLM once; then only the vision weights change between checkpoints."""
        if self.answerer is None:
            s = self.settings
            preflight(s, self.device)  # before any weight is read: refuses a batch that cannot fit
            # engine=vllm: of the LLM only its embedding table, unless eval_vqa's in-process judge runs it here
            embeddings_only = self.vllm is not None and not s.eval_vqa
            loaded = load_for_inference(s, ckpt, device=self.device, compile=s.compile and self.vllm is None,
                                        embeddings_only=embeddings_only)  # fmt: skip
            tqdm.write(f"vision encoder weights: {loaded.model.visual.weights}")
            remote = None
            if self.vllm is not None:
                model = loaded.model
                served = self.vllm.connect(hidden_size=model.llm_dim, vocab_size=model.tok_embeddings.num_embeddings)
                tqdm.write(f"engine: vLLM at {self.vllm.url} serving {served.id} (context {served.max_model_len})")
                remote = RemoteGenerator(self.vllm, workers=s.batch_size)
            rng = torch.Generator(device=self.device).manual_seed(int(s.seed or 0))
            self.answerer = Answerer(loaded.model, loaded.tokenizer, self.decoding, batch_size=s.batch_size,
                                     dtype=loaded.dtype, rng=rng, reuse_first_turn=s.two_turn_cache,
                                     step=loaded.step, remote=remote)  # fmt: skip
        elif ckpt is not None:
            load_vision_checkpoint(self.answerer.model, ckpt)
        return self.answerer

    # ------------------------------------------------------------------ the loop
    def evaluate(self) -> dict[str, Any]:
        s = self.settings
        tasks = tasks_from_settings(s)
        if s.eval_vqa and not any(isinstance(t, VQATask) for t in tasks):
            tqdm.write("eval_vqa=True judges VQA answers (test_slake / test_vqarad): no VQA task here, nothing to judge")
        results: dict[str, Any] = {}
        for ckpt in expand_checkpoints(s.vision_checkpoint):
            outputs = EvalOutputs.for_checkpoint(s.output_dir, ckpt)
            self.load(ckpt)
            for task in tasks:
                start = time.perf_counter()
                rows = self.answer(task, outputs)
                if self.rank != 0:  # rank 0 scores, judges and writes the summaries
                    continue
                summary = task.score(rows, outputs)
                summary.update(checkpoint=str(ckpt) if ckpt else None, seconds=round(time.perf_counter() - start, 1),
                               vqa_mode=None if isinstance(task, CaptionTask) else s.vqa_mode,
                               skipped_too_long=self.answerer.skipped)  # fmt: skip
                tqdm.write(task.report(outputs.tag, summary))
                if s.eval_vqa and isinstance(task, VQATask):
                    summary["judge"] = self.judge(task, outputs)
                results.setdefault(outputs.tag, {})[task.name] = summary
                self.write_metrics(outputs, results[outputs.tag])
        return results

    def answer(self, task: Task, outputs: EvalOutputs) -> list[dict[str, str]]:
        """Answer this process's share of what the task's CSV (and any part file of an earlier
        run) does not hold yet, appending row by row; rank 0 merges the shares. Every row."""
        final = outputs.task_csv(task.name)
        done = sharding.done_rows(final)
        mine = [it for it in sharding.shard(task.items, self.world_size, self.rank) if it.index not in done]
        answerer = self.answerer
        answerer.skipped = 0
        own_file = final if self.world_size == 1 else sharding.part_path(final, self.rank)
        with ResumableCSV(own_file, COLUMNS) as out:
            label = f"{task.name} [{outputs.tag}]" + (f" rank {self.rank}" if self.distributed else "")
            shown = len(task.items) if self.world_size == 1 else len(mine)
            bar = tqdm(total=shown, initial=shown - len(mine), desc=label, unit="item", dynamic_ncols=True,
                       position=self.rank)  # fmt: skip
            for it, description, generated in answerer.answer(mine, task.two_turn):
                out.add(task.row(it, description, generated))
                bar.update(1)
            bar.close()
        if self.distributed:
            skipped = torch.tensor([answerer.skipped], device=self.device)
            dist.all_reduce(skipped)  # every rank is here: the shares are complete
            answerer.skipped = int(skipped)
        if self.rank == 0 and sharding.part_files(final):
            sharding.merge(final, [it.index for it in task.items], COLUMNS)
        if self.distributed:
            dist.barrier()
        if answerer.skipped and self.rank == 0:
            tqdm.write(f"{task.name} [{outputs.tag}]: {answerer.skipped} items skipped: prompt longer than "
                       f"dataset_max_seq_len={self.decoding.max_prompt_len}")  # fmt: skip
        rows = sharding.done_rows(final)
        return [rows[it.index] for it in task.items if it.index in rows]

    def judge(self, task: Task, outputs: EvalOutputs) -> dict[str, Any]:
        """``eval_vqa=True`` (the original's in-process judge): the LLM already loaded says RIGHT
        or WRONG for each answer (greedy, at most 20 tokens, the strict verdict parser), written
        to ``acc_out_{kind}_{ckpt}.csv`` / ``acc_{kind}_{ckpt}.csv``; resumes like the answers."""
        backend = ModelBackend(self.answerer.model, self.answerer.tokenizer, max_new_tokens=JUDGE_MAX_NEW_TOKENS)
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

    # ------------------------------------------------------------------ one image
    def answer_one(self, image: str, prompt: str) -> str:
        """``image=scan.dcm prompt="..."`` prints the answer."""
        if self.distributed:
            raise ConfigError("image= answers one image: run it in one process, without --nproc_per_node")
        answerer = self.load(latest_checkpoint(self.settings.vision_checkpoint))
        item = EvalItem(-1, Path(image), [user_message(Path(image), prompt)], "")
        results = list(answerer.answer([item], two_turn=False))
        if not results:
            raise ValueError(f"the prompt is longer than dataset_max_seq_len={self.decoding.max_prompt_len}")
        answer = results[0][2]
        print(answer)
        return answer

    def run(self) -> dict[str, Any]:
        try:
            if self.settings.image:
                return {"answer": self.answer_one(self.settings.image, self.settings.prompt or DESCRIBE)}
            return self.evaluate()
        finally:
            if self.distributed:
                end_distributed()


@config.parse
def recipe_main(cfg: DictConfig) -> None:
    settings = GenerateSettings.from_config(cfg, "generate")
    ensure_writable([("output_dir", settings.output_dir)])  # before the LLM is loaded
    EvaluationRecipe(settings).run()


if __name__ == "__main__":
    sys.exit(run_main(recipe_main))
