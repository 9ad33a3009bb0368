"""The replay controller (issue 30 item 3): data.mixture: {controller: ...} sets the old data's share at every
probe from the old domain's rise over the stage start, so that it stays under a budget. The control law on a
synthetic plant (rise a known function of the share), the schedule under the sampler (exact shares, exact
resume), the trainer (a rise above the target raises the share, logged, resumed bit for bit), refusals."""

import json
import math
import random
from pathlib import Path

import pytest
from conftest import launch, metric  # tests/ is on sys.path (pytest's rootdir conftest)

from cpt.data.controller import ControlledSchedule, ControllerState, ReplayController
from cpt.data.mixture import MixtureSampler
from cpt.errors import CptError
from cpt.plan import make_branch, plan_run
from cpt.recipe import ReplayControllerConfig
from cpt.tracking import read_metrics
from cpt.train.loop import train


def run_plant(c: ReplayController, drive, b: float, n: int = 48, noise: float = 0.0, alpha: float = 0.5, seed: int = 0):
    """A first-order plant: the rise relaxes toward ``drive(f) - b * share`` (f: the stage's fraction), half way
    per probe interval; the controller reads it (plus noise) at each of ``n`` probes. [(rise, share)]."""
    rng = random.Random(seed)
    rise, share, out = 0.0, c.state.share, []
    for k in range(1, n + 1):
        rise += alpha * (drive(k / n) - b * share - rise)
        share = c.update(k * 1000, rise + rng.gauss(0.0, noise))
        out.append((rise, share))
    return out


def controller(budget=0.1, lo=0.0, hi=0.5, start=0.25, kp=0.05, ki=1.0, n=48) -> ReplayController:
    return ReplayController(budget, 0.8, lo, hi, start, kp, ki, n * 1000)


@pytest.mark.parametrize("b, alpha", [(0.2, 0.5), (0.6, 0.5), (1.5, 0.5), (3.0, 0.5), (0.6, 1.0), (1.5, 1.0)])
def test_converges_under_the_budget_and_stays_in_bounds(b, alpha):
    """The default gains (kp 0.05, ki 1) on plants whose rise moves 2 to 30 budgets per unit of share, lagging
    (alpha 0.5: half way per probe) or not (alpha 1: the rise follows the share within one probe)."""
    # a re-warm-like drive: high at first, settling to 0.08 + 0.15 b; the share that holds the target
    # (0.08) there is 0.15
    def drive(f):
        return 0.08 + b * (0.15 + 0.3 * math.exp(-f / 0.1))

    out = run_plant(controller(), drive, b, alpha=alpha)
    assert all(0.0 <= s <= 0.5 for _, s in out)
    tail = out[-12:]
    assert all(r <= 0.1 for r, _ in tail)  # under the budget
    assert all(abs(r - 0.08) < 0.01 for r, _ in tail)  # at the target
    assert tail[-1][1] == pytest.approx(0.15, abs=0.03)


def test_an_unreachable_budget_pins_the_share_at_max_without_windup():
    # the rise cannot be held for the first half (drive 1.0 > 0.5 x b); then it can, at share 0.1
    def drive(f):
        return 1.0 if f <= 0.5 else 0.08 + 0.1

    c = controller()
    out = run_plant(c, drive, b=1.0)
    first, second = out[:24], out[24:]
    assert all(s == 0.5 for _, s in first[2:])
    assert c.state.integral < 0.5  # held while saturated, not stored up for the whole first half
    left = next(i for i, (_, s) in enumerate(second) if s < 0.5)
    assert left <= 2  # the share comes off the bound within two probes of the drive falling
    assert all(r <= 0.1 for r, _ in second[-8:])
    # without the anti-windup the integral would have grown by ki * e * 1/2 with e = (rise - 0.08) / 0.1 > 4
    assert c.state.share == pytest.approx(0.1, abs=0.03)


