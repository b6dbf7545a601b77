"""Training recipes end to end on the CPU, driven through `medcap run` as a user would: a tiny
Llama-3-shaped LLM written in Meta's format, a small ViT, a handful of records. The overfitting
and resume tests use a 512-token vocabulary (ChatML tokenizer) so a random frozen LLM can be
steered at all; the original README command runs with the real Llama-3 tokenizer."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import TinyLlama, draw_jpeg, make_hf_llama, write_meta_checkpoint

ROOT = Path(__file__).resolve().parents[1]
SPEC = TinyLlama(vocab_size=512, layers=2, dim=64, ffn=128, heads=4, kv_heads=2, max_seq_len=512)


@pytest.fixture(scope="module")
def workspace(tmp_path_factory, chatml_tokenizer_json):
    root = tmp_path_factory.mktemp("train")
    llm = write_meta_checkpoint(make_hf_llama(SPEC, seed=0, steerable=True), SPEC, root / "llm")
    records = []
    for i in range(8):
        draw_jpeg(root / "imgs" / f"xmlab{i}" / "source.jpg", seed=i)
        records.append(
            {
                "conversations": [
                    {"from": "human", "value": "Describe."},
                    {"from": "gpt", "value": f"{'left' if i % 2 else 'right'} {i}"},
                ],
                "image": f"xmlab{i}/source.jpg",
                "meta": f"dir={root / 'imgs'}",
            }
        )
    (root / "train.json").write_text(json.dumps(records))
    return {"root": root, "llm": llm, "data": root / "train.json", "tokenizer": chatml_tokenizer_json}


def medcap(*args, check=True):
    proc = subprocess.run(
        [sys.executable, "-m", "medcap.cli", *args], capture_output=True, text=True, cwd=ROOT, timeout=900
    )
    if check and proc.returncode != 0:
        raise AssertionError(
            f"medcap {' '.join(args[:2])} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
        )
    return proc


def train_args(ws, out: Path, *extra: str) -> list[str]:
    return [
        "run",
        "full_finetune_single_device",
        "--config",
        "llama3/8B_full_single_device",
        *SPEC.overrides(),
        "device=cpu",
        "dtype=fp32",
        "num_workers=0",
        "enable_activation_checkpointing=False",
        "vision=vit_tiny",
        "num_image_tokens=4",
        "batch_size=4",
        "seed=1",
        "tokenizer._component_=medcap.data.chatml.chatml_tokenizer",
        f"dataset.source={ws['data']}",
        f"tokenizer.path={ws['tokenizer']}",
        f"checkpointer.checkpoint_dir={ws['llm']}",
        f"checkpointer.output_dir={out}/checkpoint",
        f"output_dir={out}",
        f"metric_logger.log_dir={out}/log",
        *extra,
    ]


def read_losses(log_dir: Path) -> list[float]:
    text = "".join(p.read_text() for p in sorted(log_dir.glob("*.txt")))
    return [
        float(part.split(":")[1])
        for line in text.splitlines()
        for part in line.split()
        if part.startswith("loss:")
    ]


def test_overfit_loss_falls_llm_unchanged_checkpoint_loads(workspace, tmp_path):
    out = tmp_path / "run"
    proc = medcap(
        *train_args(
            workspace,
            out,
            "epochs=15",
            "optimizer.lr=1e-2",
            "lr_scheduler.num_warmup_steps=2",
            "num_image_tokens=8",
        )
    )
    losses = read_losses(out / "log")
    assert len(losses) == 30
    assert losses[-1] < 0.6 * losses[0], losses
    assert "trainable parameters" in proc.stdout + proc.stderr
    assert (out / "loss_curve.png").is_file()

    ckpt = torch.load(out / "checkpoint" / "meta_model_14.pt", weights_only=True)
    assert set(ckpt) == {"visual", "projector", "medcap"}
    assert ckpt["medcap"]["epoch"] == 14 and ckpt["medcap"]["num_image_tokens"] == 8
    assert sorted(p.name for p in (out / "checkpoint").iterdir() if not p.name.startswith("meta_model")) == [
        "recipe_state.pt"
    ]
    # the LLM was never re-saved and never changed: reload it and compare with the source file
    assert not any(p.suffix == ".pth" for p in out.rglob("*"))

    from helpers import load_tiny_decoder

    from medcap.models.fusion import build_medcap_model

    decoder = load_tiny_decoder(SPEC, workspace["llm"], "meta", tmp_path / "x")
    model = build_medcap_model(
        decoder,
        image_token_id=128256,
        vision="vit_tiny",
        vision_checkpoint=out / "checkpoint" / "meta_model_14.pt",
    )
    assert torch.equal(model.projector[0].weight, ckpt["projector"]["0.weight"])
    first = torch.load(out / "checkpoint" / "meta_model_0.pt", weights_only=True)
    assert not torch.equal(first["projector"]["0.weight"], ckpt["projector"]["0.weight"])


def assert_same_run(a: Path, b: Path, last_epoch: int) -> None:
    """Bitwise: the last checkpoint, the optimizer state and the random state it ends with."""
    ca = torch.load(a / "checkpoint" / f"meta_model_{last_epoch}.pt", weights_only=True)
    cb = torch.load(b / "checkpoint" / f"meta_model_{last_epoch}.pt", weights_only=True)
    for part in ("visual", "projector"):
        assert all(torch.equal(ca[part][k], cb[part][k]) for k in ca[part]), part
    sa = torch.load(a / "checkpoint" / "recipe_state.pt", weights_only=True)
    sb = torch.load(b / "checkpoint" / "recipe_state.pt", weights_only=True)
    flat_a, flat_b = sa["optimizer"]["state"], sb["optimizer"]["state"]
    assert all(torch.equal(flat_a[i][k], flat_b[i][k]) for i in flat_a for k in flat_a[i])
    assert len(sa["rng"]) == len(sb["rng"])
    assert all(x["torch"].equal(y["torch"]) for x, y in zip(sa["rng"], sb["rng"]))


RANDOM_DATA = ("shuffle=True", "image_augment.scale=[0.4,1.0]", "image_augment.color_jitter=[0.3,0.3,0.0,0.0]",
               "image_augment.color_jitter_prob=0.5")  # fmt: skip


def test_resume_mid_epoch_equals_the_uninterrupted_run_bitwise(workspace, tmp_path):
    """Shuffling and image augmentation on: a run stopped mid-epoch and resumed ends with the
    same weights, optimizer state and random state as one that never stopped."""
    common = (
        "epochs=3",
        "optimizer.lr=1e-3",
        "lr_scheduler.num_warmup_steps=1",
        "batch_size=2",
        "gradient_accumulation_steps=2",
        *RANDOM_DATA,
    )
    medcap(*train_args(workspace, tmp_path / "full", *common))
    full = read_losses(tmp_path / "full" / "log")
    part = tmp_path / "part"
    medcap(*train_args(workspace, part, *common, "stop_after_steps=3"))  # stops mid-epoch 1
    assert len(read_losses(part / "log")) == 3
    medcap(
        *train_args(
            workspace, part, *common, "resume_from_checkpoint=True", f"metric_logger.log_dir={part}/log2"
        )
    )
    resumed = read_losses(part / "log2")
    assert len(full) == 6 and len(resumed) == 3
    assert resumed == full[3:]
    assert_same_run(tmp_path / "full", part, last_epoch=2)


def test_tune_run_with_recipe_and_config_paths(workspace, tmp_path):
    """`PYTHONPATH=. tune run recipes/X.py --config recipes/configs/Y.yaml`, as the original README."""
    import os

    args = train_args(workspace, tmp_path / "tune", "epochs=1")[4:]
    env = {**os.environ, "PYTHONPATH": "."}
    proc = subprocess.run(
        [str(Path(sys.executable).parent / "tune"), "run", "recipes/full_finetune_single_device.py",
         "--config", "recipes/configs/llama3/8B_full_single_device.yaml", *args],
        capture_output=True, text=True, cwd=ROOT, env=env, timeout=600,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (tmp_path / "tune" / "checkpoint" / "meta_model_0.pt").is_file()


def test_resume_without_state_is_a_clear_error(workspace, tmp_path):
    proc = medcap(*train_args(workspace, tmp_path / "none", "resume_from_checkpoint=True"), check=False)
    assert proc.returncode != 0 and "nothing to resume" in proc.stderr


def test_balance_by_a_field_no_record_has_is_a_clear_error(workspace, tmp_path):
    proc = medcap(*train_args(workspace, tmp_path / "b", "balance_by=modality", "epochs=1"), check=False)
    assert proc.returncode != 0 and "balance_by=modality: no record of" in proc.stderr
    assert "has a field 'modality'" in proc.stderr


def test_cli_ls_cp_validate(tmp_path):
    listing = medcap("ls").stdout
    assert (
        "full_finetune_single_device" in listing
        and "llama3/8B_full_single_device" in listing
        and "smollm2/135M_full_single_device" in listing
    )
    medcap("cp", "llama3/8B_full_single_device", str(tmp_path))
    assert (tmp_path / "8B_full_single_device.yaml").is_file()
    assert "well-formed" in medcap("validate", "llama3/8B_full").stdout
    bad = medcap("validate", "llama3/8B_full", "model._component_=torchtune.models.nope", check=False)
    assert bad.returncode != 0 and "model._component_=torchtune.models.nope" in bad.stderr
    unknown = medcap("run", "nope_recipe", "--config", "x", check=False)
    assert unknown.returncode != 0 and "unknown recipe 'nope_recipe'" in unknown.stderr


def test_copied_recipe_is_editable_and_runs(workspace, tmp_path):
    """torchtune's workflow: `medcap cp` gives the whole recipe; an edited copy runs as a file."""
    mine = tmp_path / "my_recipe.py"
    medcap("cp", "full_finetune_single_device", str(mine))
    text = mine.read_text()
    assert "class VisionFinetuneRecipe" in text and "def train(self)" in text  # the loop itself
    marker = "        trainable, frozen = count_parameters(model)\n"
    assert marker in text
    mine.write_text(text.replace(marker, '        self._print("my edited recipe")\n' + marker))
    args = train_args(workspace, tmp_path / "run", "epochs=1", "max_steps_per_epoch=1")
    args[1] = str(mine)
    proc = medcap(*args)
    assert "my edited recipe" in proc.stdout + proc.stderr
    assert (tmp_path / "run" / "checkpoint" / "meta_model_0.pt").is_file()


