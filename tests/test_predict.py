"""Loss-curve laws: areas worked out by hand, fits recovering the parameters of curves drawn from the law
itself, the refusal of unidentifiable data, a search against an optimum known in closed form, and the
`cpt predict` verb on hand-written run dirs."""

import json

import numpy as np
import pytest
import yaml
from pydantic import TypeAdapter

from cpt.cli import main
from cpt.errors import CptError
from cpt.predict import (
    Curve,
    Fit,
    areas,
    compare,
    family_candidates,
    fit,
    law_curve,
    recipe_curve,
    run_curve,
    search,
    smooth,
)
from cpt.predict.laws import _features
from cpt.recipe import load_recipe
from cpt.schedules import ScheduleConfig

T, W, TOP = 200, 10, 2e-3


def schedule(kind: str) -> np.ndarray:
    """LR of each of T steps: linear warmup over W steps, then constant / cosine to 0.1x / WSD 1-sqrt."""
    s = np.arange(T)
    warm = np.minimum(s / W, 1.0) * TOP
    p = np.clip((s - W) / (T - W), 0, 1)
    if kind == "constant":
        return warm
    if kind == "cosine":
        return np.where(s < W, warm, 0.1 * TOP + 0.9 * TOP * 0.5 * (1 + np.cos(np.pi * p)))
    if kind == "wsd":
        d0 = int(0.8 * T)
        return np.where(s < d0, warm, TOP * (1 - np.sqrt(np.clip((s - d0) / (T - d0), 0, 1))))
    raise ValueError(kind)


def from_law(law, theta, kind, noise=0.0, seed=0, lam=0.999):
    lrs = schedule(kind)
    y = law_curve(law, theta, _features(lrs, TOP, lam))  # after n = 0..T updates
    y[:W + 1] = 8.0  # the warmup is outside the laws; fits ignore it
    y = y * np.exp(np.random.default_rng(seed).normal(0.0, noise, T + 1))
    y[T] = np.nan  # as train loss: logged before each update, so none after the last one
    return Curve(kind, lrs, 4096, y)


# --- areas by hand --------------------------------------------------------------------------------


def test_areas_by_hand_on_five_steps():
    # LR of updates 1..5; the peak (end of warmup) is update 2; lam = 0.5.
    # S1(n) = eta_1 + ... + eta_n for n = 0..5 updates: 0, .5, 1.5, 2.3, 2.7, 3.1.
    # m_1 = m_2 = 0 (up to the peak); m_3 = .5*0 + (1.0 - .8) = .2; m_4 = .5*.2 + (.8 - .4) = .5;
    # m_5 = .5*.5 + (.4 - .4) = .25. S2(n) = m_1 + ... + m_n: 0, 0, 0, .2, .7, .95.
    s1, s2 = areas(np.array([0.5, 1.0, 0.8, 0.4, 0.4]), lam=0.5)
    assert s1 == pytest.approx([0.0, 0.5, 1.5, 2.3, 2.7, 3.1])
    assert s2 == pytest.approx([0.0, 0.0, 0.0, 0.2, 0.7, 0.95])


def test_a_rise_after_the_peak_is_negative_annealing():
    _, s2 = areas(np.array([1.0, 0.5, 1.0, 1.0]), lam=1.0)
    # m_2 = .5, m_3 = .5 + (.5 - 1) = 0, m_4 = 0
    assert s2 == pytest.approx([0.0, 0.0, 0.5, 0.5, 0.5])


def test_smoothing_and_final_loss_treat_both_curves_alike():
    y = np.array([1.0, 2.0, 3.0, 4.0, 5.0])
    assert smooth(y, 3) == pytest.approx([1.5, 2.0, 3.0, 4.0, 4.5])
    c = compare(y * 1.01, y, start=0, window=3, final=2)
    assert c["final_real"] == pytest.approx(4.5) and c["final_err"] == pytest.approx(0.01)
    assert c["mare"] == pytest.approx(0.01)
    # sparse measurements (probes): only measured points count; the warmup (n < start) is dropped
    real = np.array([9.0, np.nan, 3.0, np.nan, 2.0, np.nan])
    c = compare(np.array([9.0, 5.0, 3.3, 2.5, 2.2, 2.0]), real, start=1, window=1, final=1)
    assert c["final_real"] == 2.0 and c["final_pred"] == 2.2 and c["mare"] == pytest.approx(0.1)


# --- fits -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("law, theta", [
    ("anneal", [3.0, 2.0, 0.5, 0.004]),
    ("multipower", [3.0, 2.0, 0.5, 0.5, 0.05, 0.6, 0.5]),
])
def test_fit_recovers_parameters_of_noise_free_curves(law, theta):
    curves = [from_law(law, theta, "constant"), from_law(law, theta, "cosine")]
    f = fit(curves, law, bootstrap=0)
    assert f.theta == pytest.approx(theta, rel=1e-3)
    wsd = from_law(law, theta, "wsd")
    assert f.predict(wsd)[wsd.peak:T] == pytest.approx(wsd.losses[wsd.peak:T], rel=1e-5)


