"""`cpt plan`: the two-domain law and its fit, the pilot design, the pick, and the verb end to end on pilots
whose probe curves a known law generated (the planner must recover the pick that law makes)."""

from __future__ import annotations

import json
import shlex
import sys

import numpy as np
import pytest
import yaml

from cpt.cli import main
from cpt.errors import CptError
from cpt.planner import Pilot, design_pilots, fit_domain, pick, predict_all
from cpt.planner.design import THIN_MARGIN
from cpt.planner.law import Schedule, law
from cpt.planner.report import render_plan
from cpt.predict.curves import recipe_lrs
from cpt.recipe import load_recipe

# a, b, log10 s, beta, c, kappa (, log10 C): the true laws with the anneal law's S2 term and with the bounded drop
# term; the old domain's plateau grows with the peak LR (kappa 0.4), the new domain's less (0.2)
LAWS = {"area": {"old": (0.9, -1.2, 0.6, 0.8, 0.004, 0.4), "new": (-1.6, 1.4, 1.1, 0.5, 0.003, 0.2)},
        "drop": {"old": (0.9, -1.2, 0.6, 0.8, 0.3, 0.4, 0.0), "new": (-1.6, 1.4, 1.1, 0.5, 0.2, 0.2, 0.3)}}
TRUE = dict(LAWS["drop"])  # the default of `cpt plan`
L0 = {"old": 5.8, "new": 7.8}
REPLAYS, SCALES = [0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6], [0.125, 0.25, 0.5, 1.0]
REF = 2e-3


def cosine(T: int, max_lr: float, warm: int = 1, floor: float = 0.1) -> np.ndarray:
    t = np.arange(1, T + 1)
    decay = floor + (1 - floor) * 0.5 * (1 + np.cos(np.pi * (t - warm) / (T - warm)))
    return max_lr * np.where(t <= warm, t / warm, decay)


def wsd(T: int, max_lr: float, warm: int = 1, floor: float = 0.1) -> np.ndarray:
    """The pilots' shape: warmup, stable, a linear decay over the last half (as `cpt plan` runs them)."""
    t = np.arange(1, T + 1)
    d0 = T - max(1, round(0.5 * T))
    return max_lr * np.where(t <= warm, t / warm, np.where(t <= d0, 1.0, 1 - (1 - floor) * (t - d0) / (T - d0)))


def true_curve(dom: str, lrs: np.ndarray, r: float) -> np.ndarray:
    return law(TRUE[dom], L0[dom], r, Schedule(lrs, REF), dom == "old")


def true_pick(lrs_of, max_rise: float, max_worst: float | None) -> tuple[float, float] | None:
    best = None
    for r in REPLAYS:
        for lr in (s * REF for s in SCALES):
            old, new = true_curve("old", lrs_of(r, lr), r), true_curve("new", lrs_of(r, lr), r)
            if old[-1] - L0["old"] <= max_rise and (max_worst is None or old.max() - L0["old"] <= max_worst):
                if best is None or new[-1] < best[0]:
                    best = (new[-1], r, lr)
    return None if best is None else best[1:]


