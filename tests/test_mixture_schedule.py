"""Mixtures over time (issue 18 item 3): a stage's mixture as a schedule over tokens (step and linear
points, a switch at the LR decay), drawn deterministically within a sequence of the integral of the
shares, logged per step as data/<name>/share, resumed exactly, drawn by `cpt schedule`."""

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml

from cpt.data.mixture import MixtureSampler, MixtureSchedule
from cpt.errors import CptError
from cpt.plan import plan_run
from cpt.tracking import read_metrics
from cpt.train.loop import train

RAMP = [(0, {"de": 0.75, "en": 0.25}, "step"), (800, {"de": 0.95, "en": 0.05}, "linear")]


def test_integral_of_a_linear_ramp_and_a_step_by_hand():
    m = MixtureSchedule(RAMP, seq_len=8)  # the ramp ends at sequence 100
    en = m.names.index("en")
    # trapezoid: over the ramp's 100 sequences, 100 * (0.25 + 0.05) / 2 = 15 are due to en; then 0.05 each
    assert m.cumulative(100)[en] == pytest.approx(15.0, abs=1e-12)
    assert m.cumulative(50)[en] == pytest.approx(50 * (0.25 + 0.15) / 2, abs=1e-12)
    assert m.cumulative(140)[en] == pytest.approx(15.0 + 40 * 0.05, abs=1e-12)
    assert m.share_at(400)["en"] == pytest.approx(0.15)  # halfway along the ramp
    assert m.share_at(1000) == {"de": 0.95, "en": 0.05}  # a point's own dict after the last point
    step = MixtureSchedule([(0, {"web": 1.0}, "step"), (80, {"web": 0.5, "hq": 0.5}, "step")], seq_len=8)
    assert step.cumulative(10) == [0.0, 10.0] and step.cumulative(14) == [2.0, 12.0]  # names: hq, web
    assert step.shares_between(8, 12) == {"hq": 0.25, "web": 0.75}  # half the window before the switch
    assert not step.is_constant and MixtureSchedule.constant({"a": 1.0}).is_constant
    assert m.mean(800) == pytest.approx({"de": 0.85, "en": 0.15})


def test_sampler_follows_the_ramp_within_one_sequence_at_every_prefix():
    m = MixtureSchedule(RAMP, seq_len=8)
    s = MixtureSampler({"de": 10_000, "en": 10_000}, m, seed=1)
    drawn = s.draw(200)
    picks = [name for name, _ in drawn]
    en_drawn = np.cumsum([p == "en" for p in picks])
    due = np.array([m.cumulative(g)[m.names.index("en")] for g in range(1, 201)])
    assert np.abs(en_drawn - due).max() < 1.0
    assert en_drawn[99] == 15 and en_drawn[-1] == 20  # 15 over the ramp, 5 of the next 100
    assert en_drawn[49] > en_drawn[99] - en_drawn[49]  # 25 per 100 -> 5 per 100: more en early than late
    # which sequence: the k-th draw from a source reads the k-th of its epoch permutation, whatever the shares
    flat = MixtureSampler({"de": 10_000, "en": 10_000}, {"de": 0.5, "en": 0.5}, seed=1).draw(400)
    assert [i for n, i in drawn if n == "en"] == [i for n, i in flat if n == "en"][:20]


def test_switch_at_the_decay_start_draws_the_new_source_only_from_there(make_recipe):
    recipe = make_recipe(
        schedule={"kind": "wsd", "max_lr": 3e-3, "warmup": 2048, "decay": {"length": "25%"}},
        data__mixture=[{"at": 0, "weights": {"en": 1.0}}, {"at": "decay", "weights": {"en": 0.5, "de": 0.5}}],
    )
    stage = plan_run(recipe).stages[0]
    assert stage.anneal_start == 9 * 1024  # 12 steps, the last 3 decay
    assert stage.mixture.points[1][0] == 9 * 1024
    s = MixtureSampler({"en": 400, "de": 400}, stage.mixture, seed=3)
    first, rest = s.draw(9 * 8), s.draw(3 * 8)  # 8 sequences of 128 tokens per step
    assert {n for n, _ in first} == {"en"}
    assert sum(n == "de" for n, _ in rest) == 12


def test_sampler_state_goes_on_exactly_and_refuses_another_schedule():
    m = MixtureSchedule(RAMP, seq_len=8)
    whole = MixtureSampler({"de": 97, "en": 31}, m, seed=5)
    expected = whole.draw(70) + whole.draw(60)
    first = MixtureSampler({"de": 97, "en": 31}, m, seed=5)
    got = first.draw(70)
    state = first.state_dict()
    assert state["schedule"] == m.state()
    second = MixtureSampler({"de": 97, "en": 31}, m, seed=5)
    second.load_state_dict(state)
    assert got + second.draw(60) == expected
    other = MixtureSchedule([(0, {"de": 0.75, "en": 0.25}, "step"), (800, {"de": 0.9, "en": 0.1}, "linear")], 8)
    with pytest.raises(CptError, match="another mixture schedule"):
        MixtureSampler({"de": 97, "en": 31}, other, seed=5).load_state_dict(state)
    with pytest.raises(CptError, match="another mixture schedule"):
        MixtureSampler({"de": 97, "en": 31}, {"de": 0.75, "en": 0.25}, seed=5).load_state_dict(state)
    assert "schedule" not in MixtureSampler({"de": 1}, {"de": 1.0}, seed=5).state_dict()  # as before