def test_fit_on_noisy_curves_predicts_a_held_out_schedule_within_its_interval():
    theta = [3.0, 2.0, 0.5, 0.004]
    curves = [from_law("anneal", theta, k, noise=0.01, seed=i) for i, k in enumerate(["constant", "cosine"])]
    f = fit(curves, "anneal", bootstrap=40)
    values = f.param_intervals()
    for name, true in zip(f.names, theta, strict=True):
        _, lo, hi = values[name]
        assert lo <= true <= hi, name
    truth = from_law("anneal", theta, "wsd")
    lo, hi = f.band(truth)
    assert lo[-1] <= law_curve("anneal", theta, _features(truth.lrs, TOP, 0.999))[-1] <= hi[-1]
    assert compare(f.predict(truth), truth.losses, W)["final_err"] == pytest.approx(0.0, abs=0.005)


@pytest.mark.parametrize("law", ["anneal", "multipower"])
def test_refuses_a_single_constant_lr_run(law):
    with pytest.raises(CptError, match="never falls after the warmup.*cannot be identified"):
        fit([from_law("anneal", [3.0, 2.0, 0.5, 0.004], "constant", noise=0.01)], law, bootstrap=0)


def test_refuses_runs_of_different_batch_sizes():
    a = from_law("anneal", [3.0, 2.0, 0.5, 0.004], "cosine")
    b = Curve("b", a.lrs, 8192, a.losses)
    with pytest.raises(CptError, match="tokens per step"):
        fit([a, b], "anneal", bootstrap=0)
    f = fit([a], "anneal", bootstrap=0)
    with pytest.raises(CptError, match="do not carry across batch sizes"):
        f.predict(b)


# --- search ---------------------------------------------------------------------------------------


def test_search_finds_the_closed_form_optimum_of_a_wsd_decay():
    # With lam = 1 and no warmup the momentum is the total drop from the peak, m_i = 1 - eta_i (LR
    # normalised), so S2(n) = n - S1(n) and after the last update L = L0 + A*S1^-alpha + C*S1 - C*T: a
    # function of S1 alone, least at S1* = (A*alpha/C)^(1/(alpha+1)). Choose C so that S1* is the S1
    # of the 30% linear decay.
    steps, tps = 200, 100
    template = {"kind": "wsd", "max_lr": 1e-3, "warmup": 0}
    cands = {k: v for k, v in family_candidates("wsd", template).items() if k.endswith("linear")}
    adapter = TypeAdapter(ScheduleConfig)

    def s1_final(cfg):
        from cpt.schedules import build_schedule

        s = build_schedule(adapter.validate_python(cfg), steps * tps, tps)
        return sum(s(i * tps) for i in range(steps)) / 1e-3

    A, alpha = 50.0, 0.5
    target = s1_final(cands["wsd decay 30% linear"])
    C = A * alpha * target ** (-alpha - 1)
    law = Fit("anneal", np.array([2.0, A, alpha, C]), ref_lr=1e-3, tokens_per_step=tps, lam=1.0)
    results = search(law, cands, steps * tps, tps)
    assert results[0].label == "wsd decay 30% linear"
    closed = {k: 2.0 + A * s1_final(v) ** -alpha + C * s1_final(v) - C * steps for k, v in cands.items()}
    for r in results:
        assert r.final == pytest.approx(closed[r.label], rel=1e-9)
    assert [r.label for r in results] == sorted(closed, key=closed.get)


# --- the CLI on hand-written runs ------------------------------------------------------------------


RECIPE = {
    "run": {"name": "NAME", "output_dir": "OUT", "seed": 1},
    "model": {"preset": "tiny-llama", "tokenizer": "tok"},
    "data": {"seq_len": 64, "sources": {"en": "data/en"}, "mixture": {"en": 1.0}},
    "train": {"tokens": 256 * 120, "global_batch_tokens": 256},
}
SCHEDULES = {
    "constant": {"kind": "constant", "max_lr": 1e-3, "warmup": "8 steps"},
    "cosine": {"kind": "cosine", "max_lr": 1e-3, "min_lr": 1e-4, "warmup": "8 steps"},
    "wsd": {"kind": "wsd", "max_lr": 1e-3, "warmup": "8 steps", "decay": {"length": "25%", "shape": "linear"}},
}


@pytest.fixture
def fake_runs(tmp_path):
    """Recipes and run dirs (recipe.yaml + metrics.jsonl written by hand) whose losses follow the anneal law."""
    theta = [3.0, 1.5, 0.5, 0.01]
    paths = {}
    for name, sched in SCHEDULES.items():
        data = {**RECIPE, "run": {"name": name, "output_dir": str(tmp_path / "runs" / name), "seed": 1},
                "schedule": sched}
        path = tmp_path / f"{name}.yaml"
        path.write_text(yaml.safe_dump(data))
        curve, recipe = recipe_curve(path)
        y = law_curve("anneal", theta, _features(curve.lrs, 1e-3, 0.999))[:-1]  # before each update
        y[:curve.peak] = 7.0
        y = y * np.exp(np.random.default_rng(len(name)).normal(0, 0.002, len(y)))
        run = tmp_path / "runs" / name
        run.mkdir(parents=True)
        (run / "recipe.yaml").write_text(recipe.to_yaml())
        with open(run / "metrics.jsonl", "w") as f:
            f.write(json.dumps({"step": 0, "tokens": 0, "probe/en/loss": 7.5}) + "\n")  # no train/loss: skipped
            for i, (loss, lr) in enumerate(zip(y, curve.lrs, strict=True)):
                f.write(json.dumps({"step": i + 1, "tokens": (i + 1) * 256, "train/loss": float(loss),
                                    "lr": float(lr)}) + "\n")
        paths[name] = (path, run)
    return paths