def test_law_by_hand_on_three_steps():
    sched = Schedule(np.array([2.0, 2.0, 1.0]), 2.0)  # LRs 1, 1, 0.5 of the reference
    assert sched.s1.tolist() == [0.0, 1.0, 2.0, 2.5]
    # the fall of 0.5 at update 3, the area since it S_3(3) = 0.5: with C = 1, 0.5 * (1 - 1 / 1.5)
    assert sched.drop(0.0) == pytest.approx([0.0, 0.0, 0.0, 0.5 / 3])
    assert sched.s2 == pytest.approx([0.0, 0.0, 0.0, 0.5])  # S2: the fall's momentum, summed
    # a=1, b=-1, s=1 (log10 0), beta=1, c=0.2, r=0.25, the old domain (annealing in proportion to r = 0.25):
    # L0 + 0.75 (1 - 1/(1 + S1)) - 0.2 x 0.25 S2 (or drop, C = 1); the peak LR is the reference: kappa does nothing
    shifted = [5.0, 5.0 + 0.75 / 2, 5.0 + 0.75 * 2 / 3, 5.0 + 0.75 * 2.5 / 3.5]
    for kappa in (0.0, 1.0):
        assert law((1.0, -1.0, 0.0, 1.0, 0.2, kappa), 5.0, 0.25, sched, True) == pytest.approx(
            np.subtract(shifted, [0, 0, 0, 0.2 * 0.25 * 0.5]))
        assert law((1.0, -1.0, 0.0, 1.0, 0.2, kappa, 0.0), 5.0, 0.25, sched, True) == pytest.approx(
            np.subtract(shifted, [0, 0, 0, 0.2 * 0.25 * 0.5 / 3]))
    # the same LRs against a reference twice as high (peak 0.5): S1 and S2 halve, the plateau is 0.5^kappa of the
    # reference's; the new domain (share 0.75) gets annealing in proportion to 0.75
    half = Schedule(np.array([2.0, 2.0, 1.0]), 4.0)
    assert half.peak == 0.5 and half.s1.tolist() == [0.0, 0.5, 1.0, 1.25] and half.s2 == pytest.approx([0, 0, 0, 0.25])
    expect = [5.0 + 0.75 * 0.5 * x / (1 + x) for x in (0.0, 0.5, 1.0, 1.25)]
    assert law((1.0, -1.0, 0.0, 1.0, 0.2, 1.0), 5.0, 0.25, half, False) == pytest.approx(
        np.subtract(expect, [0, 0, 0, 0.2 * 0.75 * 0.25]))


def synthetic_pilots(noise: float, seed: int = 1, full: int = 160):
    specs = design_pilots(REPLAYS, [s * REF for s in SCALES], 4, full * 256, 256, 0.25)
    rng = np.random.default_rng(seed)
    pilots = {"old": [], "new": []}
    for s in specs:
        T = s.tokens // 256
        lrs, n = wsd(T, s.max_lr), np.arange(T + 1)
        for dom in pilots:
            y = true_curve(dom, lrs, s.replay) + rng.normal(0, noise, T + 1) * (n > 0)
            pilots[dom].append(Pilot(s.name, s.replay, lrs, n, y))
    return specs, pilots


def test_design_puts_pilots_at_the_corners_within_the_budget():
    specs = design_pilots(REPLAYS, [s * REF for s in SCALES], 4, 160 * 256, 256, 0.25)
    assert {(p.replay, p.max_lr) for p in specs} == {(0.0, REF), (0.6, REF / 8), (0.6, REF), (0.0, REF / 8)}
    assert sum(p.tokens for p in specs) <= 0.25 * 160 * 256 and all(p.tokens == 10 * 256 for p in specs)
    with pytest.raises(CptError, match="at least 6 steps"):
        design_pilots(REPLAYS, [REF / 8, REF], 4, 80 * 256, 256, 0.25)


def test_fit_refuses_pilots_of_one_replay_share():
    _, pilots = synthetic_pilots(0.0)
    same = [p for p in pilots["old"] if p.replay == 0.0]
    with pytest.raises(CptError, match="same share"):
        fit_domain("old", same, old=True, bootstrap=0)


@pytest.mark.parametrize("anneal", ["drop", "area"])
def test_noise_free_pilots_recover_the_law_over_the_full_budget(anneal, monkeypatch):
    monkeypatch.setattr(sys.modules[__name__], "TRUE", LAWS[anneal])
    _, pilots = synthetic_pilots(0.0)
    for dom in ("old", "new"):
        f = fit_domain(dom, pilots[dom], old=dom == "old", bootstrap=0, anneal=anneal)
        assert f.L0 == pytest.approx(L0[dom]) and f.rmse < 1e-6
        for r, scale in ((0.3, 0.5), (0.0, 1.0)):  # a candidate no pilot ran, 16x a pilot's length
            lrs = cosine(160, scale * REF)
            mid, _ = f.curves(lrs, r)
            assert mid[-1] == pytest.approx(true_curve(dom, lrs, r)[-1], abs=2e-3)


