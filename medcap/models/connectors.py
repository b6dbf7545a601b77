"""Connectors: encoder features -> a fixed number of LLM-width image tokens.

All are ``nn.Sequential(Linear, GELU, Linear)`` so their state dicts carry the original medcap
``projector`` key names (``0.weight``, ``0.bias``, ``2.weight``, ``2.bias``); ``question_film``,
``patch_film`` and ``patch_question`` add ``film.weight`` and ``film.bias``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from medcap.errors import ConfigError
from medcap.models.vision import VisionFeatures

DEFAULT_NUM_IMAGE_TOKENS = 32


class ClsMLP(nn.Sequential):
    """The original medcap connector: one pooled vector -> N tokens (chunk k is token k)."""

    kind = "cls_mlp"
    needs_question = False

    def __init__(self, in_dim: int, llm_dim: int, num_tokens: int = DEFAULT_NUM_IMAGE_TOKENS):
        if num_tokens < 1:
            raise ConfigError(f"num_image_tokens must be >= 1, got {num_tokens}")
        super().__init__(nn.Linear(in_dim, llm_dim), nn.GELU(), nn.Linear(llm_dim, llm_dim * num_tokens))
        self.num_tokens = num_tokens
        self.llm_dim = llm_dim

    def forward(self, features: VisionFeatures) -> torch.Tensor:
        return self.tokens(features.pooled)

    def tokens(self, x: torch.Tensor, scale: torch.Tensor | None = None) -> torch.Tensor:
        """[M, in_dim] -> [M, N, llm_dim]; ``scale`` [M, llm_dim] multiplies the hidden features."""
        hidden = self[1](self[0](x))
        out = self[2](hidden if scale is None else hidden * scale)
        return out.view(out.shape[0], self.num_tokens, self.llm_dim)


class PatchMLP(nn.Sequential):
    """LLaVA-1.5's mlp2x_gelu: each patch token becomes one image token."""

    kind = "patch_mlp"
    needs_question = False

    def __init__(self, in_dim: int, llm_dim: int, num_patches: int):
        super().__init__(nn.Linear(in_dim, llm_dim), nn.GELU(), nn.Linear(llm_dim, llm_dim))
        self.num_tokens = num_patches
        self.llm_dim = llm_dim

    def forward(self, features: VisionFeatures) -> torch.Tensor:
        return super().forward(features.patches)


class QuestionMLP(ClsMLP):
    """The pooled image vector and the question (the mean of its frozen token embeddings) ->
    N tokens. Seeing the question lets the image tokens carry the answer to "Is this an MRI?",
    which a small frozen LLM cannot work out from question-blind image tokens (InstructBLIP's
    instruction-aware connector, as a plain MLP)."""

    kind = "question_mlp"
    needs_question = True

    def __init__(self, in_dim: int, llm_dim: int, num_tokens: int = DEFAULT_NUM_IMAGE_TOKENS):
        super().__init__(in_dim + llm_dim, llm_dim, num_tokens)

    def forward(self, features: VisionFeatures, question: torch.Tensor) -> torch.Tensor:
        return self.tokens(torch.cat([features.pooled, question.to(features.pooled.dtype)], dim=-1))


def zero_film(llm_dim: int) -> nn.Linear:
    """The question's FiLM layer, at zero: a FiLM connector starts as its question-blind twin."""
    film = nn.Linear(llm_dim, llm_dim)
    nn.init.zeros_(film.weight)
    nn.init.zeros_(film.bias)
    return film