def test_noise_moves_the_share_but_not_the_mean_rise_past_the_budget():
    def drive(f):
        return 0.08 + 0.6 * 0.2

    rises = []
    for seed in range(5):
        out = run_plant(controller(n=96), drive, b=0.6, n=96, noise=0.03, seed=seed)  # noise sd 0.3 budgets
        assert all(0.0 <= s <= 0.5 for _, s in out)
        rises += [r for r, _ in out[48:]]
    mean = sum(rises) / len(rises)
    assert mean == pytest.approx(0.08, abs=0.01) and mean < 0.1


def test_a_diverged_probe_replays_the_most_allowed():
    c = controller()
    assert c.update(1000, float("nan")) == 0.5
    assert c.state.integral == 0.0


def test_state_goes_through_json_and_the_controller_continues_exactly():
    def drive(f):
        return 0.3

    whole = controller()
    expected = run_plant(whole, drive, 0.6)
    half = controller()
    run_plant(half, drive, 0.6, n=20)
    saved = json.loads(json.dumps(half.state.to_dict()))
    again = controller()
    again.state = ControllerState.from_dict(saved)
    rise = [r for r, _ in expected]
    assert [again.update(k * 1000, rise[k - 1]) for k in range(21, 49)] == [s for _, s in expected[20:]]
    assert again.state == whole.state
    with pytest.raises(CptError, match="replay controller state is malformed"):
        ControllerState.from_dict({**saved, "changes": [[0, 1.5]]})
    with pytest.raises(CptError, match="replay controller state is malformed"):
        ControllerState.from_dict({"share": 0.1, "bogus": 1})


CFG = ReplayControllerConfig(old="en", new="de", budget=0.1, min=0.0, max=0.5, start=0.25)


def test_the_sampler_draws_the_new_share_from_the_probe_on_and_resumes_it_exactly():
    sched = ControlledSchedule(CFG, stage_tokens=8 * 64, seq_len=8)  # 64 sequences
    sampler = MixtureSampler({"de": 97, "en": 31}, sched, seed=5)
    first = sampler.draw(16)
    assert sum(n == "en" for n, _ in first) == 4  # 25%
    log = sampler.on_probe(16 * 8, {"probe/en/forgetting": 0.3})  # 2.2 budgets above the target
    assert log["controller/share"] == 0.5 and log["controller/changed"] == 1.0
    state = json.loads(json.dumps(sampler.state_dict()))
    second = sampler.draw(16)
    assert sum(n == "en" for n, _ in second) == 8  # 50% from the probe on
    assert sampler.last_shares() == {"de": 0.5, "en": 0.5}
    resumed = MixtureSampler({"de": 97, "en": 31}, ControlledSchedule(CFG, 8 * 64, 8), seed=5)
    resumed.load_state_dict(state)
    assert resumed.draw(16) == second
    assert resumed.schedule.controller.state == sampler.schedule.controller.state
    with pytest.raises(CptError, match="without the replay controller's state"):
        MixtureSampler({"de": 97, "en": 31}, ControlledSchedule(CFG, 8 * 64, 8), seed=5).load_state_dict(
            {**state, "schedule": None})
    fixed = MixtureSampler({"de": 97, "en": 31}, {"de": 0.75, "en": 0.25}, seed=5)
    with pytest.raises(CptError, match="another mixture schedule"):
        fixed.load_state_dict(state)


def test_a_start_share_of_0_still_lets_the_controller_replay():
    cfg = ReplayControllerConfig(old="en", new="de", budget=0.1, start=0.0)
    sampler = MixtureSampler({"de": 97, "en": 31}, ControlledSchedule(cfg, 8 * 64, 8), seed=5)
    assert {n for n, _ in sampler.draw(8)} == {"de"}
    sampler.on_probe(64, {"probe/en/forgetting": 0.2})
    assert any(n == "en" for n, _ in sampler.draw(8))