@pytest.mark.parametrize("anneal", ["drop", "area"])
def test_noisy_pilots_give_a_pick_that_keeps_the_true_budget(anneal, monkeypatch):
    """Pilots 25% of the full run, probe noise 0.005, 16x extrapolation in length: for budgets that bind at
    different places the planner's pick keeps the true law's budget (within 0.02) at a new-domain loss near the
    true pick's, and it says the budget cannot be met where the true law says so.

    Exact picks are not promised: on 5 noise seeds x 4 budgets the pick was the true law's 18 of 20 times with
    the area term and 11 of 20 with the drop term (the peak-LR exponent kappa and the shift's scale trade off in
    8-step pilots); 7 of the drop term's 9 misses replayed more or ran a lower LR than needed (up to 0.24 nats of
    new-domain loss given away), 2 replayed less and broke the budget by up to 0.12 (seed 5)."""
    monkeypatch.setattr(sys.modules[__name__], "TRUE", LAWS[anneal])
    _, pilots = synthetic_pilots(0.005)
    fo = fit_domain("old", pilots["old"], old=True, bootstrap=20, anneal=anneal)
    fn = fit_domain("new", pilots["new"], old=False, bootstrap=20, ref_lr=fo.ref_lr, anneal=anneal)
    lrs_of = lambda r, lr: cosine(160, lr)  # noqa: E731
    preds = predict_all(fo, fn, REPLAYS, [s * REF for s in SCALES], lrs_of)
    exact = 0
    for budget, worst in ((0.1, 0.2), (0.2, 0.4), (0.05, 0.1), (0.3, 0.6), (0.01, 0.03)):
        chosen, truth = pick(preds, budget, worst), true_pick(lrs_of, budget, worst)
        if truth is None:
            assert chosen is None
            continue
        assert chosen is not None
        lrs = lrs_of(chosen.replay, chosen.max_lr)
        old = true_curve("old", lrs, chosen.replay)
        assert old[-1] - L0["old"] <= budget + 0.02 and old.max() - L0["old"] <= worst + 0.02
        gap = true_curve("new", lrs, chosen.replay)[-1] - true_curve("new", lrs_of(*truth), truth[0])[-1]
        assert gap < 0.25
        if (chosen.replay, chosen.max_lr) == truth:
            exact += 1
            new_true = true_curve("new", lrs, truth[0])[-1]
            assert abs(chosen.new_final[0] - new_true) < 0.15
            assert abs(chosen.old_rise[0] - (old[-1] - L0["old"])) < 0.1
    assert exact >= 2
    assert true_pick(lrs_of, 0.01, 0.03) is None  # the case that cannot be met is in the loop


# --- the verb on pilot runs written by hand ---------------------------------------------------------------

BASE = {
    "run": {"name": "cpt-de", "output_dir": "OUT", "seed": 1},
    "init_from": {"path": "pretrained", "load": {"weights": True, "optimizer": False, "schedule_state": False}},
    "model": {"tokenizer": "tok"},
    "data": {"seq_len": 64, "sources": {"en": "data/en", "de": "data/de"}, "mixture": {"de": 1.0, "en": 0.0}},
    "train": {"tokens": 256 * 160, "global_batch_tokens": 256},
    "schedule": {"kind": "cosine", "max_lr": REF, "min_lr": REF / 10, "warmup": "1 steps"},
    "probes": {"sets": {"en": "data/en-val", "de": "data/de-val"}},
}