def film_scale(film: nn.Linear, question: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``1 + Wq LayerNorm(question)``: [M, llm_dim] per-feature factors for the hidden features."""
    return 1 + film(F.layer_norm(question.to(dtype), (question.shape[-1],)))


class QuestionFiLM(ClsMLP):
    """``cls_mlp`` whose hidden features are scaled per feature by the question (FiLM, Perez et
    al. 2018): ``h = GELU(W0 pooled) * (1 + Wq LayerNorm(question))``. A product, not a
    concatenation: where every image has a Yes and a No question and every question text is
    answered Yes as often as No, the first-order gradients of a concatenation cancel, and only
    the image x question term can learn the answer. ``Wq`` starts at zero, so training starts
    from ``cls_mlp`` and the question's effect grows from there."""

    kind = "question_film"
    needs_question = True

    def __init__(self, in_dim: int, llm_dim: int, num_tokens: int = DEFAULT_NUM_IMAGE_TOKENS):
        super().__init__(in_dim, llm_dim, num_tokens)
        self.film = zero_film(llm_dim)

    def forward(self, features: VisionFeatures, question: torch.Tensor) -> torch.Tensor:
        return self.tokens(features.pooled, scale=film_scale(self.film, question, features.pooled.dtype))


class PatchFiLM(PatchMLP):
    """``patch_mlp`` whose hidden features are scaled by the question, as ``question_film``
    scales the pooled vector's: ``h_p = GELU(W0 patch_p) * (1 + Wq LayerNorm(question))`` for
    every patch p. Plane and laterality are spatial (a pooled vector lost them in the demo) and
    "Is this an MRI?" needs the question; this keeps the patches and lets the question choose
    what each patch token carries. ``Wq`` starts at zero: training starts from ``patch_mlp``."""

    kind = "patch_film"
    needs_question = True

    def __init__(self, in_dim: int, llm_dim: int, num_patches: int):
        super().__init__(in_dim, llm_dim, num_patches)
        self.film = zero_film(llm_dim)

    def forward(self, features: VisionFeatures, question: torch.Tensor) -> torch.Tensor:
        patches = features.patches
        hidden = self[1](self[0](patches)) * film_scale(self.film, question, patches.dtype).unsqueeze(1)
        return self[2](hidden)


class PatchQuestion(PatchFiLM):
    """``patch_mlp``'s tokens unchanged, plus one token for the question: the mean patch through
    the same MLP with its hidden features scaled by the question (``question_film`` on the mean
    patch). The patches stay as they are (``patch_film``, which scales them, lost the image in the
    demo); the extra token can carry what the question asks of them. Zero film: the extra token
    is the mean patch's, whatever the question."""

    kind = "patch_question"
    extra_tokens = 1

    def __init__(self, in_dim: int, llm_dim: int, num_patches: int):
        super().__init__(in_dim, llm_dim, num_patches)
        self.num_tokens = num_patches + self.extra_tokens

    def forward(self, features: VisionFeatures, question: torch.Tensor) -> torch.Tensor:
        patches = features.patches
        hidden = self[1](self[0](torch.cat([patches, patches.mean(dim=1, keepdim=True)], dim=1)))
        scale = torch.ones_like(hidden)
        scale[:, -1] = film_scale(self.film, question, patches.dtype)
        return self[2](hidden * scale)


CONNECTORS = {cls.kind: cls for cls in (ClsMLP, PatchMLP, QuestionMLP, QuestionFiLM, PatchFiLM, PatchQuestion)}
PER_PATCH = tuple(kind for kind, cls in CONNECTORS.items() if issubclass(cls, PatchMLP))


def build_connector(
    name: str,
    *,
    pooled_dim: int,
    patch_dim: int,
    num_patches: int,
    llm_dim: int,
    num_image_tokens: int | None = None,
) -> ClsMLP | PatchMLP | QuestionMLP | QuestionFiLM | PatchFiLM | PatchQuestion:
    if name not in CONNECTORS:
        raise ConfigError(f"unknown connector {name!r}; choose one of {tuple(CONNECTORS)}")
    if name not in PER_PATCH:  # one pooled vector -> N tokens
        return CONNECTORS[name](pooled_dim, llm_dim, DEFAULT_NUM_IMAGE_TOKENS if num_image_tokens is None else num_image_tokens)
    extra = getattr(CONNECTORS[name], "extra_tokens", 0)
    if num_image_tokens not in (None, num_patches + extra):
        raise ConfigError(
            f"connector={name} gives one token per patch ({num_patches})"
            + (f" and {extra} more ({num_patches + extra})" if extra else "")
            + f"; num_image_tokens={num_image_tokens} cannot be honoured"
        )
    return CONNECTORS[name](patch_dim, llm_dim, num_patches)


def connector_spec(projector_state: dict[str, torch.Tensor]) -> tuple[int, int, int]:
    """(in_dim, llm_dim, out_features) read from a projector state dict's shapes."""
    try:
        w0, w2 = projector_state["0.weight"], projector_state["2.weight"]
    except KeyError as e:
        raise ValueError(
            f"projector state dict lacks {e.args[0]!r} (has {sorted(projector_state)})"
        ) from None
    return int(w0.shape[1]), int(w0.shape[0]), int(w2.shape[0])
