"""``make claims``: test the seed's first claim. Two models learn from the same image-caption
pairs only: (a) medcap, the vision side with the LLM frozen, and (b) the usual recipe, the same
vision side plus the LLM adapted with LoRA. Both then answer what neither was trained for (VQA,
reworded questions, the LLM's own plain-text abilities) and caption; ``claims.json`` and
``claims.html`` hold the paired-bootstrap differences (a) - (b) with a verdict per claim."""
