"""The LLM adapted with LoRA, for comparison with medcap's frozen LLM (``make claims``).

torchtune's ``LoRALinear`` replaces the attention and MLP projections of an already loaded
decoder in place: the base weight is the same tensor (so the base LLM's keys, values and file
are untouched) and only ``lora_a`` / ``lora_b`` learn. ``lora_b`` starts at zero, so the adapted
model starts exactly where the base one is. Adapting a loaded decoder works for every builder
(medcap's ``smollm2_135m`` included, which torchtune's ``lora_llama3*`` builders cannot build:
its output head is tied and its RoPE plain).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torchtune.modules.peft import LoRALinear, get_adapter_params

from medcap.errors import ConfigError

ATTENTION = ("q_proj", "k_proj", "v_proj", "output_proj")
MLP = ("w1", "w2", "w3")
# where each adaptable projection lives in a torchtune TransformerSelfAttentionLayer
OWNERS = {**{name: "attn" for name in ATTENTION}, **{name: "mlp" for name in MLP}}
LORA_KEY = "llm_lora"  # the vision checkpoint's entry for the LoRA weights


@dataclass(frozen=True)
class LoraSpec:
    """Which projections are adapted, at which rank and scale (``alpha / rank``)."""

    rank: int
    alpha: float
    modules: tuple[str, ...] = ATTENTION + MLP

    def __post_init__(self) -> None:
        if self.rank < 1:
            raise ConfigError(f"llm_lora_rank={self.rank}: expected at least 1")
        unknown = [m for m in self.modules if m not in OWNERS]
        if unknown or not self.modules:
            raise ConfigError(f"llm_lora_modules={list(self.modules)}: expected some of {list(OWNERS)}")

    def as_dict(self) -> dict[str, Any]:
        return {"rank": self.rank, "alpha": self.alpha, "modules": list(self.modules)}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> LoraSpec:
        return cls(int(d["rank"]), float(d["alpha"]), tuple(d["modules"]))


def apply_lora(decoder: nn.Module, spec: LoraSpec, dtype: torch.dtype = torch.float32) -> int:
    """Swap each named projection of every layer for a ``LoRALinear`` on the same base weight;
    the adapter weights are ``dtype`` (fp32 for training, as the vision side). Returns how many
    projections were adapted."""
    adapted = 0
    for layer in decoder.layers:
        for name in spec.modules:
            owner = getattr(layer, OWNERS[name])
            base = getattr(owner, name)
            if not isinstance(base, nn.Linear):
                raise ConfigError(f"llm_lora_modules: {OWNERS[name]}.{name} is a {type(base).__name__}, not a Linear")
            with torch.device("meta"):  # no throwaway copy of the base weight
                lora = LoRALinear(base.in_features, base.out_features, rank=spec.rank, alpha=spec.alpha,
                                  use_bias=base.bias is not None)  # fmt: skip
            lora.weight = base.weight
            if base.bias is not None:
                lora.bias = base.bias
            lora.lora_a.to_empty(device=base.weight.device)
            lora.lora_b.to_empty(device=base.weight.device)
            lora.initialize_parameters()  # lora_a: Kaiming uniform, lora_b: zeros
            lora.lora_a.to(dtype)
            lora.lora_b.to(dtype)
            setattr(owner, name, lora)
            adapted += 1
    return adapted


def lora_spec_of(decoder: nn.Module) -> LoraSpec | None:
    """The spec of an adapted decoder, or None for a plain one."""
    for layer in getattr(decoder, "layers", []):
        found = [n for n in OWNERS if isinstance(getattr(getattr(layer, OWNERS[n]), n, None), LoRALinear)]
        if found:
            first = getattr(getattr(layer, OWNERS[found[0]]), found[0])
            return LoraSpec(first.rank, float(first.alpha), tuple(found))
    return None


def lora_state(decoder: nn.Module) -> dict[str, torch.Tensor]:
    """Only the adapter weights (``layers.N.attn.q_proj.lora_a.weight``, ...), on the CPU."""
    return {k: v.detach().to("cpu").clone() for k, v in get_adapter_params(decoder).items()}


def load_lora_state(decoder: nn.Module, state: dict[str, torch.Tensor], what: str) -> None:
    """Adapter weights into an adapted decoder: every adapter key present, nothing else."""
    params = get_adapter_params(decoder)
    missing = sorted(set(params) - set(state))
    unexpected = sorted(set(state) - set(params))
    if missing or unexpected:
        raise ConfigError(f"{what}: LoRA weights do not fit the model (missing {missing[:3]}, unexpected {unexpected[:3]})")
    with torch.no_grad():
        for name, p in params.items():
            if tuple(p.shape) != tuple(state[name].shape):
                raise ConfigError(f"{what}: {name} is {tuple(state[name].shape)}, the model's {tuple(p.shape)}")
            p.copy_(state[name])


def lora_payload(decoder: nn.Module) -> dict[str, Any] | None:
    """The vision checkpoint's ``llm_lora`` entry (spec + weights), None without adapters."""
    spec = lora_spec_of(decoder)
    return None if spec is None else {**spec.as_dict(), "state": lora_state(decoder)}


def enable_lora_training(decoder: nn.Module) -> None:
    """Adapter weights learn; the base weights stay as ``set_trainable`` left them (frozen)."""
    for p in get_adapter_params(decoder).values():
        p.requires_grad_(True)
