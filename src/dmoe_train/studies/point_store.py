"""A study's store: where it reads its base and keeps each finished point as JSON
(`<out>/<name>/points/<slug>/point.json`), trains a point's router (resuming its run), measures
it once, and ties itself to the base's weights. Every study that measures points uses it."""

from __future__ import annotations

import hashlib
import subprocess
import sys
import time
from pathlib import Path

from safetensors.torch import load_file

from dmoe_train.studies.pareto_points import PRESET, StudyPoint
from dmoe_train.studies.points import evaluate, kept, router_checkpoint, train_run

# what a user pays beside unique experts per forward: a point measured before these existed is
# measured again where that needs no training (training-free, or its run's router still there)
PAID = ("forwards_per_block", "expert_bytes_per_generated_token")


def point_file(store: Path, point: StudyPoint) -> Path:
    """Where a study's store keeps a finished point's metrics."""
    return store / "points" / point.slug / "point.json"


class PointStore:
    """Where a study reads its base and keeps its points (`<out>/<name>/`), and the presets its
    evaluations (`model`, `generation`, `data`: its test split, no training data needed) and its
    trained points (`experiment`) start from."""

    def __init__(
        self,
        base: Path,
        out: Path,
        name: str = "pareto",
        model: str = "tiny256",
        generation: str = "tiny256",
        experiment: str = PRESET,
        data: str = "skills",
    ) -> None:
        self.base, self.store, self.data = base, out / name, data
        self.generated = self.store / "generated"  # dmoe-generate of the two skills' prompts
        model_at = [f"model={model}", f"model.path={base}"]
        self.eval = [*model_at, f"data={data}", "data.train_size=64", f"generation={generation}"]
        self.train = [f"experiment={experiment}", f"model.path={base}", f"data={data}"]

    def generated_data(self, out: Path, skills: tuple[str, ...]) -> None:
        """The base's own decodes (token routing) of 4000 train prompts of `skills`
        (`dmoe-generate` into `out`), written once; generated rows train on these."""
        cmd = [
            sys.executable, "-m", "dmoe_train.cli.generate", "model=tiny256",
            f"model.path={self.base}", f"data={self.data}",
            f"data.train_skills=[{','.join(skills)}]", "generation=tiny256", "max_rows=4000",
            f"out_dir={out}", f"hydra.run.dir={out}",
        ]  # fmt: skip
        if not (out / "summary.json").is_file():
            subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)

    def train_point(self, point: StudyPoint) -> tuple[Path, float]:
        """Train (or resume, or reuse) the point's router; its checkpoint and training seconds."""
        run_dir = self.store / "runs" / point.slug

        def timed() -> dict:
            # a resumed run counts only its own last part: the cost of an uninterrupted one is
            # what the report shows, from a run that was not interrupted
            if (out := point.training.generated) is not None:
                self.generated_data(out, point.training.generated_from)
            began = time.time()
            train_run(run_dir, [*self.train, *point.training.overrides()])
            return {"train_seconds": time.time() - began}

        seconds = kept(run_dir / "cost.json", timed)["train_seconds"]
        return router_checkpoint(run_dir), seconds

    def measure(self, point: StudyPoint, refresh: bool = True) -> dict:
        """The point's metrics on the test split, computed once and kept in
        `points/<slug>/point.json`; with `refresh`, measured again when it lacks a `PAID`
        metric and needs no training for it."""
        stored = point_file(self.store, point)
        point_dir = stored.parent

        def measure() -> dict:
            overrides = [*self.eval, *point.routing, "reference_token=false"]
            if point.training is None:
                return evaluate(point_dir, overrides)
            router, seconds = self.train_point(point)
            metrics = evaluate(point_dir, [*overrides, f"router_checkpoint={router}"])
            trained = sum(t.numel() for t in load_file(router).values())
            return metrics | {"train_seconds": seconds, "trainable_params": trained}

        run = self.store / "runs" / point.slug
        trainless = point.training is None or router_checkpoint(run).is_file()
        return kept(
            stored,
            measure,
            stale=lambda stored: refresh and trainless and any(k not in stored for k in PAID),
        )

    def claim(self) -> None:
        """Tie the store to the base it measures (the sha256 of its weights in `base.sha256`):
        points of another base are never mixed into this one's frontiers, and are left
        untouched."""
        weights = sorted(self.base.glob("*.safetensors"))
        digest = hashlib.sha256(b"".join(w.read_bytes() for w in weights)).hexdigest()
        stamp = self.store / "base.sha256"
        claimed = stamp.read_text().strip() if stamp.is_file() else None
        if claimed is None and any((self.store / "points").glob("*/point.json")):
            claimed = "unknown"
        if claimed not in (None, digest):
            raise SystemExit(
                f"{self.store}: its points were measured on another base (sha256 {claimed[:12]}, "
                f"{self.base} is {digest[:12]}); move {self.store} away to measure this base afresh"
            )
        self.store.mkdir(parents=True, exist_ok=True)
        stamp.write_text(digest + "\n")
