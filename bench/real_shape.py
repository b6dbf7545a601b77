"""The real model sizes on the CPU, beside the estimator's figures (not CI; bench/README.md).

    python bench/real_shape.py                       # Llama-3.2-1B shape, bf16 (needs AVX-512/AMX to be quick)
    python bench/real_shape.py --dtype fp32          # the same in fp32: about 10 GB RAM, 2 minutes on 2 AVX2 cores
    python bench/real_shape.py --shape 8b --optimizer bitsandbytes.optim.AdamW8bit
                                                     # Llama-3-8B shape: 22.4 GiB peak RSS, 4 min (AVX512-BF16)

On a CPU without AVX-512 or AMX, bf16 training's backward is about 100x slower than fp32
(PyTorch's reference kernel for ``mm(g, W)``; bench/README.md): use ``--dtype fp32`` there.

Writes, with random weights: a Meta-layout LLM folder (bf16 ``consolidated.00.pth`` +
``params.json``; tensors written one at a time, never a model in memory) and BiomedCLIP in the
Hugging Face hub cache's layout (a ViT-B/16 image tower). Then, each in its own process: the
README's training line (batch 1, 2 steps, ``max_seq_len=400``, 32 image tokens, the LLM hashed
before and after: it must stay bitwise unchanged), ``medcap run generate`` on a few questions,
and ``medcap estimate gpu=cpu`` for the same step. The LLM is built on the meta device and takes
the memory-mapped checkpoint's tensors (``assign``): one copy. Prints peak RSS and seconds per
step beside the estimate; the last line is JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import subprocess
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
SHAPES = {
    # config, builder, Meta params.json
    "1b": ("llama3_2/1B_full_single_device", "torchtune.models.llama3_2.llama3_2_1b",
           {"dim": 2048, "n_layers": 16, "n_heads": 32, "n_kv_heads": 8, "vocab_size": 128256,
            "ffn_dim_multiplier": 1.5, "multiple_of": 256, "norm_eps": 1e-5, "rope_theta": 500000.0,
            "use_scaled_rope": True}),
    "8b": ("llama3/8B_full_single_device", "torchtune.models.llama3.llama3_8b",
           {"dim": 4096, "n_layers": 32, "n_heads": 32, "n_kv_heads": 8, "vocab_size": 128256,
            "ffn_dim_multiplier": 1.3, "multiple_of": 1024, "norm_eps": 1e-5, "rope_theta": 500000.0}),
}  # fmt: skip
BIOMEDCLIP_REPO = "microsoft/BiomedCLIP-PubMedBERT_256-vit_base_patch16_224"
REVISION = "0" * 40
MAXRSS = "import atexit, resource, sys; atexit.register(lambda: print('MAXRSS_KB', resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, file=sys.stderr)); from medcap.cli import main; main(sys.argv[1:])"  # noqa: E501


def machine() -> str:
    flags = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    isa = "AMX" if "amx_bf16" in flags else "AVX512-BF16" if "avx512_bf16" in flags else "AVX2 (bf16 emulated)"
    import psutil

    return (f"{os.cpu_count()}-core {platform.machine()} CPU, {isa}, {psutil.virtual_memory().total / 2**30:.0f} GiB, "
            f"torch {torch.__version__}")  # fmt: skip


def write_llm(builder: str, params: dict, folder: Path) -> Path:
    """Random bf16 weights in Meta's layout, one tensor at a time (the model lives on meta)."""
    from omegaconf import OmegaConf
    from torchtune import config
    from torchtune.models.convert_weights import tune_to_meta

    if (folder / "consolidated.00.pth").is_file():
        return folder
    with torch.device("meta"):
        model = config.instantiate(OmegaConf.create({"_component_": builder}))
    gen = torch.Generator().manual_seed(0)
    state = {}
    for name, p in model.state_dict().items():
        if "rope" in name or "cache" in name:
            continue
        t = torch.empty(p.shape, dtype=torch.bfloat16)
        if "norm" in name:
            t.fill_(1.0)
        else:
            t.copy_(torch.randn(p.shape, generator=gen, dtype=torch.float32).mul_(0.02))
        state[name] = t
    if "output.weight" not in state:  # tied (Llama 3.2): Meta's file holds the head too, torchtune drops it
        state["output.weight"] = state["tok_embeddings.weight"]
    folder.mkdir(parents=True, exist_ok=True)
    torch.save(tune_to_meta(state), folder / "consolidated.00.pth")
    (folder / "params.json").write_text(json.dumps(params, indent=2))
    return folder