def test_recipe_changes_only_the_vision_side(workspace, tmp_path):
    """In process: every LLM tensor is bitwise unchanged after training; every trainable one moved;
    ``initial_vision.pt`` holds the trainables exactly as training started (not a ``meta_model_*``)."""
    from omegaconf import OmegaConf

    from medcap.cli import load_recipe

    VisionFinetuneRecipe = load_recipe("full_finetune_single_device").VisionFinetuneRecipe

    args = train_args(
        workspace,
        tmp_path / "inproc",
        "epochs=1",
        "optimizer.lr=1e-2",
        "batch_size=3",
        "gradient_accumulation_steps=2",
        "save_initial_checkpoint=True",
    )[4:]
    cfg = OmegaConf.merge(
        OmegaConf.load(ROOT / "recipes" / "configs" / "llama3" / "8B_full_single_device.yaml"),
        OmegaConf.from_dotlist(args),
    )
    recipe = VisionFinetuneRecipe(cfg)
    recipe.setup()
    # one process: the rows' common start (begin-of-text and the user header) runs once per batch
    first = next(iter(recipe.loader))
    labels = torch.cat([first["labels"][:, 1:], torch.full_like(first["labels"][:, :1], -100)], dim=1)
    assert recipe.model.shared_columns(first["tokens"], labels, None, None) >= 4
    llm_before = {k: v.clone() for k, v in recipe.model.decoder.state_dict().items()}
    emb_before = recipe.model.tok_embeddings.weight.clone()
    trainable_before = {n: p.detach().clone() for n, p in recipe.model.named_parameters() if p.requires_grad}
    recipe.train()
    recipe.cleanup()
    # 8 records in batches of 3 -> 3 batches; windows of 2 -> 2 steps, the last one shorter
    assert recipe.global_step == 2
    assert all(p.grad is None for p in recipe.model.parameters())
    assert all(torch.equal(v, llm_before[k]) for k, v in recipe.model.decoder.state_dict().items())
    assert torch.equal(recipe.model.tok_embeddings.weight, emb_before)
    assert {n.split(".")[0] for n in trainable_before} == {"visual", "projector"}
    moved = [
        n
        for n, p in recipe.model.named_parameters()
        if p.requires_grad and not torch.equal(p, trainable_before[n])
    ]
    assert len(moved) == len(trainable_before)
    from medcap.models.checkpoints import expand_checkpoints

    initial = torch.load(tmp_path / "inproc" / "checkpoint" / "initial_vision.pt", weights_only=True)
    assert initial["medcap"]["step"] == 0
    for part in ("visual", "projector"):
        saved = initial[part]
        start = {n.split(".", 1)[1]: p for n, p in trainable_before.items() if n.startswith(part + ".")}
        # the checkpoint holds the tower's state (visual.tower.* -> visual's keys)
        assert len(saved) == len(start) and all(
            torch.equal(v, start.get(k, start.get(f"tower.{k}"))) for k, v in saved.items()
        )
    checkpoints = expand_checkpoints(str(tmp_path / "inproc" / "checkpoint" / "meta_model_*.pt"))
    assert [c.name for c in checkpoints] == ["meta_model_0.pt"]