def write_pilot(run, recipe_path, overrides, noise_seed):
    """A finished pilot's run dir: its recipe's LRs, probes after every step from the true law (+ noise)."""
    r = load_recipe(recipe_path, overrides)
    lrs, tps = recipe_lrs(r)
    share = r.data.mixture["en"]
    rng = np.random.default_rng(noise_seed)
    old, new = true_curve("old", lrs, share), true_curve("new", lrs, share)
    run.mkdir(parents=True)
    (run / "final").mkdir()
    with open(run / "metrics.jsonl", "w") as f:
        for i in range(len(lrs) + 1):
            if i:
                f.write(json.dumps({"step": i, "tokens": i * tps, "train/loss": 6.0, "lr": float(lrs[i - 1])}) + "\n")
            eps = rng.normal(0, 0.001, 2) if i else (0.0, 0.0)  # the noise cases are the unit tests above
            f.write(json.dumps({"step": i, "tokens": i * tps, "probe/en/loss": float(old[i] + eps[0]),
                                "probe/de/loss": float(new[i] + eps[1])}) + "\n")


def test_cli_plan_dry_run_then_plan_on_pilots_from_a_known_law(tmp_path, capsys):
    base = tmp_path / "base.yaml"
    base.write_text(yaml.safe_dump(BASE))
    out = tmp_path / "plan"
    args = ["plan", str(base), "--old", "en", "--new", "de", "--max-forgetting", "0.2", "--max-rise", "0.4",
            "--replay", ",".join(map(str, REPLAYS)), "--bootstrap", "5", "--out", str(out)]
    assert main([*args, "--dry-run"]) == 0
    cmds = [line for line in capsys.readouterr().out.splitlines() if line.startswith("cpt train")]
    assert len(cmds) == 4 and all("train.tokens=2560" in c and "probes.every=256" in c for c in cmds)
    for i, c in enumerate(cmds):  # each pilot "runs": its run dir written from the true law
        words = shlex.split(c)
        overrides = [w for w in words[3:] if "=" in w]
        run = out / "pilots" / next(w for w in words if w.startswith("run.name=")).split("=")[1]
        write_pilot(run, base, overrides, i)
    assert main(args) == 0
    rep = json.loads((out / "plan.json").read_text())
    lrs_of = lambda r, lr: recipe_lrs(load_recipe(base, [f"data.mixture.en={r}", f"data.mixture.de={1 - r}",  # noqa: E731
                                                         f"schedule.max_lr={lr}", f"schedule.min_lr={lr / 10}"]))[0]
    truth = true_pick(lrs_of, 0.2, 0.4)
    assert truth is not None and (rep["pick"]["replay"], rep["pick"]["max_lr"]) == pytest.approx(truth)
    picked = load_recipe(out / "recipe.yaml")
    assert picked.data.mixture == pytest.approx({"en": truth[0], "de": 1 - truth[0]})
    assert picked.schedule.max_lr == pytest.approx(truth[1]) and picked.train.tokens == BASE["train"]["tokens"]
    # the pick with the replay controller: the same recipe, the controller starting at the pick's share
    controlled = load_recipe(out / "controlled.yaml")
    ctl = controlled.data.mixture.controller
    assert (ctl.old, ctl.new, ctl.budget, ctl.start) == ("en", "de", 0.2, pytest.approx(truth[0]))
    assert (ctl.min, ctl.max) == (min(REPLAYS), max(REPLAYS))
    assert controlled.schedule.max_lr == pytest.approx(truth[1]) and controlled.train.tokens == BASE["train"]["tokens"]
    assert controlled.schedule.min_lr == pytest.approx(picked.schedule.min_lr)
    text = (out / "plan.md").read_text()
    assert "controlled.yaml" in text
    # where a held-out pilot's miss exceeds the pick's margin, the report says to run the controlled recipe
    thin = render_plan({**rep, "notes": [*rep["notes"], f"the law misses ... by up to 0.2: {THIN_MARGIN}"]}, brief=True)
    assert "**Run this instead**" in thin and "controlled.yaml" in thin
    assert ("**Run this instead**" in text) == any(THIN_MARGIN in n for n in rep["notes"])
    assert "**Pick**" in text and "| pilot-r0-lr0.002 |" in text and (out / "frontier.png").stat().st_size > 10_000
    # a budget no candidate meets is said plainly (the same report, with no pick)
    plain = render_plan({**rep, "pick": None, "max_forgetting": -1.0})
    assert "**The budget cannot be met**" in plain and "least forgetting predicted" in plain