def write_biomedclip(cache: Path) -> Path:
    """BiomedCLIP's repository in the hub cache's layout with a random ViT-B/16 image tower."""
    import open_clip

    snapshot = cache / f"models--{BIOMEDCLIP_REPO.replace('/', '--')}" / "snapshots" / REVISION
    if (snapshot / "open_clip_pytorch_model.bin").is_file():
        return cache
    arch = json.loads((ROOT / "medcap" / "models" / "arch" / "biomedclip.json").read_text())
    vision_cfg = arch["model_cfg"]["vision_cfg"]
    small_text = {"context_length": 16, "vocab_size": 64, "width": 32, "heads": 1, "layers": 1}
    torch.manual_seed(1)
    clip = open_clip.CLIP(embed_dim=512, vision_cfg=vision_cfg, text_cfg=small_text)
    snapshot.mkdir(parents=True, exist_ok=True)
    (snapshot.parents[1] / "refs").mkdir(exist_ok=True)
    (snapshot.parents[1] / "refs" / "main").write_text(REVISION)
    cfg = {"model_cfg": arch["model_cfg"], "preprocess_cfg": arch["preprocess_cfg"]}
    (snapshot / "open_clip_config.json").write_text(json.dumps(cfg))
    torch.save(clip.state_dict(), snapshot / "open_clip_pytorch_model.bin")
    return cache


def write_records(folder: Path) -> Path:
    from PIL import Image

    records = []
    answers = ["A computed tomography scan of the chest.", "A magnetic resonance image of the brain.",
               "An X-ray of the left hand.", "An ultrasound image of the abdomen."]  # fmt: skip
    for i, answer in enumerate(answers):
        path = folder / "imgs" / f"xmlab{i}" / "source.jpg"
        path.parent.mkdir(parents=True, exist_ok=True)
        g = torch.Generator().manual_seed(i)
        Image.fromarray(torch.randint(0, 255, (256, 256, 3), generator=g, dtype=torch.uint8).numpy()).save(path)
        records.append({"image": f"xmlab{i}/source.jpg", "meta": f"dir={folder / 'imgs'}",
                        "conversations": [{"from": "human", "value": "What kind of image is this?"},
                                          {"from": "gpt", "value": answer}]})  # fmt: skip
    (folder / "train.json").write_text(json.dumps(records))
    return folder / "train.json"


def token_counts(tokenizer_path: Path, records: Path) -> tuple[int, int]:
    """(longest record's tokens, its labelled tokens): the padded length a batch of one runs at."""
    from torchtune.models.llama3 import llama3_tokenizer

    from medcap.data import chat_dataset

    ds = chat_dataset(llama3_tokenizer(str(tokenizer_path)), source=str(records), num_image_tokens=32,
                      image_transform=lambda img: torch.zeros(3, 224, 224), max_seq_len=400)  # fmt: skip
    samples = [ds[i] for i in range(len(ds))]
    longest = max(samples, key=lambda s: len(s["tokens"]))
    return len(longest["tokens"]), sum(1 for x in longest["labels"] if x != -100)


def config_model_type(config_name: str) -> str:
    """The training config's checkpointer.model_type: the generate config names the 8B's."""
    from omegaconf import OmegaConf

    return OmegaConf.load(ROOT / "recipes" / "configs" / f"{config_name}.yaml").checkpointer.model_type


