#!/usr/bin/env python
"""LLM as judge of medcap's answers (the original's entry point and flags).

    python chat_llama3.py --ckpt_dir MODELS/Meta-Llama-3-70B-Instruct \
        --tokenizer_path MODELS/Meta-Llama-3-70B-Instruct/tokenizer.model \
        --temperature 0 --max_seq_len 200 --max_batch_size 8 \
        --exp eval_vqa --csv_path results_medcap/slake_biomedclip/test_out_slake_meta_model_3.csv

    python chat_llama3.py --backend openai --base_url http://localhost:8000/v1 \
        --model meta-llama/Llama-3.1-70B-Instruct --exp eval_vqa --csv_path ...

Writes <csv>_70B_out.csv (image, instruction = the judge prompt, generated = the reply, verdict,
...), <csv>_70B_acc.csv (the accuracy) and <csv>_70B_summary.json; a rerun resumes.
``--exp chat`` is an interactive chat with the judge model (``q`` ends it).
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--exp", choices=["eval_vqa", "chat"], default="eval_vqa")
    p.add_argument("--csv_path", help="an evaluation CSV (image, instruction, output, generated, ...)")
    p.add_argument("--backend", choices=["torchtune", "openai"], default="torchtune")
    p.add_argument("--ckpt_dir", help="Meta-format Llama folder (params.json + consolidated.*.pth)")
    p.add_argument("--tokenizer_path", help="the model's tokenizer.model")
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--top_k", type=int, default=None)
    p.add_argument("--max_seq_len", type=int, default=200, help="prompt + reply, in tokens")
    p.add_argument("--max_gen_len", type=int, default=16, help="reply length cap, in tokens")
    p.add_argument("--max_batch_size", type=int, default=8)
    p.add_argument("--device", default=None)
    p.add_argument(
        "--quantize", choices=["nf4"], help="4-bit NF4 weights (torchao): a 70B judge on one 80 GB GPU"
    )
    p.add_argument("--dtype", choices=["bf16", "fp32"], default=None,
                   help="the judge's weights (default: the checkpoint's on a GPU, fp32 on a CPU)")  # fmt: skip
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--template", type=Path, help="prompt template file with {question} {prediction} {answer}")
    p.add_argument(
        "--skip_exact",
        action="store_true",
        help="an answer equal to the gold one (normalised) is right without asking",
    )
    p.add_argument("--base_url", help="OpenAI-compatible server, e.g. http://localhost:8000/v1")
    p.add_argument("--model", help="model name on that server")
    p.add_argument("--api_key_env", default="OPENAI_API_KEY", help="environment variable holding the API key")
    p.add_argument("--concurrency", type=int, default=8, help="requests in flight")
    p.add_argument("--timeout", type=float, default=120.0)
    p.add_argument("--retries", type=int, default=5)
    args = p.parse_args(argv)

    from medcap.evaluation import judge
    from medcap.evaluation.outputs import judge_outputs

    if args.backend == "openai":
        if not (args.base_url and args.model):
            p.error("--backend openai needs --base_url and --model")
        if args.exp == "chat":
            p.error("--exp chat runs the in-process model (--backend torchtune)")
        backend = judge.OpenAIBackend(
            args.base_url, args.model, api_key_env=args.api_key_env, temperature=args.temperature,
            max_tokens=args.max_gen_len, concurrency=args.concurrency, timeout=args.timeout, retries=args.retries,
        )  # fmt: skip
        fits = lambda _: True  # noqa: E731 - the server enforces its own context length
    else:
        if not (args.ckpt_dir and args.tokenizer_path):
            p.error("--backend torchtune needs --ckpt_dir and --tokenizer_path")
        backend = judge.TorchtuneBackend(
            args.ckpt_dir, args.tokenizer_path, max_seq_len=args.max_seq_len, max_new_tokens=args.max_gen_len,
            temperature=args.temperature, top_k=args.top_k, device=args.device, seed=args.seed,
            quantize=args.quantize, dtype=args.dtype,
        )  # fmt: skip
        fits = backend.fits
    if args.exp == "chat":
        if int(os.environ.get("WORLD_SIZE", "1")) > 1:
            p.error("--exp chat runs in one process (python chat_llama3.py --exp chat ...)")
        judge.chat(backend)
        return
    if not args.csv_path:
        p.error("--exp eval_vqa needs --csv_path")
    template = args.template.read_text() if args.template else judge.DEFAULT_TEMPLATE
    rank = int(os.environ.get("RANK", "0"))  # tensor-parallel ranks judge in lockstep; rank 0 writes
    summary = judge.run_judge(
        args.csv_path, backend, batch_size=args.max_batch_size, template=template, skip_exact=args.skip_exact,
        fits=fits, write_files=rank == 0,
    )  # fmt: skip
    if isinstance(backend, judge.TorchtuneBackend):
        backend.close()
    if rank != 0:
        return
    out, acc, js = judge_outputs(args.csv_path)
    a = summary["all"]
    print(f"judged {a['n']}: right {a['right']}, wrong {a['wrong']}, unparsed {a['unparsed']}, "
          f"exact (skipped) {a['exact']}, too long {a['too_long']}; accuracy {a['accuracy']}")  # fmt: skip
    for part in ("closed", "open"):
        if summary[part]["n"]:
            print(f"  {part}: n={summary[part]['n']} accuracy {summary[part]['accuracy']}")
    print(f"wrote {out}, {acc}, {js}")


if __name__ == "__main__":
    from medcap.errors import run_main

    run_main(main)