CONTROL = {"controller": {"old": "en", "new": "de", "budget": 0.01, "min": 0.0, "max": 0.5, "start": 0.0}}


@pytest.fixture
def english_model(make_recipe):
    """A tiny model trained on English only (its German training then raises its English loss)."""
    pre = make_recipe("pre", data__mixture={"en": 1.0}, train__tokens=8 * 1024)
    train(pre)
    return pre.run.output_dir


def controlled(make_recipe, name, pre, **over):
    over = {"schedule": {"kind": "constant", "max_lr": 1e-2, "warmup": 0}, **over}
    return make_recipe(name, init_from={"path": pre, "load": {"weights": True}}, model__preset=None,
                       model__tokenizer=None, data__mixture=CONTROL, probes__every=2048, **over)


def test_trainer_raises_the_share_after_a_rise_logs_it_and_resumes_exactly(make_recipe, english_model):
    whole = controlled(make_recipe, "whole", english_model)
    train(whole)
    recs = read_metrics(Path(whole.run.output_dir) / "metrics.jsonl")
    probes = [r for r in recs if "controller/share" in r]
    assert [r["step"] for r in probes] == [2, 4, 6, 8, 10, 12]
    for r in probes:
        assert r["controller/rise"] == r["probe/en/forgetting"]
        assert r["controller/target"] == pytest.approx(0.008) and r["controller/budget"] == 0.01
    raised = next(r for r in probes if r["controller/changed"])
    assert raised["controller/rise"] > 0.008 and raised["controller/share"] > 0.0
    steps = {r["step"]: r for r in recs if "train/loss" in r}
    assert all(steps[s]["data/en/share"] == 0.0 for s in range(1, raised["step"] + 1))
    after = steps[raised["step"] + 1]["data/en/share"]
    assert after == pytest.approx(raised["controller/share"], abs=1e-12)  # from the next step on
    # interrupted after the first change, then resumed: the same losses and shares, bit for bit
    split = controlled(make_recipe, "split", english_model)
    assert not train(split, max_steps=raised["step"] + 1).completed
    saved = json.loads((Path(split.run.output_dir) / f"checkpoints/step-{raised['step'] + 1:08d}/trainer_state.json")
                       .read_text())
    assert saved["sampler"]["schedule"]["controller"]["share"] == raised["controller/share"]
    assert saved["mixture"]["en"] == raised["controller/share"]
    assert train(split, resume=True).completed
    again = read_metrics(Path(split.run.output_dir) / "metrics.jsonl")
    for key in ("train/loss", "data/en/share", "controller/share", "controller/integral"):
        assert [r[key] for r in recs if key in r] == [r[key] for r in again if key in r], key


def test_a_decay_branch_of_a_controlled_run_holds_the_share_the_controller_had_set(make_recipe, english_model):
    """`cpt train --branch-from` a WSD run whose replay share a controller sets: the branch replays the share in
    effect at its checkpoint (read from the checkpoint's controller state), not the controller's start share."""
    wsd = {"kind": "wsd", "max_lr": 1e-2, "min_lr": 1e-3, "warmup": 0, "decay": {"length": 0.25}}
    parent = controlled(make_recipe, "parent", english_model, schedule=wsd, checkpoint__every=2048)
    assert not train(parent, max_steps=8).completed
    ckpt = Path(parent.run.output_dir) / "checkpoints/step-00000008"
    share = json.loads((ckpt / "trainer_state.json").read_text())["sampler"]["schedule"]["controller"]["share"]
    assert share > 0.0  # the controller raised it from its start (0)
    branch = make_branch(parent, ckpt, decay="2 steps")
    assert branch.data.mixture == {"en": share, "de": 1.0 - share}
    assert train(branch).completed
    steps = [r for r in read_metrics(Path(branch.run.output_dir) / "metrics.jsonl") if "train/loss" in r]
    assert [r["step"] for r in steps] == [9, 10] and all(r["data/en/share"] == share for r in steps)


