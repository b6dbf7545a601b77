#!/usr/bin/env python
"""Judged items per second: chat_llama3.py with a tiny random Llama-3-vocabulary model (written
in Meta's format) on the CPU, one process and two tensor-parallel processes (gloo), the same
CSV of 64 answers. Greedy, replies capped at 16 tokens, batch 8. Last line JSON.

    .venv/bin/python bench/judge_throughput.py
"""

from __future__ import annotations

import csv
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    import llama_models
    from torchtune.models.llama3 import llama3

    from medcap.models.checkpoints import write_meta_llm_checkpoint

    tokenizer = Path(llama_models.__file__).parent / "llama3" / "tokenizer.model"
    dims = dict(
        vocab_size=128256,
        num_layers=4,
        num_heads=8,
        num_kv_heads=4,
        embed_dim=256,
        max_seq_len=512,
        intermediate_dim=512,
    )
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        torch.manual_seed(0)
        params = {"dim": 256, "n_layers": 4, "n_heads": 8, "n_kv_heads": 4, "vocab_size": 128256}
        ckpt = write_meta_llm_checkpoint(llama3(**dims).state_dict(), params, tmp / "llama")
        for procs in (1, 2):
            path = tmp / f"eval_{procs}.csv"
            with open(path, "w", newline="") as f:
                w = csv.writer(f)
                w.writerow(["image", "instruction", "output", "generated", "index", "answer_type"])
                for i in range(64):
                    w.writerow(
                        ["", f"Which organ is shown in image {i}?", "lung", f"the left lung {i}", i, "OPEN"]
                    )
            args = [str(ROOT / "chat_llama3.py"), "--ckpt_dir", str(ckpt), "--tokenizer_path", str(tokenizer),
                    "--temperature", "0", "--max_seq_len", "200", "--max_batch_size", "8", "--exp", "eval_vqa",
                    "--csv_path", str(path), "--device", "cpu"]  # fmt: skip
            launcher = (
                [sys.executable]
                if procs == 1
                else [
                    sys.executable,
                    "-m",
                    "torch.distributed.run",
                    "--standalone",
                    "--nproc_per_node",
                    str(procs),
                ]
            )
            start = time.perf_counter()
            subprocess.run([*launcher, *args], check=True, capture_output=True, cwd=ROOT)
            elapsed = time.perf_counter() - start
            results[f"items_per_s_{procs}proc"] = round(64 / elapsed, 2)
            print(
                f"{procs} process(es): 64 items in {elapsed:.1f} s = {64 / elapsed:.2f} items/s (model load included)"
            )
    print(json.dumps(results))


if __name__ == "__main__":
    main()
