"""Decoding with images and a KV cache, in one room (torchtune's ``generate`` cannot pass images):

- ``batch``: left-padded prompts, and per cache slot the causal masks and RoPE positions;
- ``cache``: the only code that reads or writes torchtune's ``KVCache`` internals;
- ``step``: ``prefill`` / ``run_block`` (a block of tokens) and ``DecodeStep`` (one token per row),
  eager or compiled (``compile_decoding`` returns the compiled step: pass it to the loops);
- ``sampling``: the one sampler (greedy, temperature, top-k, top-p, banned ids);
- ``loops``: ``generate`` (one turn), ``generate_two_turns`` (a second turn on the first turn's
  caches), and ``ContinuousBatch`` (rows joining and leaving a running batch, for serving).
"""

from medcap.decoding.batch import Batch, left_pad
from medcap.decoding.continuous import ContinuousBatch, Row
from medcap.decoding.loops import generate, generate_two_turns, strip_at_stop
from medcap.decoding.sampling import Sampling, pick, pick_rows
from medcap.decoding.step import DecodeStep, compile_decoding, prefill

__all__ = [
    "Batch",
    "ContinuousBatch",
    "DecodeStep",
    "Row",
    "Sampling",
    "compile_decoding",
    "generate",
    "generate_two_turns",
    "left_pad",
    "pick",
    "pick_rows",
    "prefill",
    "strip_at_stop",
]