def test_fsdp2_two_processes_train_and_checkpoint_loads_single_process(workspace, tmp_path):
    """`medcap run --nproc_per_node 2 full_finetune_distributed` on CPU/gloo; its checkpoint
    loads into a single-process model and the run matches the single-process losses."""
    common = ("epochs=2", "optimizer.lr=1e-2", "batch_size=2", "lr_scheduler.num_warmup_steps=1")
    dist_out = tmp_path / "dist"
    args = train_args(workspace, dist_out, *common)
    args[1:2] = ["--nproc_per_node", "2", "full_finetune_distributed"]
    args[5] = "llama3/8B_full"
    medcap(*args)
    dist_losses = read_losses(dist_out / "log")
    assert len(dist_losses) == 4  # 8 records / (2 ranks x batch 2) = 2 steps per epoch
    single_out = tmp_path / "single"
    medcap(*train_args(workspace, single_out, *common, "batch_size=4"))
    single_losses = read_losses(single_out / "log")
    # same global batch, same data order per step: the same losses up to float reduction order
    assert dist_losses == pytest.approx(single_losses, rel=2e-3)

    from helpers import load_tiny_decoder

    from medcap.models.fusion import build_medcap_model

    ckpt_path = dist_out / "checkpoint" / "meta_model_1.pt"
    ckpt = torch.load(ckpt_path, weights_only=True)
    assert not any(hasattr(v, "full_tensor") for v in ckpt["visual"].values())
    decoder = load_tiny_decoder(SPEC, workspace["llm"], "meta", tmp_path / "x")
    model = build_medcap_model(decoder, image_token_id=400, vision="vit_tiny", vision_checkpoint=ckpt_path)
    assert torch.equal(model.visual.tower.state_dict()["conv1.weight"], ckpt["visual"]["conv1.weight"])


