"""Encoder + connector + a frozen torchtune decoder, joined at the input embeddings.

A thin equivalent of torchtune's ``EarlyFusionModel`` that (a) checks every row's placeholder
count against the image-token count (torchtune silently misaligns when there are too few),
(b) keeps the trainable parts under the names of the original checkpoints (``visual``,
``projector``) and (c) calls the encoder with a plain tensor.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import nn
from torchtune.data import CROSS_ENTROPY_IGNORE_IDX
from torchtune.modules import TransformerDecoder

from medcap.errors import ConfigError, MedcapError
from medcap.models import checkpoints
from medcap.models.connectors import build_connector
from medcap.models.embeddings_only import TokenEmbeddingsOnly
from medcap.models.lora import LORA_KEY, LoraSpec, apply_lora, enable_lora_training, load_lora_state
from medcap.models.shared_prefix import (
    MIN_SHARED,
    can_share,
    run_layers_with_shared_prefix,
    shared_prefix_length,
)
from medcap.models.vision import VisionEncoder, build_vision_encoder


class PlaceholderMismatchError(MedcapError, ValueError):
    """A batch row whose image placeholders do not match the image-token count."""


def decoder_width(decoder: TransformerDecoder) -> int:
    if not isinstance(decoder.tok_embeddings, nn.Embedding):
        raise ValueError("this decoder already belongs to a MedcapModel (its token embedding has moved)")
    return decoder.tok_embeddings.embedding_dim


class MedcapModel(nn.Module):
    """Image tokens written into the placeholder positions of a frozen decoder's input.

    The placeholder id is never looked up in the embedding table, so it may lie outside the
    vocabulary: no text can produce it.
    """

    def __init__(
        self,
        decoder: TransformerDecoder,
        visual: VisionEncoder,
        projector: nn.Module,
        image_token_id: int,
        turn_end_ids: Sequence[int] = (),
    ):
        super().__init__()
        llm_dim = decoder_width(decoder)
        if projector.llm_dim != llm_dim:
            raise ValueError(f"connector width {projector.llm_dim} != decoder width {llm_dim}")
        # The decoder gets embeddings, not ids: its embedding moves here (TiedLinear output
        # heads keep a reference to the same module, so tying survives).
        self.tok_embeddings = decoder.tok_embeddings
        decoder.tok_embeddings = nn.Identity()
        self.decoder = decoder
        self.visual = visual
        self.projector = projector
        self.image_token_id = int(image_token_id)
        # the tokenizer's end-of-turn ids: a question connector's question ends at the user's turn end
        self.turn_end_ids = tuple(int(t) for t in turn_end_ids)
        # training: the columns every row begins with (the system prompt) run once (medcap.models.shared_prefix)
        self.share_prefix = False

    @property
    def num_image_tokens(self) -> int:
        """Decided once, by the connector; every other part asks here."""
        return self.projector.num_tokens

    @property
    def llm_dim(self) -> int:
        return self.tok_embeddings.embedding_dim

    def encode_images(self, images: torch.Tensor, questions: torch.Tensor | None = None) -> torch.Tensor:
        """[M, 3, H, W] pixels -> [M, N, D] image tokens (``questions`` [M, D]: the question connectors)."""
        features = self.visual(images)
        if getattr(self.projector, "needs_question", False):
            return self.projector(features, questions)
        return self.projector(features)

    def questions(
        self, h: torch.Tensor, is_image: torch.Tensor, labels: torch.Tensor | None, tokens: torch.Tensor | None = None
    ) -> torch.Tensor:
        """[M, D]: for each image (in row order), the mean embedding of the text that follows its
        placeholders, up to the next image, the end of the user's turn (a ``turn_end_ids`` token
        in ``tokens``) or the answer (the first labelled position), whichever comes first. The
        turn end makes training (whose labels begin at the assistant header) and generation
        (whose prompt ends with that header) average the same tokens; the label bound means the
        connector never sees the answer it is trained to produce. Prompts are left-padded at
        inference and right-padded in training, so no pad token falls in a span."""
        out = []
        n = self.num_image_tokens
        turn_ends = None
        if tokens is not None and self.turn_end_ids:
            turn_ends = torch.isin(tokens, torch.tensor(self.turn_end_ids, device=tokens.device))
        for row in range(h.shape[0]):
            end = h.shape[1]
            if labels is not None:
                labelled = (labels[row] != CROSS_ENTROPY_IGNORE_IDX).nonzero()
                end = int(labelled[0]) + 1 if len(labelled) else end
            places = is_image[row].nonzero().flatten().tolist()
            firsts, lasts = places[::n], places[n - 1 :: n]  # each image's first and last placeholder
            for k, last in enumerate(lasts):
                stop = min(end, firsts[k + 1]) if k + 1 < len(firsts) else end
                if turn_ends is not None:
                    after = turn_ends[row, last + 1 : stop].nonzero()
                    stop = last + 1 + int(after[0]) if len(after) else stop
                span = h[row, last + 1 : stop]
                out.append(span.mean(dim=0) if len(span) else h.new_zeros(h.shape[-1]))
        return torch.stack(out) if out else h.new_zeros(0, h.shape[-1])

    def check_placeholders(self, tokens: torch.Tensor, num_images: int) -> torch.Tensor:
        """Each row holds N placeholders per image (usually 0 or 1 image); the images, in row
        order, must be exactly as many as the placeholder runs."""
        is_image = tokens == self.image_token_id
        counts = is_image.sum(dim=1).tolist()
        n = self.num_image_tokens
        for row, found in enumerate(counts):
            if found % n:
                raise PlaceholderMismatchError(
                    f"batch row {row}: expected {n} image placeholder tokens (id {self.image_token_id}) "
                    f"per image, found {found}; was the prompt truncated or built for another connector?"
                )
        expected = sum(counts) // n
        if expected != num_images:
            raise PlaceholderMismatchError(
                f"{num_images} images given but the placeholders in batch rows "
                f"{[r for r, c in enumerate(counts) if c]} call for {expected}"
            )
        return is_image

    def embed(
        self, tokens: torch.Tensor, images: torch.Tensor | None = None, labels: torch.Tensor | None = None
    ) -> torch.Tensor:
        num_images = 0 if images is None else images.shape[0]
        is_image = self.check_placeholders(tokens, num_images)
        h = self.tok_embeddings(tokens.masked_fill(is_image, 0))
        if num_images:
            questions = (
                self.questions(h.detach(), is_image, labels, tokens)
                if getattr(self.projector, "needs_question", False)
                else None
            )
            image_tokens = self.encode_images(images, questions).to(h.dtype)
            h = h.masked_scatter(is_image.unsqueeze(-1), image_tokens)
        return h

    def forward(
        self,
        tokens: torch.Tensor,
        *,
        images: torch.Tensor | None = None,
        mask: torch.Tensor | None = None,
        input_pos: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """Logits [B, S, V] for ``tokens`` [B, S] with ``images`` [M, 3, H, W] in row order.

        With ``labels`` [B, S] (already shifted: ``labels[:, t]`` is the target after position
        t, ignore index ``CROSS_ENTROPY_IGNORE_IDX``) the output head runs only where a label is, and the result is
        ``(logits [K, V] in fp32, targets [K])``: with ~400-token prompts and ~30-token answers
        full-vocabulary logits at every position are most of the head's time and memory.
        """
        h = self.embed(tokens, images, labels)
        if labels is None:
            return self.decoder(h, mask=mask, input_pos=input_pos)
        shared = self.shared_columns(tokens, labels, mask, input_pos)
        if shared:
            h = run_layers_with_shared_prefix(self.decoder.layers, h, shared)
            labels = labels[:, shared:]
        else:
            for layer in self.decoder.layers:  # TransformerDecoder.forward, minus the head
                h = layer(h, mask=mask, input_pos=input_pos)
        h, targets = self.labelled(self.decoder.norm(h), labels)
        return self.decoder.output(h).float(), targets

    def shared_columns(
        self, tokens: torch.Tensor, labels: torch.Tensor, mask: torch.Tensor | None, input_pos: torch.Tensor | None
    ) -> int:
        """How many leading columns the training pass runs once for all rows (0: none)."""
        if not self.share_prefix or mask is not None or input_pos is not None or tokens.shape[0] < 2:
            return 0
        if self.caches_are_enabled() or not can_share(self.decoder.layers):
            return 0
        shared = shared_prefix_length(tokens, labels, self.image_token_id)
        return shared if MIN_SHARED <= shared < tokens.shape[1] else 0

    def labelled(self, h: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Hidden states [K, D] and targets [K] where a label is (their count depends on the
        labels' values: ``medcap.estimate`` replaces this with a fixed count to trace shapes only)."""
        keep = labels != CROSS_ENTROPY_IGNORE_IDX
        return h[keep], labels[keep]

    # KV-cache plumbing used by generation; the decoder owns the caches.
    def setup_caches(
        self, batch_size: int, dtype: torch.dtype, decoder_max_seq_len: int | None = None
    ) -> None:
        self.decoder.setup_caches(batch_size, dtype, decoder_max_seq_len=decoder_max_seq_len)

    def reset_caches(self) -> None:
        self.decoder.reset_caches()

    def caches_are_enabled(self) -> bool:
        return self.decoder.caches_are_enabled()

    def caches_are_setup(self) -> bool:
        return self.decoder.caches_are_setup()