@pytest.mark.parametrize("mixture, message", [
    ([{"at": "10%", "weights": {"en": 1.0}}], r"data.mixture.0.at = 10%: a mixture schedule starts at 0"),
    ([{"at": 0, "weights": {"en": 0.5}}], r"data.mixture.0.weights: weights sum to 0.5"),
    ([{"at": 0, "weights": {"fr": 1.0}}], r"data.mixture.0.weights.fr: not one of data.sources"),
    ([{"at": "soon", "weights": {"en": 1.0}}], r"data.mixture.0.at = 'soon': expected tokens \(800K\), steps"),
    ([{"at": 0, "weights": {"en": 1.0}, "when": 3}], r"data.mixture.0.when: unknown key \(expected one of: at, weights, ramp\)"),
])
def test_bad_schedules_are_refused_by_the_schema(make_recipe, mixture, message):
    with pytest.raises(CptError, match=message):
        make_recipe(data__mixture=mixture)


@pytest.mark.parametrize("mixture, message", [
    ([{"at": 0, "weights": {"en": 1.0}}, {"at": "decay", "weights": {"de": 1.0}}],
     r"data.mixture.1.at: decay, but this stage's LR has no final decay"),
    ([{"at": 0, "weights": {"en": 1.0}}, {"at": "50%", "weights": {"de": 1.0}}, {"at": "4K", "weights": {"en": 1.0}}],
     r"data.mixture.2.at = 4K: 4096 tokens comes before the previous point \(6144 tokens\)"),
    ([{"at": 0, "weights": {"en": 1.0}}, {"at": "20K", "weights": {"de": 1.0}}],
     r"20K: 20480 tokens is past the stage's end \(12288 tokens\)"),
])
def test_schedules_that_do_not_fit_the_stage_get_one_line(make_recipe, mixture, message):
    with pytest.raises(CptError, match=message):
        plan_run(make_recipe(data__mixture=mixture))  # cosine: no decay phase to switch at


def test_run_logs_the_shares_and_resumes_exactly_mid_ramp(make_recipe):
    ramp = [{"at": 0, "weights": {"en": 0.75, "de": 0.25}},
            {"at": "100%", "weights": {"en": 0.125, "de": 0.875}, "ramp": "linear"}]
    whole = make_recipe("whole", data__mixture=ramp)
    train(whole)
    split = make_recipe("split", data__mixture=ramp)
    assert not train(split, max_steps=5).completed
    assert train(split, resume=True).completed
    rec = [r for r in read_metrics(Path(whole.run.output_dir) / "metrics.jsonl") if "train/loss" in r]
    again = [r for r in read_metrics(Path(split.run.output_dir) / "metrics.jsonl") if "train/loss" in r]
    assert [r["train/loss"] for r in rec] == [r["train/loss"] for r in again]  # bit-identical
    # step k draws sequences [8k, 8k + 8) of 96; the share logged is the ramp's mean over them
    en = [r["data/en/share"] for r in rec]
    assert en == pytest.approx([0.75 - 0.625 * (8 * k + 4) / 96 for k in range(12)], abs=1e-12)
    assert [r["data/en/share"] + r["data/de/share"] for r in rec] == pytest.approx([1.0] * 12)
    # the checkpoint records the shares in effect where it was saved
    state = yaml.safe_load((Path(split.run.output_dir) / "checkpoints/step-00000012/trainer_state.json").read_text())
    assert state["mixture"] == {"en": 0.125, "de": 0.875}
    # cpt compare draws a share panel per source where a mixture changes, none where none does
    from cpt.compare import compare

    page = compare([whole.run.output_dir], Path(whole.run.output_dir) / "cmp")
    assert {p.name for p in page.parent.glob("share_*.png")} == {"share_de.png", "share_en.png"}
    flat = make_recipe("flat", train__tokens=2 * 1024)
    train(flat)
    page = compare([flat.run.output_dir], Path(flat.run.output_dir) / "cmp")
    assert not list(page.parent.glob("share_*.png"))


def test_cpt_schedule_prints_and_draws_the_shares(tmp_path):
    out = tmp_path / "s.png"
    r = subprocess.run([sys.executable, "-m", "cpt.cli", "schedule", "recipes/paper/replay-ramp-de.yaml",
                        "--out", str(out)], capture_output=True, text=True, check=True,
                       cwd=Path(__file__).resolve().parents[1])
    assert "mixture of replay-ramp-de: de 0.75 en 0.25 at 0, linear to de 0.95 en 0.05 at 943718" in r.stdout
    assert out.stat().st_size > 10_000


def test_a_stage_schedule_reads_its_new_domains_from_its_mean_shares(make_recipe):
    recipe = make_recipe(
        data__mixture=None, train__tokens=None,
        probes={"sets": {"en": "x", "de": "y"}},
        stages=[{"name": "a", "tokens": 4096, "mixture": {"en": 1.0}},
                {"name": "b", "tokens": 8192, "mixture": [
                    {"at": 0, "weights": {"en": 1.0}},
                    {"at": "50%", "weights": {"en": 0.5, "de": 0.5}, "ramp": "linear"}]}])
    a, b = plan_run(recipe).stages
    assert a.new_domains == ["en"] and b.new_domains == ["de"]  # de: 0 -> a mean of 0.375 in stage b
    assert b.mixture.mean(8192) == pytest.approx({"en": 0.625, "de": 0.375})
    assert b.mixture.points[1][0] == 4096  # 50% of the stage's own budget
