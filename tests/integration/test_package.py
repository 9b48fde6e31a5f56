"""A wheel installed outside the repository runs the CLIs from another directory."""

import json
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest
from helpers import FAST

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_wheel_trains_evaluates_and_exports_elsewhere(tmp_path):
    # built from a copy: setuptools writes build/ next to the sources
    source = tmp_path / "source"
    shutil.copytree(REPO / "src", source / "src", ignore=shutil.ignore_patterns("*.egg-info"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / name, source / name)
    dist = tmp_path / "dist"
    pip = [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-w"]
    subprocess.run([*pip, str(dist), str(source)], check=True, capture_output=True)
    (wheel,) = dist.glob("*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    assert {"dmoe_train/configs/train.yaml", "dmoe_train/configs/router/dmoe.yaml"} <= names
    assert "dmoe_train/assets/tiny-llada2/model.safetensors" in names  # the embedded default

    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    site = Path(
        subprocess.run(
            [
                venv / "bin" / "python",
                "-c",
                "import sysconfig; print(sysconfig.get_paths()['purelib'])",
            ],
            check=True,
            capture_output=True,
            text=True,
        ).stdout.strip()
    )
    # the dependencies from this environment (torch and the rest), but not its editable
    # dmoe_train: a plain path line, so the editable install's own .pth is not processed
    (site / "deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    subprocess.run(
        [venv / "bin" / "pip", "install", "-q", "--no-deps", "--no-index", str(wheel)], check=True
    )
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()

    def run(*cmd: str) -> subprocess.CompletedProcess:
        return subprocess.run(cmd, cwd=elsewhere, capture_output=True, text=True)

    where = run(str(venv / "bin" / "python"), "-c", "import dmoe_train; print(dmoe_train.__file__)")
    assert where.stdout.startswith(str(venv)), where.stdout

    out = elsewhere / "outputs" / "short"
    trained = run(  # the embedded default from the wheel: no model path given
        str(venv / "bin" / "dmoe-train"),
        f"hydra.run.dir={out}",
        "trainer.max_steps=2",
        "trainer.val_check_interval=2",
        *FAST,
    )
    assert trained.returncode == 0, trained.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["steps"] == 2
    # Hydra's job log holds the run's summary
    assert "unique experts per block" in (out / "train.log").read_text()

    router = out / "checkpoints" / "router.safetensors"
    exported = run(str(venv / "bin" / "dmoe-export"), "--router", str(router), "--out", "exp")
    assert exported.returncode == 0, exported.stderr[-3000:]
    assert json.loads((elsewhere / "exp" / "config.json").read_text())["routing"]["name"] == "topp"

    evaluated = run(
        str(venv / "bin" / "dmoe-eval"),
        f"router_checkpoint={router}",
        f"hydra.run.dir={elsewhere / 'eval'}",
        "generation.max_samples=8",
        "reference_token=false",
    )
    assert evaluated.returncode == 0, evaluated.stderr[-3000:]
    metrics = json.loads((elsewhere / "eval" / "metrics.json").read_text())
    assert metrics["policy"]["name"] == "topp" and 0.0 <= metrics["accuracy"] <= 1.0