def test_cli_predict_fits_predicts_compares_and_searches(fake_runs, tmp_path, capsys):
    out = tmp_path / "pred"
    rc = main(["predict", "--fit", str(fake_runs["constant"][1]), str(fake_runs["cosine"][1]),
               "--recipe", str(fake_runs["wsd"][0]), str(fake_runs["cosine"][0]),
               "--runs", str(fake_runs["wsd"][1]), "--law", "anneal", "--bootstrap", "5",
               "--search", "wsd", "cosine", "--out", str(out)])
    assert rc == 0
    report = json.loads((out / "report.json").read_text())
    wsd, cosine = report["predictions"]
    assert wsd["real_run"] == str(fake_runs["wsd"][1]) and not wsd["in_fit"]
    assert cosine["in_fit"]  # its recipe matches a fitted run's
    e = wsd["laws"]["anneal"]
    assert abs(e["final_err"]) < 0.005 and e["mare"] < 0.005
    assert e["final_low"] <= e["final"] <= e["final_high"]
    assert wsd["baseline"]["run"] in ("constant", "cosine")
    assert (out / "curves.png").stat().st_size > 10_000 and "| wsd | anneal |" in (out / "report.md").read_text()
    fragment = yaml.safe_load((out / "best-schedule-anneal.yaml").read_text())
    TypeAdapter(ScheduleConfig).validate_python(fragment["schedule"])
    # the fragment is the template recipe with the best schedule: it loads (and trains) as it is, also when
    # the best schedule is of another kind than the template's (a WSD decay must not leak into a cosine)
    template = load_recipe(fake_runs["wsd"][0])
    for family in ("wsd", "cosine"):
        rc = main(["predict", "--fit", str(fake_runs["constant"][1]), str(fake_runs["cosine"][1]),
                   "--recipe", str(fake_runs["wsd"][0]), "--law", "anneal", "--bootstrap", "2", "--search", family,
                   "--out", str(tmp_path / family)])
        assert rc == 0
        frag = yaml.safe_load((tmp_path / family / "best-schedule-anneal.yaml").read_text())
        searched = load_recipe(tmp_path / family / "best-schedule-anneal.yaml")
        assert searched.schedule.kind == family
        assert searched.schedule == TypeAdapter(ScheduleConfig).validate_python(frag["schedule"])
        assert searched.train == template.train and searched.run.name == template.run.name + "-searched-anneal"
    assert "search (anneal): best" in capsys.readouterr().out


def test_cli_predict_refuses_a_constant_run_alone(fake_runs, tmp_path, capsys):
    rc = main(["predict", "--fit", str(fake_runs["constant"][1]), "--recipe", str(fake_runs["wsd"][0]),
               "--out", str(tmp_path / "p")])
    assert rc == 2
    assert "cannot be identified" in capsys.readouterr().err


def test_run_curve_reads_train_loss_probes_and_one_stage(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    recs = [{"step": 0, "tokens": 0, "stage": "a", "probe/en/loss": 9.0}]
    for i in range(1, 5):  # stage a: steps 1-4 at LR 1.0; stage b: steps 5-7 at LR 0.5, 0.25, 0.125
        recs.append({"step": i, "tokens": 100 * i, "stage": "a", "train/loss": 10.0 - i, "lr": 1.0})
    recs.append({"step": 4, "tokens": 400, "stage": "a", "probe/en/loss": 5.5})
    recs.append({"step": 4, "tokens": 400, "stage": "b", "probe/en/loss": 5.4})  # b's start probe
    for i in range(5, 8):
        recs.append({"step": i, "tokens": 100 * i, "stage": "b", "train/loss": 10.0 - i, "lr": 0.5 ** (i - 4)})
    recs.append({"step": 7, "tokens": 700, "stage": "b", "probe/en/loss": 3.5})
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
    with pytest.raises(CptError, match="name the one to use"):
        run_curve(run)
    a = run_curve(run, "a")
    # train loss of step i is the model after i - 1 updates; nothing is logged after the last update
    assert a.lrs.tolist() == [1.0] * 4 and a.losses[:4].tolist() == [9.0, 8.0, 7.0, 6.0]
    assert np.isnan(a.losses[4]) and a.tokens_per_step == 100 and a.name == "run@a"
    b = run_curve(run, "b", metric="probe/en/loss")  # a probe at step i: after i updates; n counts from b
    assert b.lrs.tolist() == [0.5, 0.25, 0.125]
    assert b.losses[0] == 5.4 and np.isnan(b.losses[1:3]).all() and b.losses[3] == 3.5
