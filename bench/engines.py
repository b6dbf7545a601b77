#!/usr/bin/env python
"""The same evaluation through medcap's engine and through vLLM (the registry's CPU build), in one
run: the demo's SmolLM2-135M-Instruct (fp32) with a random ``vit_tiny`` encoder (so the image
tokens steer the answers), the mini SLAKE's test questions (``--questions``, direct mode, greedy,
``--max_new_tokens``), batches of ``--batch_size``. Both engines get the same prompt embeddings
(medcap computes them, vision encoder included, inside each timing); medcap decodes with its
KV-cache loop, vLLM from ``prompt_embeds`` over HTTP. Prints tokens/s of each, their ratio, and
the agreement of the answers (identical answers, tokens in agreement); last line JSON.

    .venv/bin/python bench/engines.py --vllm_python .vllm-venv/bin/python   # starts its own vLLM
    .venv/bin/python bench/engines.py --vllm_url http://127.0.0.1:8001      # one already running (make vllm)

vLLM's CPU build on 2 cores keeps one for its server process and decodes on the other (one
thread): ``--threads 1`` gives medcap the same.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def machine() -> str:
    """'2-core x86_64 CPU (model; AVX512-BF16/AMX), 24 GiB, torch X'."""
    cpu, flags = platform.processor() or platform.machine(), set()
    try:
        info = Path("/proc/cpuinfo").read_text()
        cpu = next(line.split(":", 1)[1].strip() for line in info.splitlines() if line.startswith("model name"))
        flags = set(next(line for line in info.splitlines() if line.startswith("flags")).split())
    except (OSError, StopIteration):
        pass
    isa = "/".join(n for f, n in (("avx512_bf16", "AVX512-BF16"), ("amx_bf16", "AMX")) if f in flags)
    try:
        mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    except (ValueError, OSError):
        mem = 0
    return (f"{os.cpu_count()}-core {platform.machine()} CPU ({cpu}{'; ' + isa if isa else ''}), {mem:.0f} GiB, "
            f"medcap's torch {torch.__version__}")  # fmt: skip


def setup(args, work: Path):
    """The converted SmolLM2, the mini SLAKE, and the recipe's answerer (LLM loaded once)."""
    from omegaconf import OmegaConf

    from medcap.cli import load_recipe
    from medcap.demo.slake import build
    from medcap.settings import GenerateSettings

    model_dir = Path(args.model_dir)  # converted as make demo does (reused when there)
    subprocess.run([sys.executable, str(ROOT / "tools" / "convert_smollm2_gguf.py"), "--output_dir", str(model_dir)],
                   check=True)  # fmt: skip
    slake = work / "SLAKE"
    build(slake, seed=0)
    base = OmegaConf.load(ROOT / "recipes" / "configs" / "smollm2" / "135M_demo_generation.yaml")
    cfg = OmegaConf.merge(base, OmegaConf.from_dotlist([
        f"checkpointer.checkpoint_dir={model_dir}", f"tokenizer.path={model_dir / 'tokenizer.json'}",
        f"output_dir={work / 'out'}", "vision_pretrained=False", "dtype=fp32", "test_slake=True",
        f"dataset_source={slake}", f"limit={args.questions}", f"batch_size={args.batch_size}",
        f"max_new_tokens={args.max_new_tokens}",
    ]))  # fmt: skip
    recipe = load_recipe("generate").EvaluationRecipe(GenerateSettings.from_config(cfg, "generate"))
    answerer = recipe.load(None)
    from medcap.evaluation.tasks import tasks_from_settings

    return model_dir, answerer, tasks_from_settings(recipe.settings)[0].items


