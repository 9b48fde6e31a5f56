"""A study's point store on fake evaluations: a finished point is kept and never recomputed (but
measured again for metrics it lacks where no training is needed), a trained point trains with the
study's data, and a store of another base is refused and left as it was."""

import json

import pytest
from helpers import fake_metrics

from dmoe_train.studies import pareto_points, point_store
from dmoe_train.studies import points as study_points
from dmoe_train.studies.pareto_points import Training, free, trained


def counted_store(tmp_path, monkeypatch) -> tuple[point_store.PointStore, list]:
    """A store whose evaluations are fake and counted (the list of their output dirs)."""
    calls = []

    def fake_eval(cfg):
        calls.append(cfg.paths.output_dir)
        return fake_metrics(10.0, 50)

    monkeypatch.setattr(study_points, "run_eval", fake_eval)
    return point_store.PointStore(tmp_path / "base", tmp_path), calls


def test_a_finished_point_is_not_recomputed(tmp_path, monkeypatch):
    study, calls = counted_store(tmp_path, monkeypatch)
    point = free("topp", "p=0.5", "router=topp", "router.block_size=32")
    first = study.measure(point)
    again = study.measure(point)
    assert first == again and len(calls) == 1
    stored = tmp_path / "pareto" / "points" / "topp__p0.5" / "point.json"
    assert json.loads(stored.read_text()) == first


def test_a_point_measured_before_the_paid_metrics_is_measured_again_where_no_training_needs(
    tmp_path, monkeypatch
):
    study, calls = counted_store(tmp_path, monkeypatch)
    rule = free("topp", "p=0.5", "router=topp")
    router_point = trained("trained", Training("union 0.1", 0.5))
    old = {k: v for k, v in fake_metrics(9.0, 40).items() if k not in point_store.PAID}
    points = tmp_path / "pareto" / "points"
    for point in (rule, router_point):
        (points / point.slug).mkdir(parents=True)
        (points / point.slug / "point.json").write_text(json.dumps(old))
    assert study.measure(rule, refresh=False) == old  # --report-only
    again = study.measure(rule)
    assert again["forwards_per_block"] == 2.0 and len(calls) == 1
    assert json.loads((points / rule.slug / "point.json").read_text()) == again
    # its run is gone: measuring again would train it again, so it is left as it was
    assert study.measure(router_point) == old and len(calls) == 1


def test_the_broad_study_trains_its_sets_on_the_broad_suite(tmp_path, monkeypatch):
    trained_with = []
    monkeypatch.setattr(
        point_store, "train_run", lambda run, overrides: trained_with.append(overrides)
    )
    study = point_store.PointStore(tmp_path / "base", tmp_path, data="broad_skills")
    points = pareto_points.study(study.generated, broad=True)
    names = [(p.method, p.label) for p in points if p.training]
    assert names == [
        *(("sets", f"p=0.6 {s.name}") for s in pareto_points.SETS),
        ("sets", "p=0.3 router"),
        ("sets", "p=0.6 router+lora+shared 3000 steps"),
        ("sets", "p=0.5 router+lora+shared 3000 steps"),
        ("trained+experts", "p=0.6 union 0.1"),
    ]
    assert points[0].method == "token" and len(points) == len(pareto_points.training_free()) + 9
    study.train_point(points[7])
    assert "data=broad_skills" in trained_with[0]
    assert "trainer.max_steps=3000" in trained_with[0]


def test_points_of_another_base_are_refused_and_kept(tmp_path):
    base, kept_at = tmp_path / "base", tmp_path / "pareto"
    base.mkdir()
    (base / "model.safetensors").write_bytes(b"weights of the first base")
    study = point_store.PointStore(base, tmp_path)
    study.claim()
    point = kept_at / "points" / "topp__p0.5" / "point.json"
    point.parent.mkdir(parents=True)
    point.write_text("{}")
    study.claim()  # the same base: its points are reused
    (base / "model.safetensors").write_bytes(b"weights of a retrained base")
    with pytest.raises(SystemExit, match="measured on another base"):
        study.claim()
    assert point.read_text() == "{}"
    (kept_at / "base.sha256").unlink()  # points with no record of their base: refused too
    with pytest.raises(SystemExit, match=r"sha256 unknown"):
        study.claim()
