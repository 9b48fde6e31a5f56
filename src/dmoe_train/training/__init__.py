"""Training: the LightningModule (`finetuner`), its callbacks, atomic Lightning checkpoints and
run directories. Knows Lightning, never Hydra."""
