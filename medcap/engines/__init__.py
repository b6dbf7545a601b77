"""Where the frozen LLM runs, besides medcap's own decoding (``medcap.decoding``): ``vllm``, a
stock vLLM server reached over HTTP with prompt embeddings (medcap runs the vision side and the
embedding lookup; vLLM runs the LLM)."""

from medcap.engines.vllm import (
    Completion,
    ContextTooLong,
    EmbeddingWidthMismatch,
    ModelMismatch,
    VLLMClient,
    VLLMError,
    VLLMRequest,
    VLLMUnreachable,
    decode_embeds,
    encode_embeds,
)

__all__ = [
    "Completion",
    "ContextTooLong",
    "EmbeddingWidthMismatch",
    "ModelMismatch",
    "VLLMClient",
    "VLLMError",
    "VLLMRequest",
    "VLLMUnreachable",
    "decode_embeds",
    "encode_embeds",
]
