"""The model families: ours (LLaDA2-MoE, LLaDA-MoE) and transformers' DiffusionGemma."""