def test_fsdp2_resume_mid_epoch_equals_the_uninterrupted_run_bitwise(workspace, tmp_path):
    """The same under FSDP2 with 2 processes: each rank keeps its own random state."""
    common = ("epochs=2", "optimizer.lr=1e-2", "batch_size=1", "lr_scheduler.num_warmup_steps=1", *RANDOM_DATA)

    def dist_args(out: Path, *extra: str) -> list[str]:
        args = train_args(workspace, out, *common, *extra)
        args[1:2] = ["--nproc_per_node", "2", "full_finetune_distributed"]
        args[5] = "llama3/8B_full"
        return args

    medcap(*dist_args(tmp_path / "full"))
    part = tmp_path / "part"
    medcap(*dist_args(part, "stop_after_steps=2"))  # 4 steps an epoch: stops mid-epoch 0
    medcap(*dist_args(part, "resume_from_checkpoint=True", f"metric_logger.log_dir={part}/log2"))
    assert read_losses(part / "log") + read_losses(part / "log2") == read_losses(tmp_path / "full" / "log")
    assert_same_run(tmp_path / "full", part, last_epoch=1)
    state = torch.load(part / "checkpoint" / "recipe_state.pt", weights_only=True)
    assert len(state["rng"]) == 2 and not state["rng"][0]["torch"].equal(state["rng"][1]["torch"])


