"""End-to-end smoke run of medcap's core loop on a CPU, with nothing downloaded.

A tiny Llama-3-shaped LLM (random weights) is written in Meta's checkpoint layout and loaded back
through torchtune's checkpointer; real DICOM images shipped with pydicom are encoded by a small
ViT; only the encoder and connector train, until the frozen LLM answers each image with that
image's own target tokens. The vision checkpoint is saved, reloaded, and exported to open_clip.

    python -m medcap.demo.smoke --output_dir demo_output/smoke
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
from torchtune.data import CROSS_ENTROPY_IGNORE_IDX
from torchtune.models.llama3 import llama3
from torchtune.training import FullModelMetaCheckpointer
from tqdm import tqdm

from medcap.data.images import load_image
from medcap.decoding import generate
from medcap.models.assembly import load_llm_weights
from medcap.models.checkpoints import export_open_clip_dir, save_vision_checkpoint, write_meta_llm_checkpoint
from medcap.models.fusion import build_medcap_model, count_parameters

IMAGES = ("CT_small.dcm", "MR_small.dcm", "liver_1frame.dcm")  # shipped inside pydicom
LLM = {
    "vocab_size": 512,
    "num_layers": 2,
    "num_heads": 4,
    "num_kv_heads": 2,
    "embed_dim": 64,
    "max_seq_len": 128,
}
IMAGE_TOKEN_ID = LLM["vocab_size"]  # outside the vocabulary: no text can produce it
NUM_IMAGE_TOKENS = 8
ANSWER_LEN = 6


def write_tiny_llm(folder: Path) -> Path:
    """Random weights, with value and output projections scaled up: at default init a random
    decoder barely reads its context, so no image could steer it (a trained LLM does)."""
    torch.manual_seed(0)
    decoder = llama3(**LLM)
    with torch.no_grad():
        decoder.output.weight.mul_(4.0)
        for layer in decoder.layers:
            layer.attn.v_proj.weight.mul_(8.0)
    params = {
        "dim": LLM["embed_dim"],
        "n_layers": LLM["num_layers"],
        "n_heads": LLM["num_heads"],
        "n_kv_heads": LLM["num_kv_heads"],
        "vocab_size": LLM["vocab_size"],
    }
    return write_meta_llm_checkpoint(decoder.state_dict(), params, folder)


def build_batch(num_images: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Prompt = [bos, N placeholders, 2 question tokens]; answer = 6 tokens fixed per image."""
    g = torch.Generator().manual_seed(1)
    answers = torch.randint(3, LLM["vocab_size"], (num_images, ANSWER_LEN), generator=g)
    prompt = torch.cat(
        [
            torch.ones(1, dtype=torch.long),
            torch.full((NUM_IMAGE_TOKENS,), IMAGE_TOKEN_ID),
            torch.tensor([7, 9]),
        ]
    )
    tokens = torch.cat([prompt.expand(num_images, -1), answers], dim=1)
    labels = torch.full_like(tokens, CROSS_ENTROPY_IGNORE_IDX)
    labels[:, len(prompt) - 1 : -1] = answers  # position t predicts token t+1
    return tokens, labels


def answer_accuracy(model, tokens: torch.Tensor, images: torch.Tensor) -> float:
    """Greedy decoding of the answer from the prompt; share of answer tokens reproduced."""
    model.eval()
    prompt_len = tokens.shape[1] - ANSWER_LEN
    answers = generate(model, tokens[:, :prompt_len].tolist(), images, max_new_tokens=ANSWER_LEN,
                       stop_tokens=[], pad_id=0)  # fmt: skip
    model.train()
    return (torch.tensor(answers) == tokens[:, prompt_len:]).float().mean().item()