def medcap(args: list[str], env: dict) -> tuple[str, int]:
    """Run ``medcap ARGS`` in its own process: (stdout + stderr, its peak RSS in bytes)."""
    proc = subprocess.run([sys.executable, "-c", MAXRSS, *args], capture_output=True, text=True, cwd=ROOT, env=env)
    out = proc.stdout + proc.stderr
    if proc.returncode:
        raise SystemExit(f"medcap {' '.join(args[:2])} failed:\n{out[-4000:]}")
    return out, int(re.findall(r"MAXRSS_KB (\d+)", out)[-1]) * 1024


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", choices=sorted(SHAPES), default="1b")
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/medcap_real_shape"))
    parser.add_argument("--dtype", default="bf16")
    parser.add_argument("--optimizer", default="torch.optim.AdamW", help="8b on 24 GiB: bitsandbytes.optim.AdamW8bit")
    args = parser.parse_args()
    import llama_models

    config_name, builder, params = SHAPES[args.shape]
    work = args.workdir / args.shape
    llm = write_llm(builder, params, work / "llm")
    hub = write_biomedclip(args.workdir / "hub")
    records = write_records(work / "data")
    tokenizer = Path(llama_models.__file__).parent / "llama3" / "tokenizer.model"
    seq, answer = token_counts(tokenizer, records)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(hub), "TOKENIZERS_PARALLELISM": "false"}
    common = [f"tokenizer.path={tokenizer}", f"checkpointer.checkpoint_dir={llm}", "device=cpu",
              f"dtype={args.dtype}", "vision=biomedclip", "vision_pretrained=True", "num_image_tokens=32"]  # fmt: skip
    train = [*common, f"dataset.source={records}", "dataset.max_seq_len=400", "batch_size=1", "num_workers=0",
             "epochs=1", "max_steps_per_epoch=2", "shuffle=False", "verify_frozen_llm=True", "clip_grad_norm=null",
             f"optimizer._component_={args.optimizer}", f"output_dir={work / 'run'}"]  # fmt: skip

    out, train_rss = medcap(["run", "full_finetune_single_device", "--config", config_name, *train], env)
    seconds = float(re.search(r"done: 2 steps in ([\d.]+) s", out)[1])
    if "frozen LLM bitwise unchanged" not in out:
        raise SystemExit(f"the frozen LLM check did not pass:\n{out[-2000:]}")
    est_args = [a for a in train if not a.startswith("dataset.max_seq_len")]
    est_out, _ = medcap(["estimate", "--config", config_name, *est_args, f"dataset.max_seq_len={seq}",
                         f"answer_tokens={answer}", "gpu=cpu", "switches=False", "max_batch=False"], env)  # fmt: skip
    estimate = json.loads([line for line in est_out.splitlines() if line.startswith("{")][-1])
    gen = [*common, "test_metrics=True", f"dataset_source={records}", "limit=3", "batch_size=3",
           "max_new_tokens=8", "temperature=0", "top_k=null", f"output_dir={work / 'eval'}",
           f"model._component_={builder}", f"checkpointer.model_type={config_model_type(config_name)}"]  # fmt: skip
    gen_out, gen_rss = medcap(["run", "generate", "--config", "custom_generation_config", *gen], env)
    print(f"machine: {machine()}")
    print(f"shape {args.shape}: training step at batch 1, {seq} tokens ({answer} labelled), dtype {args.dtype}, "
          f"{args.optimizer}")  # fmt: skip
    print(f"  measured: peak RSS {train_rss / 2**30:.2f} GiB, {seconds / 2:.1f} s/step (2 steps, the first included)")
    print(f"  estimated (gpu=cpu): {estimate['required_bytes'] / 2**30:.2f} GiB "
          f"(tensors {estimate['peak_bytes'] / 2**30:.2f} + process {(estimate['required_bytes'] - estimate['peak_bytes']) / 2**30:.2f}), "
          f"{estimate['step_s']:.1f} s/step")  # fmt: skip
    print(f"  estimate / measured: memory {estimate['required_bytes'] / train_rss:.3f}, time {estimate['step_s'] / (seconds / 2):.3f}")
    print(f"generate, 3 questions, 8 new tokens: peak RSS {gen_rss / 2**30:.2f} GiB")
    print(json.dumps({"shape": args.shape, "machine": machine(), "seq_len": seq, "peak_rss_bytes": train_rss,
                      "estimated_peak_bytes": estimate["required_bytes"], "estimated_tensor_bytes": estimate["peak_bytes"],
                      "s_per_step": seconds / 2, "estimated_s_per_step": estimate["step_s"],
                      "generate_peak_rss_bytes": gen_rss}))  # fmt: skip


if __name__ == "__main__":
    main()
