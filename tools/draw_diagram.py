#!/usr/bin/env python
"""Draw README's diagram.png (and diagram.jpg, the original README's name): what learns and what
stays frozen."""

from __future__ import annotations

import argparse
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.patches import FancyArrowPatch, FancyBboxPatch  # noqa: E402

TRAIN = "#d9480f"
FROZEN = "#1c7ed6"
DATA = "#495057"


def box(ax, x, y, w, h, text, color, fill=0.12):
    ax.add_patch(
        FancyBboxPatch(
            (x, y),
            w,
            h,
            boxstyle="round,pad=0.02,rounding_size=0.08",
            fc=matplotlib.colors.to_rgba(color, fill),
            ec=color,
            lw=2,
        )
    )
    ax.text(x + w / 2, y + h / 2, text, ha="center", va="center", fontsize=9, color="#212529")


def arrow(ax, a, b, color=DATA, style="-|>", ls="-"):
    ax.add_patch(FancyArrowPatch(a, b, arrowstyle=style, mutation_scale=14, color=color, lw=1.6, ls=ls))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--output", default="diagram.png")
    args = parser.parse_args()

    fig, ax = plt.subplots(figsize=(12, 4.6), dpi=150)
    ax.set_xlim(0, 12)
    ax.set_ylim(0, 4.6)
    ax.axis("off")

    box(ax, 0.2, 2.9, 2.0, 1.1, "Image\nDICOM / JPEG / PNG\nNIfTI slice", DATA, 0.06)
    box(ax, 2.7, 2.9, 2.2, 1.1, "Vision encoder\nBiomedCLIP ViT-B/16\n(trainable)", TRAIN)
    box(
        ax, 5.4, 2.9, 2.4, 1.1, "Connector (trainable)\ncls_mlp: 1 -> N tokens\npatch_mlp: 1 per patch", TRAIN
    )
    box(
        ax,
        0.2,
        0.7,
        3.7,
        1.1,
        "Chat prompt\n<header> user: [N placeholders] question\n<header> assistant: answer",
        DATA,
        0.06,
    )
    box(
        ax,
        4.4,
        0.7,
        3.4,
        1.1,
        "Token embeddings (frozen)\nplaceholders replaced by\nthe N image tokens",
        FROZEN,
    )
    box(
        ax,
        8.3,
        0.7,
        3.5,
        3.3,
        "Frozen instruct LLM\nLlama-3-8B-Instruct & kin\n(torchtune decoder)\n\nnever updated,\nnever re-saved",
        FROZEN,
    )

    arrow(ax, (2.2, 3.45), (2.7, 3.45))
    arrow(ax, (4.9, 3.45), (5.4, 3.45))
    arrow(ax, (6.6, 2.9), (6.1, 1.8))
    arrow(ax, (3.9, 1.25), (4.4, 1.25))
    arrow(ax, (7.8, 1.25), (8.3, 1.25))
    arrow(ax, (8.3, 2.45), (3.8, 2.9), color=TRAIN, ls="--")
    ax.text(4.6, 2.15, "gradients flow back through the frozen LLM", color=TRAIN, fontsize=9, ha="center")
    ax.text(10.05, 0.35, "loss only on the answer tokens", color="#212529", fontsize=9, ha="center")
    ax.text(0.2, 4.35, "medcap: train the eyes, keep the brain", fontsize=13, weight="bold", color="#212529")
    ax.text(8.3, 4.35, "orange = learns    blue = frozen", fontsize=10, color="#495057")
    fig.savefig(args.output, bbox_inches="tight", facecolor="white")
    # the original README shows diagram.jpg: the same figure under that name
    jpg = Path(args.output).with_suffix(".jpg")
    fig.savefig(jpg, bbox_inches="tight", facecolor="white", pil_kwargs={"quality": 90})
    print(f"wrote {args.output} and {jpg}")


if __name__ == "__main__":
    main()