def load_model(llm_dir: Path, output_dir: Path, vision_checkpoint: Path | None = None):
    """The LLM through torchtune's Meta checkpointer, as a recipe loads it, then fused."""
    checkpointer = FullModelMetaCheckpointer(
        checkpoint_dir=str(llm_dir),
        checkpoint_files=["consolidated.00.pth"],
        model_type="LLAMA3",
        output_dir=str(output_dir / "checkpoint"),
    )
    decoder = llama3(**LLM)
    load_llm_weights(decoder, checkpointer)
    return build_medcap_model(
        decoder,
        image_token_id=IMAGE_TOKEN_ID,
        vision="vit_tiny",
        num_image_tokens=None if vision_checkpoint else NUM_IMAGE_TOKENS,
        vision_checkpoint=vision_checkpoint,
    )


def run(output_dir: Path, steps: int = 150, lr: float = 3e-3) -> dict:
    from pydicom.data import get_testdata_file

    output_dir.mkdir(parents=True, exist_ok=True)
    start = time.time()
    llm_dir = write_tiny_llm(output_dir / "llm")
    torch.manual_seed(0)
    model = load_model(llm_dir, output_dir)
    transform = model.visual.preprocess.transform()
    images = torch.stack([transform(load_image(get_testdata_file(name))) for name in IMAGES])
    tokens, labels = build_batch(len(IMAGES))
    trainable, frozen = count_parameters(model)
    print(f"LLM: {frozen:,} frozen parameters (Meta checkpoint in {llm_dir})")
    print(
        f"vision encoder + connector: {trainable:,} trainable parameters, {model.num_image_tokens} image tokens"
    )

    llm_before = {k: v.clone() for k, v in model.decoder.state_dict().items()}
    acc_before = answer_accuracy(model, tokens, images)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    losses = []
    for _ in (bar := tqdm(range(steps), desc="training encoder+connector", unit="step")):
        logits = model(tokens, images=images)
        loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), labels.flatten(), ignore_index=CROSS_ENTROPY_IGNORE_IDX)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
        bar.set_postfix(loss=f"{loss.item():.3f}")
    acc_after = answer_accuracy(model, tokens, images)
    llm_unchanged = all(torch.equal(v, llm_before[k]) for k, v in model.decoder.state_dict().items())

    ckpt = save_vision_checkpoint(model, output_dir / "checkpoint" / "meta_model_0.pt", epoch=0, step=steps)
    reloaded = load_model(llm_dir, output_dir, vision_checkpoint=ckpt)
    reload_acc = answer_accuracy(reloaded, tokens, images)
    exported = export_open_clip_dir(model.visual, output_dir / "exported_encoder")

    summary = {
        "images": list(IMAGES),
        "trainable_parameters": trainable,
        "frozen_parameters": frozen,
        "steps": steps,
        "loss_first": losses[0],
        "loss_last": losses[-1],
        "answer_token_accuracy_before": acc_before,
        "answer_token_accuracy_after": acc_after,
        "answer_token_accuracy_reloaded": reload_acc,
        "llm_bitwise_unchanged": llm_unchanged,
        "vision_checkpoint": str(ckpt),
        "exported_encoder": str(exported),
        "seconds": round(time.time() - start, 1),
    }
    (output_dir / "summary.json").write_text(json.dumps(summary, indent=2))
    print(f"\nloss {losses[0]:.3f} -> {losses[-1]:.3f} over {steps} steps")
    print(
        f"answer tokens reproduced: {acc_before:.0%} before, {acc_after:.0%} after, {reload_acc:.0%} reloaded"
    )
    print(f"LLM weights bitwise unchanged: {llm_unchanged}")
    print(f"vision checkpoint: {ckpt}\nexported open_clip encoder: {exported}")
    print(f"summary: {output_dir / 'summary.json'} ({summary['seconds']} s)")
    return summary


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--output_dir", type=Path, default=Path("demo_output/smoke"))
    parser.add_argument("--steps", type=int, default=150)
    args = parser.parse_args(argv)
    summary = run(args.output_dir, steps=args.steps)
    if not summary["llm_bitwise_unchanged"] or summary["loss_last"] >= summary["loss_first"]:
        raise SystemExit("smoke run failed: the LLM changed or the loss did not fall")


if __name__ == "__main__":
    main()
