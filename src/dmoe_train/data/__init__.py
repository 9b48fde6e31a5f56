"""Data: the synthetic arithmetic task, local/hub datasets, tokenization and the DataModule."""
