"""The README's "what fits where" table: the shipped 8B training config and the judge on each
card, from ``medcap estimate`` (estimates, not measurements). Peaks do not depend on the card,
so the traced batches are shared between cards (one Estimator's traces, reused).

    nice -n 10 python bench/fits_table.py        # about 5 minutes on 2 CPU cores (2-core AMD EPYC, 2026-12-07)
"""

from __future__ import annotations

import json

import torch

from medcap.estimate import DEVICES, GIB, load_config, settings_for
from medcap.estimate.estimator import Estimator, Options, breakdown
from medcap.estimate.judge import JudgeOptions, judge_memory

CARDS = ["4090", "a100-40", "a100-80", "h200"]
VARIANTS = {
    "as shipped (AdamW, checkpointing)": [],
    "+ 8-bit AdamW + optimizer_in_bwd": ["optimizer._component_=bitsandbytes.optim.AdamW8bit",
                                         "optimizer_in_bwd=True", "clip_grad_norm=null"],  # fmt: skip
}


def main() -> None:
    rows = []
    for name, overrides in VARIANTS.items():
        settings = settings_for(load_config("llama3/8B_full_single_device", overrides))
        known: dict[int, int] = {}
        for card in CARDS:
            est = Estimator(settings, DEVICES[card], Options(switches=False))
            if 16 not in known:
                traced, opt = est.trace()
                known[16] = sum(breakdown(traced, opt).values())
            rows.append({"variant": name, "card": card, "peak_16_gib": known[16] / GIB,
                         "fits_16": est.fits(known[16]), "max_batch": est.max_batch_size(known)})  # fmt: skip
            print(json.dumps(rows[-1]), flush=True)
    for gpus, nf4, card in ((8, False, "h100"), (4, False, "a100-80"), (1, True, "a100-80"), (1, True, "l40s")):
        r = judge_memory(JudgeOptions(gpus=gpus, nf4=nf4), DEVICES[card])
        print(json.dumps({"judge": f"{'NF4' if nf4 else 'bf16'} x{gpus}", "card": card,
                          "gib_per_gpu": r["required_bytes"] / GIB, "fits": r["fits"]}))  # fmt: skip
    print(f"torch {torch.__version__}")


if __name__ == "__main__":
    main()
