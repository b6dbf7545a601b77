"""medcap's side of a remote LLM: the prompt embeddings exactly as medcap's own engine feeds its
decoder (``MedcapModel.embed``: the frozen LLM's ``tok_embeddings`` lookup with the image tokens
written in), one ``[seq, hidden]`` tensor per prompt; and ``RemoteGenerator.generate``, the
counterpart of ``medcap.decoding.generate`` that sends them to vLLM, a batch's prompts at once
(vLLM batches them itself), and returns the new token ids of each."""

from __future__ import annotations

from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor

import torch

from medcap.decoding.sampling import Sampling
from medcap.engines.vllm import VLLMClient, VLLMRequest


@torch.no_grad()
def prompt_embeddings(model: torch.nn.Module, prompts: Sequence[Sequence[int]], images: torch.Tensor | None,
                      pad_id: int) -> list[torch.Tensor]:  # fmt: skip
    """One [len(prompt), hidden] tensor per prompt. The prompts are embedded together, left-padded
    as medcap's engine pads them, so the vision encoder sees the same batch of images (``images``
    [M, 3, H, W], in order, for the prompts holding placeholders) and the pads are cut off."""
    if not prompts:
        return []
    device = model.tok_embeddings.weight.device
    width = max(len(p) for p in prompts)
    tokens = torch.full((len(prompts), width), int(pad_id), dtype=torch.long, device=device)
    for row, p in enumerate(prompts):
        if p:
            tokens[row, width - len(p) :] = torch.tensor(list(p), dtype=torch.long, device=device)
    h = model.embed(tokens, None if images is None else images.to(device))
    return [h[row, width - len(p) :] for row, p in enumerate(prompts)]


def vllm_request(sampling: Sampling | None, *, max_new_tokens: int, stop_tokens: Sequence[int],
                 banned: Sequence[int] = ()) -> VLLMRequest:  # fmt: skip
    """medcap's ``Sampling`` as vLLM's parameters. A sampled request takes its seed from the
    sampling's generator, so a seeded run sends the same seeds again (vLLM's sampler draws other
    numbers than medcap's: sampled answers are reproducible, not equal to medcap's engine's)."""
    s = sampling or Sampling()
    seed = None
    if not s.greedy:
        seed = int(torch.randint(0, 2**62, (1,), generator=s.rng)) if s.rng is not None else None
    return VLLMRequest(max_tokens=int(max_new_tokens), temperature=float(s.temperature), top_k=s.top_k,
                       top_p=float(s.top_p), seed=seed, stop_token_ids=tuple(int(t) for t in stop_tokens),
                       banned=tuple(sorted({*s.banned, *(int(b) for b in banned)})))  # fmt: skip


class RemoteGenerator:
    """``generate`` through a vLLM server; ``workers`` requests in flight at once."""

    def __init__(self, client: VLLMClient, workers: int = 8):
        self.client = client
        self.pool = ThreadPoolExecutor(max_workers=max(1, int(workers)), thread_name_prefix="medcap-vllm")

    def close(self) -> None:
        self.pool.shutdown(wait=False, cancel_futures=True)

    def generate(
        self,
        model: torch.nn.Module,
        prompts: Sequence[Sequence[int]],
        images: torch.Tensor | None = None,
        *,
        max_new_tokens: int,
        stop_tokens: Sequence[int],
        pad_id: int,
        sampling: Sampling | None = None,
    ) -> list[list[int]]:
        """New tokens for each prompt (stop token excluded), as ``medcap.decoding.generate``."""
        embeds = prompt_embeddings(model, prompts, images, pad_id)
        placeholder = getattr(model, "image_token_id", None)
        requests = [vllm_request(sampling, max_new_tokens=max_new_tokens, stop_tokens=stop_tokens,
                                 banned=() if placeholder is None else (placeholder,)) for _ in prompts]  # fmt: skip
        futures = [self.pool.submit(self.client.complete, e, r) for e, r in zip(embeds, requests)]
        return [f.result().token_ids for f in futures]