def set_trainable(model: MedcapModel, freeze_vision_encoder: bool = False) -> None:
    """The LLM never learns; the connector always does; the encoder unless frozen (LLaVA stage 1)."""
    model.decoder.requires_grad_(False)
    model.tok_embeddings.requires_grad_(False)
    model.visual.requires_grad_(not freeze_vision_encoder)
    model.projector.requires_grad_(True)


def count_parameters(model: nn.Module) -> tuple[int, int]:
    """(trainable, frozen) parameter counts; tied weights are counted once."""
    seen: set[int] = set()
    trainable = frozen = 0
    for p in model.parameters():
        if id(p) in seen:
            continue
        seen.add(id(p))
        if p.requires_grad:
            trainable += p.numel()
        else:
            frozen += p.numel()
    return trainable, frozen


def frozen_fingerprint(model: nn.Module) -> str:
    """SHA-256 over every frozen parameter's name and bytes (this process's shard under FSDP2):
    equal before and after training proves the LLM was not touched."""
    digest = hashlib.sha256()
    for name, p in model.named_parameters():
        if p.requires_grad:
            continue
        t = p.detach()
        t = t.to_local() if hasattr(t, "to_local") else t
        digest.update(name.encode())
        digest.update(t.cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def build_medcap_model(
    decoder: TransformerDecoder,
    *,
    image_token_id: int,
    vision: str = "biomedclip",
    vision_path: str | Path | None = None,
    connector: str | None = None,
    num_image_tokens: int | None = None,
    vision_checkpoint: str | Path | None = None,
    vision_pretrained: bool = False,
    freeze_vision_encoder: bool = False,
    turn_end_ids: Sequence[int] = (),
    llm_lora: LoraSpec | None = None,
) -> MedcapModel:
    """Join ``decoder`` (LLM weights already loaded) with a vision encoder and connector.

    With ``vision_checkpoint`` the connector kind and N are read from the file (the
    original release has N = 32, a later one 50) and its weights are loaded; otherwise
    ``connector`` defaults to ``cls_mlp``. Without a checkpoint, ``vision_pretrained`` starts
    the encoder from its pretrained weights (BiomedCLIP's, from the hub cache), where it has
    some; a checkpoint alone decides the weights (no hub lookup). ``turn_end_ids`` (the tokenizer's ``stop_tokens``)
    tell the question connectors where the user's question ends. ``llm_lora`` adapts the LLM's
    projections with LoRA (only the adapters learn); a checkpoint holding LoRA weights adapts
    the LLM as it was trained and loads them.
    """
    llm_dim = decoder_width(decoder)
    ckpt = None
    if vision_checkpoint is not None:
        ckpt = checkpoints.read_vision_checkpoint(vision_checkpoint)
        connector, num_image_tokens = ckpt.resolve_connector(connector, num_image_tokens, llm_dim)
        saved_encoder = ckpt.meta.get("encoder")
        if saved_encoder and saved_encoder != vision:
            raise ValueError(
                f"{vision_checkpoint}: trained with vision={saved_encoder}, but vision={vision} was asked for"
            )
        if ckpt.lora is not None:
            saved_lora = LoraSpec.from_dict(ckpt.lora)
            if llm_lora is not None and llm_lora != saved_lora:
                raise ValueError(f"{vision_checkpoint}: holds LoRA {saved_lora}, but {llm_lora} was asked for")
            llm_lora = saved_lora
    if llm_lora is not None and isinstance(decoder, TokenEmbeddingsOnly):
        raise ConfigError(
            f"{vision_checkpoint or 'llm_lora'}: the LLM is adapted with LoRA ({llm_lora}), but only its embedding "
            "table is loaded here and another engine (vLLM) runs the stock LLM: use engine=medcap"
        )
    connector = connector or "cls_mlp"
    visual = build_vision_encoder(vision, vision_path, pretrained=vision_pretrained and ckpt is None)
    projector = build_connector(
        connector,
        pooled_dim=visual.pooled_dim,
        patch_dim=visual.patch_dim,
        num_patches=visual.num_patches,
        llm_dim=llm_dim,
        num_image_tokens=num_image_tokens,
    )
    model = MedcapModel(decoder, visual, projector, image_token_id, turn_end_ids)
    if ckpt is not None:
        checkpoints.load_vision_state(model, ckpt)
        visual.weights = f"the vision checkpoint {ckpt.path}"
    set_trainable(model, freeze_vision_encoder)
    if llm_lora is not None:  # after the vision side: both variants draw the same random vision init
        apply_lora(decoder, llm_lora)
        if ckpt is not None and ckpt.lora is not None:
            load_lora_state(decoder, ckpt.lora["state"], f"{vision_checkpoint} ['{LORA_KEY}']")
        enable_lora_training(decoder)
    return model
