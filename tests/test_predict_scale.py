"""`cpt predict` at the resolution of real curves: the laws evaluated without a steps x changes matrix (equal
to the dense formula, bounded memory), curves from files at any logging cadence (the same predictions at 1
and 16 steps per record), long full-resolution curves drawn from a known law and recovered, the honesty
warnings, the naive baseline across cadences and lengths, and `cpt predict --curve/--held-out`."""

import json
import math
import tracemalloc
import warnings

import numpy as np
import pytest

from cpt.cli import main
from cpt.errors import CptError
from cpt.predict import Curve, Fit, areas, fit, law_curve, law_jacobian
from cpt.predict.checks import fit_warnings, held_out_warning
from cpt.predict.evaluate import baseline
from cpt.predict.files import file_curve
from cpt.predict.fit import fit_points
from cpt.predict.laws import _features, law_values_jacobian
from cpt.predict.report import y_limits
from cpt.predict.verb import _lam

TOP = 3e-4
MP = [3.0, 23.0, 0.45, 0.15, 0.05, 0.55, 0.55]  # multipower, LRs / TOP: the paper's scale (B = 500 x 3e-4)
AN = [3.0, 23.0, 0.45, 2e-4]


def schedule(kind: str, T: int, warm: int | None = None) -> np.ndarray:
    """LR of each of T steps: linear warmup (1% of T), then constant / cosine to 0.1x / WSD (20% 1-sqrt
    decay) / two-step decay (to 0.3x at 50%, 0.1x at 75%)."""
    W = warm or max(T // 100, 1)
    s = np.arange(T)
    w = np.minimum((s + 1) / W, 1.0)
    p = np.clip((s - W) / (T - W), 0, 1)
    if kind == "constant":
        lr = w
    elif kind == "cosine":
        lr = np.where(s < W, w, 0.1 + 0.45 * (1 + np.cos(np.pi * p)))
    elif kind == "wsd":
        lr = np.where(s < 0.8 * T, w, 1 - 0.99 * np.sqrt(np.clip((s - 0.8 * T) / (0.2 * T), 0, 1)))
    elif kind == "steps":
        lr = np.where(s < 0.5 * T, w, np.where(s < 0.75 * T, 0.3, 0.1))
    else:
        raise ValueError(kind)
    return lr * TOP


def law_run(law, theta, kind, T, noise=0.0, seed=0, name=None) -> Curve:
    """A train-loss curve drawn from the law (logged before each update; the warmup outside it)."""
    lrs = schedule(kind, T)
    y = law_curve(law, theta, _features(lrs, TOP, 0.999))
    y[: int(np.argmax(lrs)) + 1] = 10.0
    y = y * np.exp(np.random.default_rng(seed).normal(0.0, noise, T + 1))
    y[T] = np.nan
    return Curve(name or kind, lrs, 4096, y)


def write_csv(path, c: Curve, every: int = 1, loss="train/loss", lr="lr", step="step"):
    """``c`` as a logger writes it: every ``every``-th step, its LR and the train loss logged with it."""
    rows = [f"{step},{lr},{loss}"]
    for i in range(every, c.steps + 1, every):
        rows.append(f"{i},{float(c.lrs[i - 1])!r},{float(c.losses[i - 1])!r}")
    path.write_text("\n".join(rows) + "\n")
    return path


# --- the laws without a matrix ----------------------------------------------------------------------


def dense(law, theta, lrs, lam=0.999):
    """The laws as a steps x changes matrix (the formulation this package used to build): the reference."""
    eta = lrs / lrs.max()
    T = len(eta)
    s1, s2 = areas(eta, lam)
    p = int(np.argmax(eta)) + 1
    k = np.arange(p + 1, T + 1)
    d = eta[k - 2] - eta[k - 1]
    k, d = k[d != 0], d[d != 0]
    et = np.maximum(eta[k - 1], 1e-6)
    n = np.arange(T + 1)[:, None]
    sk = np.where(k[None, :] <= n, s1[n] - s1[k[None, :] - 1], 0.0)
    L0, A, alpha = theta[:3]
    with np.errstate(divide="ignore", invalid="ignore"):
        pw = s1 ** -alpha
        cols = [np.ones(T + 1), pw, -A * pw * np.log(s1)]
        if law == "anneal":
            y = L0 + A * pw - theta[3] * s2
            cols.append(-s2)
        else:
            B, C, beta, gamma = theta[3:]
            u = et ** -gamma * sk
            x1 = C * u + 1
            g = 1 - x1 ** -beta
            dg = beta * x1 ** (-beta - 1)
            y = L0 + A * pw - B * (g @ d)
            cols += [-(g @ d), -B * ((dg * u) @ d), -B * ((x1 ** -beta * np.log(x1)) @ d),
                     B * ((dg * C * u * np.log(et)) @ d)]
    J = np.stack(cols, axis=1)
    y[:p], J[:p] = np.nan, np.nan
    return y, J


@pytest.mark.parametrize("law, theta", [("anneal", AN), ("multipower", MP)])
@pytest.mark.parametrize("kind", ["cosine", "wsd", "steps"])
def test_chunked_laws_equal_the_dense_matrix_to_rounding(law, theta, kind):
    lrs = schedule(kind, 3000, warm=50)
    lrs[1500:1510] *= 1.2  # a rise after the peak: negative annealing
    want_y, want_J = dense(law, theta, lrs)
    f = _features(lrs, lrs.max(), 0.999)
    y, J = law_curve(law, theta, f), law_jacobian(law, theta, f)
    np.testing.assert_allclose(y, want_y, rtol=1e-12, atol=0)
    np.testing.assert_allclose(J, want_J, rtol=1e-10, atol=1e-12 * np.nanmax(np.abs(want_J)))
    at = np.random.default_rng(0).choice(3001, 200, replace=False)  # any points, in any order
    v, Ja = law_values_jacobian(law, theta, f, at)
    np.testing.assert_allclose(v, want_y[at], rtol=1e-12)
    np.testing.assert_allclose(Ja, want_J[at], rtol=1e-10, atol=1e-12 * np.nanmax(np.abs(want_J)))


def test_memory_stays_bounded_at_100k_steps():
    lrs = schedule("cosine", 100_000)  # ~99K LR changes: the old matrix would be 100K x 99K, 79 GB
    tracemalloc.start()
    f = _features(lrs, TOP, 0.999)
    at = np.linspace(1000, 100_000, 200).astype(int)
    law_values_jacobian("multipower", MP, f, at)
    law_curve("anneal", AN, f)
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert peak < 64e6, f"{peak / 1e6:.0f} MB"


# --- fit points, the cadence of the records, units ---------------------------------------------------


def test_fit_points_are_block_means_narrow_where_the_curve_bends():
    c = law_run("anneal", AN, "wsd", 24_000, noise=0.01)
    n, ly, counts = fit_points(c, c.peak, 256)
    measured = c.measured(c.peak)
    assert counts.sum() == len(measured) and 256 <= len(n) < 450  # a few more, narrow, where it bends
    assert ly == pytest.approx(np.add.reduceat(np.log(c.losses[measured]),
                                               np.r_[0, np.cumsum(counts)[:-1]].astype(int)) / counts)
    assert counts[0] < counts[len(n) // 2]  # early blocks narrower (at most 5% of their first n)
    decay = n > 0.8 * 24_000
    assert decay.sum() >= 40  # the WSD decay keeps its own points (at most 2% of the peak LR of change in one)
    assert fit_points(c, c.peak, 0)[0].tolist() == measured.tolist()


@pytest.mark.parametrize("law, theta", [("anneal", AN), ("multipower", MP)])
def test_the_same_curve_at_1_and_16_steps_per_record_predicts_the_same(tmp_path, law, theta):
    T = 6000
    runs = [law_run(law, theta, k, T) for k in ("constant", "cosine", "wsd")]
    held = law_run(law, theta, "steps", T)
    preds = {}
    for every in (1, 16):
        cs = [file_curve(f"{c.name}={write_csv(tmp_path / f'{c.name}-{every}.csv', c, every)}")[0] for c in runs]
        assert all(c.steps == T for c in cs)
        f = fit(cs, law, bootstrap=0)
        preds[every] = f.predict(held, at=[3000, 4500, T])
        assert f.lam == 0.999  # per optimizer step, whatever the cadence
    assert preds[16] == pytest.approx(preds[1], rel=1e-3)
    assert preds[1] == pytest.approx(held.losses[[3000, 4500, T - 1]], rel=2e-3)


def test_lambda_is_per_optimizer_step_and_a_half_life_converts():
    c = Curve("c", schedule("cosine", 100), 4096)
    assert _lam(0.99, None, [c]) == 0.99
    assert _lam(0.5, "693 steps", [c]) == pytest.approx(0.999, abs=2e-6)
    assert _lam(0.5, str(693 * 4096), [c]) == pytest.approx(0.999, abs=2e-6)  # tokens, at 4096 a step
    with pytest.raises(CptError, match="tokens per step"):
        _lam(0.5, "2M", [Curve("c", c.lrs, None)])
    f = Fit("anneal", np.array(AN), TOP, 4096, lam=0.999)
    assert f.lam_units() == "0.999 per optimizer step (half-life 692.8 steps = 2.84e+06 tokens)"


# --- a known law, long and at full resolution ---------------------------------------------------------


def test_recovers_a_known_law_from_long_full_resolution_curves():
    """The published curves' protocol (tests/test_predict_published.py) on curves drawn from the law itself:
    24K steps, one record per step, 0.5% noise; fit on three runs, predict a 72K-step cosine and a
    two-step decay."""
    T = 24_000
    runs = [law_run("anneal", AN, k, T, noise=0.005, seed=i) for i, k in enumerate(["constant", "cosine", "wsd"])]
    f = fit(runs, "anneal", bootstrap=10)
    assert f.theta == pytest.approx(AN, rel=0.05)
    assert f.points[0] < 3 * 400 and f.seconds[0] < 60
    for kind, steps in (("cosine", 72_000), ("steps", T)):
        truth = law_run("anneal", AN, kind, steps)
        assert f.predict(truth, at=[steps])[0] == pytest.approx(truth.losses[steps - 1], rel=2e-3)
    assert not fit_warnings(f)


def test_recovers_the_multipower_law_from_three_long_noise_free_runs():
    T = 12_000
    runs = [law_run("multipower", MP, k, T) for k in ("constant", "cosine", "wsd")]
    f = fit(runs, "multipower", bootstrap=0)
    assert f.theta == pytest.approx(MP, rel=0.01) and not fit_warnings(f)
    for kind, steps in (("steps", T), ("cosine", 72_000)):  # held out, and 6x as long
        lrs = schedule(kind, steps)
        truth = law_curve("multipower", MP, _features(lrs, TOP, 0.999), at=[steps])[0]
        assert f.predict(Curve(kind, lrs, 4096), at=[steps])[0] == pytest.approx(truth, rel=1e-4)


# --- honesty ------------------------------------------------------------------------------------------


def test_a_fit_on_its_bounds_or_with_an_interval_over_decades_is_reported():
    bounds = ((0, 0, 0.01, 0, 1e-6, 0.01, 0), (4.0, math.inf, 3, math.inf, 1e4, 5, 2))
    f = Fit("multipower", np.array([3.0, 23.0, 0.45, 0.15, 5.0, 0.01, 2.0]), TOP, None, bounds=bounds)
    text = "\n".join(fit_warnings(f))
    assert "beta = 0.01 is on its lower bound 0.01" in text and "gamma = 2 is on its upper bound 2" in text
    assert "C =" not in text and "three runs" in text
    theta = np.array([3.0, 23.0, 0.45, 0.15, 5.0, 0.6, 0.5])
    boot = np.tile(theta, (20, 1))
    boot[:, 4] = np.geomspace(1e-2, 1e3, 20)  # C over five decades
    f = Fit("multipower", theta, TOP, None, boot=boot, bounds=bounds)
    (w,) = fit_warnings(f)
    assert "C's 95% interval" in w and "orders of magnitude" in w
    ok = Fit("anneal", np.array(AN), TOP, None, boot=np.tile(AN, (5, 1)), bounds=((0, 0, 0.01, 0), (4, math.inf, 3, math.inf)))
    assert fit_warnings(ok) == []
    far = held_out_warning("multipower", {"a": {"final_err": 0.0006, "mare": 0.0004}},
                           {"b": {"final_err": -0.0291, "mare": 0.01}})
    assert "far below the held-out" in far and "2.91%" in far
    assert held_out_warning("anneal", {"a": {"final_err": 0.004, "mare": 0.003}}, {"b": {"final_err": 0.006}}) is None


# --- the naive baseline across cadences and lengths ---------------------------------------------------


def test_naive_baseline_aligns_by_tokens_and_says_why_not():
    fitted = law_run("anneal", AN, "cosine", 2000, name="fitted")
    sparse = fitted.losses.copy()
    sparse[np.arange(len(sparse)) % 16 != 7] = np.nan  # logged every 16 steps, at other steps
    held = Curve("held", schedule("wsd", 1000), 8192, law_run("anneal", AN, "wsd", 1000).losses)  # 2x batch
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        b = baseline(Curve("held", held.lrs, 8192), Curve("held", held.lrs, 8192, sparse[:1001]), [fitted])
    assert b["run"] == "fitted" and b["aligned"] == "tokens" and np.isfinite([b["mare"], b["final_err"]]).all()
    longer = Curve("long", schedule("wsd", 3000), 4096, law_run("anneal", AN, "wsd", 3000).losses)
    b = baseline(Curve("long", longer.lrs, 4096), longer, [fitted])
    assert b["run"] is None and "no fitted run reaches this run's end" in b["why"]


def test_y_limits_keep_the_end_of_every_curve():
    # a fitted run, a held-out run three times as long that ends lower, a curve with a few high early points
    lines = [np.linspace(4.0, 3.5, 100), np.linspace(4.0, 2.9, 300), np.r_[np.nan, 9.0, 8.0, np.full(50, 3.6)]]
    lo, hi = y_limits(lines)
    assert lo < 2.9 and 3.9 < hi < 5.0


# --- curve files ----------------------------------------------------------------------------------------


def test_curve_files_csv_wandb_json_and_tokens(tmp_path):
    c = law_run("anneal", AN, "cosine", 320)
    a, how = file_curve(f"a={write_csv(tmp_path / 'a.csv', c)}")
    assert a.lrs == pytest.approx(c.lrs) and np.allclose(a.losses, c.losses, equal_nan=True)
    assert "320 steps" in how and "before the update" in how and a.tokens_per_step is None
    # a W&B export: RUN - METRIC columns, __MIN/__MAX ignored, global_step over _step, the eval loss after
    rows = ["_step,trainer/global_step,run7 - lr,run7 - eval/loss,run7 - eval/loss__MIN"]
    rows += [f"{i // 16},{i},{float(c.lrs[i - 1])!r},{float(c.losses[i])!r},0" for i in range(16, 320, 16)]
    (tmp_path / "w.csv").write_text("\n".join(rows))
    w, how = file_curve(f"w={tmp_path / 'w.csv'}")
    assert w.steps == 304 and w.losses[16] == c.losses[16] and "after the update" in how and "linear" in how
    assert w.lrs[20] == pytest.approx(np.interp(21, [16, 32], c.lrs[[15, 31]]))
    held = file_curve(f"h={tmp_path / 'w.csv'},lr_fill=hold")[0]
    assert held.lrs[20] == c.lrs[15] and held.lrs[0] == c.lrs[15]
    # HF trainer_state.json: log_history with step, learning_rate, loss; tokens per step given
    hist = [{"step": i, "learning_rate": float(c.lrs[i - 1]), "loss": float(c.losses[i - 1])} for i in range(1, 321)]
    (tmp_path / "trainer_state.json").write_text(json.dumps({"log_history": hist + [{"step": 320, "eval_loss": 3.0}]}))
    h = file_curve(f"h={tmp_path / 'trainer_state.json'},tokens_per_step=4096")[0]
    assert h.tokens_per_step == 4096 and h.losses[:320] == pytest.approx(c.losses[:320])
    # tokens only (OLMo-style), with the batch
    (tmp_path / "t.jsonl").write_text("".join(json.dumps({"tokens": i * 1024, "optim/LR (group 0)": float(c.lrs[i - 1]),
                                                          "train/CE loss": float(c.losses[i - 1])}) + "\n"
                                              for i in range(1, 321)))
    t = file_curve(f"t={tmp_path / 't.jsonl'},tokens_per_step=1024")[0]
    assert t.steps == 320 and t.tokens_per_step == 1024
    with pytest.raises(CptError, match="tokens_per_step=N"):
        file_curve(f"t={tmp_path / 't.jsonl'}")
    (tmp_path / "nolr.csv").write_text("step,loss\n1,3.0\n2,2.9\n")
    with pytest.raises(CptError, match="no LR column.*lr=COLUMN"):
        file_curve(f"x={tmp_path / 'nolr.csv'}")
    with pytest.raises(CptError, match="NAME=FILE"):
        file_curve(str(tmp_path / "a.csv"))


def test_cli_predict_on_curve_files_with_three_fitted_runs(tmp_path, capsys):
    T = 2400
    files = {k: write_csv(tmp_path / f"{k}.csv", law_run("anneal", AN, k, T, noise=0.003, seed=i), every=4)
             for i, k in enumerate(["constant", "cosine", "wsd", "steps"])}
    out = tmp_path / "out"
    rc = main(["predict", "--curve", *(f"{k}={files[k]}" for k in ("constant", "cosine", "wsd")),
               "--held-out", f"steps={files['steps']}", "--law", "anneal", "--bootstrap", "4", "--out", str(out)])
    assert rc == 0
    printed = capsys.readouterr().out
    assert "curve cosine:" in printed and "per optimizer step (half-life" in printed and "replicates in" in printed
    report = json.loads((out / "report.json").read_text())
    assert report["fit"]["anneal"]["runs"] == ["constant", "cosine", "wsd"]
    (row,) = report["predictions"]
    assert row["held_out"] and abs(row["laws"]["anneal"]["final_err"]) < 0.01
    assert row["baseline"]["run"] in ("constant", "cosine", "wsd") and np.isfinite(row["baseline"]["final_err"])
    assert set(report["fit"]["anneal"]["in_sample"]) == {"constant", "cosine", "wsd"}
    assert "warnings" in report["fit"]["anneal"] and (out / "curves.png").stat().st_size > 10_000
    md = (out / "report.md").read_text()
    assert "| steps | anneal |" in md and "per optimizer step" in md
