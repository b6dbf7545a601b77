"""The two models ``make claims`` compares, named once for the pipeline and the report."""

LORA_RANK = 8
LORA_ALPHA = 16.0
LORA_MODULES = ("q_proj", "k_proj", "v_proj", "output_proj", "w1", "w2", "w3")  # attention and MLP
VARIANTS = {
    "frozen": "(a) medcap: vision encoder + connector, LLM frozen",
    "lora": f"(b) vision encoder + connector + LLM LoRA (rank {LORA_RANK}, alpha {LORA_ALPHA:g}, attention and MLP)",
}
