import json
import subprocess
import sys

import pytest
import torch
from helpers import PROJECT_ROOT

from dmoe_train.models import load_model


@pytest.mark.slow
def test_a_few_steps_write_a_base_that_loads(tmp_path):
    script = PROJECT_ROOT / "scripts" / "make_tiny_base.py"
    out = tmp_path / "base"
    run = [sys.executable, str(script), "--steps", "3", "--out", str(out)]
    done = subprocess.run(run, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    quality = json.loads((out / "quality.json").read_text())
    assert quality["train_steps"] == 3 and 0.0 <= quality["exact_match"] <= 1.0
    model = load_model(out)
    assert next(model.parameters()).dtype == torch.bfloat16  # saved as shipped
    assert model.config.num_experts == 32 and model.config.routing.name == "token"
