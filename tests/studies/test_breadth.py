"""`make breadth`: the draws of training skills, the trained points on the base's generations,
and held-out exact match measured on the held-out skills' prompts only."""

import hashlib

import pytest

from dmoe_train.data.skills import BROAD
from dmoe_train.studies import breadth
from dmoe_train.studies.breadth import Draw, draws, held_out_rows, markdown, plan, trainings


def test_draws_are_seeded_subsets_of_each_size_two_at_the_smallest():
    drawn = draws(0)
    assert [(d.k, d.index) for d in drawn] == [(2, 0), (2, 1), (4, 0), (8, 0), (10, 0)]
    assert all(len(d.skills) == d.k and set(d.skills) <= set(BROAD) for d in drawn)
    assert drawn[0].skills != drawn[1].skills and draws(0) == drawn and draws(1) != drawn
    assert set(drawn[4].held_out) | set(drawn[4].skills) == set(BROAD)


def test_each_set_trains_on_the_generations_of_its_skills_without_and_with_kl(tmp_path):
    draw = Draw(2, 0, ("sub", "copy"))
    points = trainings(draw, tmp_path)
    assert [p.name for p in points] == [
        "router on sub+copy", "router+lora+shared on sub+copy",
        "router KL on sub+copy", "router+lora+shared KL on sub+copy",
    ]  # fmt: skip
    kl = points[3].training.overrides()
    assert f"data.source={tmp_path / 'generated' / 'k2_0' / 'rows'}" in kl
    assert "module.distill_weight=1.0" in kl and "module.trainable=router+lora+shared" in kl
    assert points[3].training.generated_from == ("sub", "copy")
    assert not any("distill" in o for o in points[0].training.overrides())


def test_held_out_exact_match_counts_only_the_held_out_prompts():
    # 24 prompts, two of each skill in the suite's order; trained on the first 10 skills
    draw = Draw(10, 0, BROAD[:10])
    token = {"correct": [1] * 24, "unique_experts_per_block": 70.0}
    # right on every trained-skill prompt, on one of the four held-out ones
    correct = [0 if BROAD[i % 12] in BROAD[10:] else 1 for i in range(24)]
    correct[10] = 1  # prompt 10: skill BROAD[10], held out
    row, coreset = held_out_rows(
        draw, [("router", {"correct": correct, "unique_experts_per_block": 9.0}),
               ("coreset", {"correct": [0] * 24, "unique_experts_per_block": 9.0})], token,
    )  # fmt: skip
    assert row["held_out"] == pytest.approx(1 / 4) and row["retained"] == pytest.approx(1 / 4)
    assert coreset["held_out"] == 0.0 and row["token_held_out"] == 1.0
    assert row["held_out_lo"] <= 0.25 <= row["held_out_hi"]
    # the 20 training-skill prompts: all right, as token routing; the coreset none of them
    assert row["trained_retained"] == 1.0 and coreset["trained_retained"] == 0.0


def test_the_verdict_names_the_smallest_breadth_that_keeps_the_held_out_skills(
    tmp_path, monkeypatch
):
    def measure(self, point, refresh=True):
        # 48 prompts, 4 of each skill: trained points keep everything from k = 8 on; coresets
        # keep the first two of each skill's four
        if point.training is None:
            half = [int(i < 24) for i in range(48)]
            correct = [1] * 48 if point.method == "token" else half
        else:
            k = int(point.method.split("=")[1])
            correct = [int(k >= 8)] * 48
        return {"correct": correct, "unique_experts_per_block": 10.0}

    monkeypatch.setattr(breadth.PointStore, "measure", measure)
    study = breadth.PointStore(tmp_path, tmp_path, name="breadth", data="broad_skills")
    token = measure(None, breadth.free("token", "token"))
    planned = plan(draws(0), tmp_path)
    rows = [breadth.measure_point(study, d, p, token) for d, p in planned]
    assert len(rows) == 20 and {r["coreset_held_out"] for r in rows} == {0.5}
    report = markdown(rows, 20)
    for name in ("router", "router+lora+shared", "router KL", "router+lora+shared KL"):
        assert f"\n  - {name}: 8\n" in report + "\n"
    assert "not measured yet" not in markdown(rows, 20)
    breadth.plot(rows, tmp_path / "breadth.png")
    assert (tmp_path / "breadth.png").stat().st_size > 0


