"""dmoe-train: router fine-tuning of MoE diffusion LMs for block-level routing."""