@pytest.mark.parametrize("mixture, message", [
    ({"controller": {"old": "fr", "new": "de", "budget": 0.1}}, r"data.mixture.controller.old = fr: not one of "
                                                                r"data.sources \(en, de\)"),
    ({"controller": {"old": "en", "new": "en", "budget": 0.1}}, r"old and new are both 'en'"),
    ({"controller": {"old": "en", "new": "de", "budget": 0.1, "max": 1.5}}, r"data.mixture.controller.max"),
    ({"controller": {"old": "en", "new": "de", "budget": 0.1, "min": 0.4, "max": 0.2}}, r"min = 0.4 is above max"),
    ({"controller": {"old": "en", "new": "de", "budget": 0.1, "start": 0.9}}, r"start = 0.9 is outside \[min, max\]"),
    ({"controller": {"old": "en", "new": "de", "budget": 0}}, r"data.mixture.controller.budget"),
    ({"controller": {"old": "en", "new": "de", "budget": 0.1, "gain": 1}}, r"data.mixture.controller.gain: unknown"),
])
def test_bad_controllers_are_one_line_from_the_schema(make_recipe, mixture, message):
    with pytest.raises(CptError, match=message):
        make_recipe(data__mixture=mixture)


def test_controllers_that_cannot_act_are_refused_at_planning(make_recipe, prepared):
    mix = {"controller": {"old": "en", "new": "de", "budget": 0.1}}
    with pytest.raises(CptError, match=r"data.mixture.controller: acts at each probe, but probes.every and "
                                       r"probes.dense are unset"):
        plan_run(make_recipe(data__mixture=mix))
    with pytest.raises(CptError, match=r"data.mixture.controller.probe = de: the old domain has no probe set"):
        plan_run(make_recipe(data__mixture={"controller": {**mix["controller"], "probe": "de"}}, probes__every=2048))
    with pytest.raises(CptError, match=r"controller.probe = en: is a new domain of this stage"):
        plan_run(make_recipe(data__mixture=mix, probes__every=2048, probes__new_domains=["en"]))
    stage = plan_run(make_recipe(data__mixture=mix, probes__every=2048)).stages[0]
    assert stage.new_domains == [] and "replay set online in [0, 0.5] from 0.25" in stage.mixture.describe()
    staged = make_recipe(data__mixture=None, train__tokens=None, probes__dense={"every": 1024, "for": 4096},
                         stages=[{"name": "de", "tokens": 12 * 1024, "mixture": mix}])
    assert plan_run(staged).stages[0].mixture.cfg.budget == 0.1  # a stage-level mixture too


@pytest.mark.multiproc
def test_two_processes_set_the_shares_one_process_sets(two_proc_recipe, prepared):
    """Under DDP (2 gloo processes) every rank reads the same all-reduced rise, so the controller sets the shares
    one process sets on the same data (here it lowers the share from 0.25: the English loss of a model trained
    from scratch falls), and the losses follow."""
    ctl = {"mixture": {"controller": {"old": "en", "new": "de", "budget": 0.05, "start": 0.25}}}
    probes = {"probes": {"sets": {"en": str(prepared["en"]["validation"])}, "max_sequences": 7, "every": 1024}}
    one, _ = two_proc_recipe("ctl-one", tokens=6144, data=ctl, extra=probes)
    train(one)
    two, path = two_proc_recipe("ctl-two", tokens=6144, data=ctl, extra=probes)
    launch(path)
    shares = metric(one.run.output_dir, "controller/share")
    assert len(shares) == 6 and sum(metric(one.run.output_dir, "controller/changed")) >= 2
    assert shares[-1] < 0.25
    for key in ("controller/rise", "controller/share", "data/en/share", "train/loss"):
        assert metric(two.run.output_dir, key) == pytest.approx(metric(one.run.output_dir, key), abs=2e-5), key
