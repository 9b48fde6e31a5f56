"""What the bad-input specification (`tests/spec/`) shares."""

import json
from pathlib import Path

from helpers import (
    compose_train,
    steps,
)
from hydra import compose, initialize_config_dir

from dmoe_train.cli import export as export_cli
from dmoe_train.cli.train import train
from dmoe_train.evaluation.run import run_eval
from dmoe_train.locations import CONFIG_DIR


def evaluate(out: Path, *overrides: str) -> dict:
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        cfg = compose(
            "eval",
            [f"paths.output_dir={out}", "generation.max_samples=32", *overrides],
        )
    return run_eval(cfg)


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


SUMS = [{"question": f"{a}+{b}=", "answer": str(a + b)} for a in range(10) for b in range(8)]


NOISE = ("Tip:", "model of type", "LeafSpec", "Epoch 0/-2", "not resumable")


def interrupted_run(run: Path, *overrides: str) -> list[str]:
    """Overrides of a run interrupted (SIGTERM) at step 2 of 6, and run to there."""
    common = [*steps(6, checkpoint_every=2), "+callbacks.stop._target_=helpers.InterruptAtStep"]
    common.append("+callbacks.stop.step=2")
    assert train(compose_train(run, *common, *overrides)) == {"interrupted_at_step": 2}
    return common


def refuse_loading(*_, **__):
    raise AssertionError("data or model loaded before the output directory was checked")


def data_only_instantiate(node, *args, **kwargs):
    """`instantiate` that builds the data module and refuses the model."""
    from hydra.utils import instantiate

    if "load_model" in str(node.get("_target_", "")):
        raise AssertionError("the model was loaded before the bad setting was refused")
    return instantiate(node, *args, **kwargs)


def export_a_lora_run(tmp_path: Path) -> None:
    run = tmp_path / "run"
    train(compose_train(run, *steps(2), "module.trainable=router+lora", "module.lora.rank=2"))
    router = run / "checkpoints" / "router.safetensors"
    export_cli.export(router, tmp_path / "exp", adapter_out=tmp_path / "adapter")