def test_optimizer_choices():
    """AdamW is fused on CUDA only; bitsandbytes' 8-bit AdamW steps on one device and is refused
    under FSDP2 (it fails on sharded parameters)."""
    from omegaconf import OmegaConf

    from medcap.training import build_optimizer

    params = [torch.nn.Parameter(torch.randn(64, 64))]
    adamw = build_optimizer(
        OmegaConf.create({"_component_": "torch.optim.AdamW", "lr": 1e-3}), params, torch.device("cpu"), False
    )
    assert not adamw.defaults.get("fused")
    bnb_cfg = OmegaConf.create({"_component_": "bitsandbytes.optim.AdamW8bit", "lr": 1e-3})
    opt = build_optimizer(bnb_cfg, params, torch.device("cpu"), False)
    before = params[0].detach().clone()
    params[0].grad = torch.ones_like(params[0])
    opt.step()
    assert not torch.equal(before, params[0])
    with pytest.raises(ValueError, match="cannot run under FSDP2"):
        build_optimizer(bnb_cfg, params, torch.device("cpu"), True)


def test_end_distributed_tears_the_group_down(tmp_path):
    """Training and the tensor-parallel judge end with it on every rank; without a group it is a no-op."""
    import torch.distributed as dist

    from medcap.distributed import end_distributed

    end_distributed()  # nothing initialised: nothing to do, no error
    store = dist.FileStore(str(tmp_path / "store"), 1)
    dist.init_process_group("gloo", store=store, rank=0, world_size=1)
    try:
        end_distributed()
        assert not dist.is_initialized()
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def test_bf16_on_cpu_runs_the_gpu_mixed_precision_path(workspace, tmp_path):
    """dtype=bf16 on a CPU: the frozen LLM in bf16, the vision side and its optimizer state in
    fp32, forwards under bf16 autocast, the loss in fp32; the loss falls, checkpoints hold fp32,
    the LLM is bitwise unchanged, and a bf16 checkpoint saved the original's way loads."""
    from helpers import load_tiny_decoder
    from omegaconf import OmegaConf

    from medcap.cli import load_recipe
    from medcap.models.fusion import build_medcap_model

    torch.manual_seed(0)
    start = build_medcap_model(load_tiny_decoder(SPEC, workspace["llm"], "meta", tmp_path / "x"),
                               image_token_id=400, vision="vit_tiny", num_image_tokens=8)  # fmt: skip
    original = tmp_path / "last.pt"  # the original's layout: bf16 tensors, no medcap entry
    torch.save({"visual": {k: v.bfloat16() for k, v in start.visual.tower.state_dict().items()},
                "projector": {k: v.bfloat16() for k, v in start.projector.state_dict().items()}}, original)  # fmt: skip
    out = tmp_path / "bf16"
    args = train_args(workspace, out, "dtype=bf16", "epochs=10", "optimizer.lr=1e-2", "lr_scheduler.num_warmup_steps=2",
                      f"vision_checkpoint={original}", "verify_frozen_llm=True", "num_image_tokens=8")[4:]  # fmt: skip
    cfg = OmegaConf.merge(OmegaConf.load(ROOT / "recipes" / "configs" / "llama3" / "8B_full_single_device.yaml"),
                          OmegaConf.from_dotlist(args))  # fmt: skip
    recipe = load_recipe("full_finetune").VisionFinetuneRecipe(cfg)
    recipe.setup()
    model = recipe.model
    assert {p.dtype for p in model.decoder.parameters()} == {torch.bfloat16}
    assert model.tok_embeddings.weight.dtype == torch.bfloat16
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert {p.dtype for p in trainable} == {torch.float32}
    assert torch.equal(model.projector[0].weight, start.projector[0].weight.bfloat16().float())  # loaded, upcast
    recipe.train()
    recipe.cleanup()
    assert {t.dtype for s in recipe.optimizer.state.values() for t in s.values() if t.dim()} == {torch.float32}
    losses = [loss for _, loss in recipe.history]
    assert len(losses) == 20 and losses[-1] < 0.8 * losses[0], losses
    ckpt = torch.load(out / "checkpoint" / "meta_model_9.pt", weights_only=True)
    assert {t.dtype for part in ("visual", "projector") for t in ckpt[part].values()} == {torch.float32}
    assert json.loads((out / "frozen_llm.json").read_text())["unchanged"] is True