def test_each_family_has_its_own_verdict():
    # the router keeps the held-out skills at k=2; the set with adapters falls below the
    # coreset there, which must not take the router's k=2 away (nor give it to the set)
    def row(point, k, retained, held_out):
        return {"k": k, "draw": 0, "point": f"{point} on x", "experts": 9.0,
                "held_out": held_out, "held_out_lo": held_out, "held_out_hi": held_out,
                "retained": retained, "retained_lo": retained, "retained_hi": retained,
                "coreset_held_out": 0.3, "coreset_held_out_hi": 0.3, "trained_retained": 1.0,
                "token_held_out": 0.31}  # fmt: skip

    rows = [row("router", 2, 0.97, 0.30), row("router+lora+shared", 2, 0.96, 0.29),
            row("router", 4, 0.90, 0.28), row("router+lora+shared", 4, 0.97, 0.30)]  # fmt: skip
    report = markdown(rows, 4)
    assert "\n  - router: 2\n  - router+lora+shared: 4" in report
    assert markdown(rows[2:3], 4).endswith(
        "- router: none of [4]\n- 3 of 4 points not measured yet: `make breadth` resumes"
    )


def test_one_family_runs_at_every_draw_before_the_next_and_a_cut_run_says_so(tmp_path):
    planned = plan(draws(0), tmp_path)
    families = [p.name.split(" on ")[0] for _, p in planned]
    assert families == [f for f in ("router", "router+lora+shared", "router KL",
                                    "router+lora+shared KL") for _ in range(5)]  # fmt: skip
    assert [d.slug for d, _ in planned[:5]] == [d.slug for d in draws(0)]
    row = {"k": 2, "draw": 0, "point": "router on add+sub", "experts": 9.0, "held_out": 0.5,
           "held_out_lo": 0.4, "held_out_hi": 0.6, "retained": 0.6, "retained_lo": 0.5,
           "retained_hi": 0.7, "coreset_held_out": 0.3, "coreset_held_out_hi": 0.4,
           "trained_retained": 0.9, "token_held_out": 0.5}  # fmt: skip
    assert "- 19 of 20 points not measured yet: `make breadth` resumes" in markdown([row], 20)
    assert "| 60.0% [50.0%, 70.0%] |" in markdown([row], 20)
    # held-out skills token routing never solves: no share of 0 to give
    nothing = row | {"token_held_out": 0.0, "held_out": 0.0, "retained": float("nan")}
    none = markdown([nothing], 20)
    assert "| - (token routing: 0%) |" in none and "nan" not in none
    # one set alone (`--sets`): its two families, the set's points as in the whole plan
    alone = plan(draws(0), tmp_path, ("router+lora+shared",))
    assert [p.name.split(" on ")[0] for _, p in alone] == [
        f for f in ("router+lora+shared", "router+lora+shared KL") for _ in range(5)
    ]
    assert {p for _, p in alone} < {p for _, p in planned}


def test_report_only_reports_the_finished_points_and_trains_none(tmp_path, monkeypatch):
    base = tmp_path / "base"
    base.mkdir()
    (base / "model.safetensors").write_bytes(b"weights")
    (tmp_path / "breadth").mkdir()  # the store, claimed by this base
    (tmp_path / "breadth" / "base.sha256").write_text(hashlib.sha256(b"weights").hexdigest())
    finished = [p for _, p in plan(draws(0), tmp_path / "breadth")][:2]
    for point in finished:
        breadth.point_file(tmp_path / "breadth", point).parent.mkdir(parents=True)
        breadth.point_file(tmp_path / "breadth", point).write_text("{}")
    measured = []

    def measure(self, point, refresh=True):
        measured.append(point.name)
        return {"correct": [1] * 24, "unique_experts_per_block": 10.0}

    monkeypatch.setattr(breadth.PointStore, "measure", measure)
    argv = ["breadth", "--report-only", "--base", str(base), "--out", str(tmp_path)]
    monkeypatch.setattr("sys.argv", argv)
    breadth.main()
    assert {p.name for p in finished} <= set(measured)
    assert not {n for n in measured if " on " in n} - {p.name for p in finished}
    report = (tmp_path / "breadth.md").read_text()
    assert report.count("| router on ") == 2 and "18 of 20 points not measured yet" in report
