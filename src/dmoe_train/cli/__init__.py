"""The command-line entry points: `dmoe-train`, `dmoe-eval`, `dmoe-export`."""