def run(decode, answerer, items, batch_size: int, max_new_tokens: int) -> tuple[list[list[int]], float]:
    """Every item's new tokens, and the wall time (prompts, images, vision encoder, decoding)."""
    from medcap.models.assembly import autocast

    tok = answerer.tokenizer
    out: list[list[int]] = []
    start = time.perf_counter()
    for k in range(0, len(items), batch_size):
        chunk = items[k : k + batch_size]
        with torch.no_grad(), autocast(answerer.device, answerer.dtype):
            out += decode(answerer.model, [answerer.prompt(it.messages) for it in chunk], answerer.images(chunk),
                          max_new_tokens=max_new_tokens, stop_tokens=tok.stop_tokens, pad_id=tok.pad_id)  # fmt: skip
    return out, time.perf_counter() - start


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--vllm_url", help="a running vLLM serving the same SmolLM2 folder in fp32")
    p.add_argument("--vllm_python", help="vLLM's venv python: start a server for this run")
    p.add_argument("--model_dir", default=str(ROOT / "demo_output" / "models" / "SmolLM2-135M-Instruct"))
    p.add_argument("--questions", type=int, default=48)
    p.add_argument("--batch_size", type=int, default=16)
    p.add_argument("--max_new_tokens", type=int, default=24)
    p.add_argument("--threads", type=int, default=2, help="medcap's torch threads")
    p.add_argument("--rounds", type=int, default=1, help="runs of each engine, alternating; the best counts")
    args = p.parse_args()
    if not args.vllm_url and not args.vllm_python:
        p.error("give --vllm_url or --vllm_python")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    torch.set_num_threads(args.threads)
    from medcap.decoding import generate
    from medcap.engines import VLLMClient
    from medcap.engines.launch import VLLMServer
    from medcap.engines.remote import RemoteGenerator

    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        model_dir, answerer, items = setup(args, work)
        server = VLLMServer(Path(args.vllm_python), model_dir, work / "vllm.log") if not args.vllm_url else None
        url = args.vllm_url or server.__enter__()
        try:
            client = VLLMClient(url)
            model = answerer.model
            served = client.connect(hidden_size=model.llm_dim, vocab_size=model.tok_embeddings.num_embeddings)
            version = client.http.get(client.url + "/version").json().get("version", "?")
            remote = RemoteGenerator(client, workers=args.batch_size)
            run(remote.generate, answerer, items[: args.batch_size], args.batch_size, 4)  # warm both up
            run(generate, answerer, items[: args.batch_size], args.batch_size, 4)
            t_ours = t_theirs = float("inf")
            for _ in range(args.rounds):  # alternating, best of each: a shared machine's load comes and goes
                ours, t = run(generate, answerer, items, args.batch_size, args.max_new_tokens)
                t_ours = min(t_ours, t)
                theirs, t = run(remote.generate, answerer, items, args.batch_size, args.max_new_tokens)
                t_theirs = min(t_theirs, t)
            remote.close()
        finally:
            if server is not None:
                server.stop()
    n_ours, n_theirs = sum(map(len, ours)), sum(map(len, theirs))
    same_tokens = sum(a == b for x, y in zip(ours, theirs) for a, b in zip(x, y))
    longest = sum(max(len(x), len(y)) for x, y in zip(ours, theirs))
    identical = sum(x == y for x, y in zip(ours, theirs))
    rate_ours, rate_theirs = n_ours / t_ours, n_theirs / t_theirs
    print(f"machine: {machine()}; vLLM {version} (CPU build, its own venv), serving {served.id}")
    print(f"{len(items)} questions, batch {args.batch_size}, greedy, fp32, up to {args.max_new_tokens} new tokens; "
          f"medcap {args.threads} threads; best of {args.rounds} round(s); load average {os.getloadavg()[0]:.1f}")  # fmt: skip
    print(f"medcap engine: {n_ours} tokens in {t_ours:.1f} s = {rate_ours:.1f} tokens/s")
    print(f"vLLM engine:   {n_theirs} tokens in {t_theirs:.1f} s = {rate_theirs:.1f} tokens/s "
          f"(ratio vLLM/medcap {rate_theirs / rate_ours:.2f})")  # fmt: skip
    print(f"agreement: {identical}/{len(items)} answers identical, {same_tokens}/{longest} tokens")
    print(json.dumps({"questions": len(items), "batch_size": args.batch_size, "max_new_tokens": args.max_new_tokens,
                      "medcap_tokens_per_s": round(rate_ours, 2), "vllm_tokens_per_s": round(rate_theirs, 2),
                      "ratio": round(rate_theirs / rate_ours, 3), "answers_identical": identical,
                      "tokens_agree": same_tokens, "tokens": longest, "vllm_version": version, "threads": args.threads, "rounds": args.rounds,
                      "machine": machine()}))  # fmt: skip


if __name__ == "__main__":
    main()
