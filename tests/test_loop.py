"""The loop's parts without a model: the decision after a step, the typed trainer state a checkpoint
carries, and the one planner."""

from __future__ import annotations

import json

import pytest
from conftest import with_overrides  # tests/ is on sys.path (pytest's rootdir conftest)

from cpt.errors import CptError
from cpt.plan import plan_run
from cpt.recipe import validate_recipe
from cpt.state import STATE_VERSION, Origin, TrainerState
from cpt.train.loop import after_step

TPS = 1024


def recipe(**over):
    data = {
        "run": {"name": "r", "output_dir": "/nonexistent/r"},
        "model": {"preset": "tiny-llama", "tokenizer": "tok"},
        "data": {"seq_len": 128, "sources": {"en": "en", "de": "de"}},
        "train": {"global_batch_tokens": TPS},
        "schedule": {"kind": "wsd", "max_lr": 1e-3, "warmup": 0, "decay": {"length": 4 * TPS}},
        "stages": [{"name": "a", "tokens": 8 * TPS, "mixture": {"en": 1.0}},
                   {"name": "b", "tokens": 16 * TPS, "mixture": {"de": 1.0}}],
        "probes": {"sets": {"en": "en-val"}, "every": 4 * TPS},
        "checkpoint": {"every": 6 * TPS},
    }
    return validate_recipe(with_overrides(data, over))


def decide(r, after, *, stopped=False, steps_taken=1, max_steps=None, has_probes=True):
    plan = plan_run(r)
    stage = plan.stage_at(after - TPS)
    halt_asked = stopped or (max_steps is not None and steps_taken >= max_steps)
    return after_step(after - TPS, after, stage, r, end_tokens=plan.end, has_probes=has_probes,
                      halt_asked=halt_asked)


def test_after_step_decides_probes_saves_tags_and_halts_by_hand():
    r = recipe()
    plain = decide(r, 1 * TPS)
    assert (plain.probe, plain.tags, plain.save, plain.halt) == (False, [], False, False)
    assert decide(r, 4 * TPS).probe and not decide(r, 4 * TPS).save          # probe cadence: 4 steps
    assert decide(r, 6 * TPS).save and not decide(r, 6 * TPS).probe          # checkpoint cadence: 6 steps
    end_a = decide(r, 8 * TPS)                                               # end of stage a
    assert end_a.probe and end_a.save and end_a.tags == ["stage_end:a"]
    assert not decide(r, 8 * TPS, has_probes=False).probe
    # the run-wide WSD decays over the last 4 steps (tokens 20K-24K): the step ending at 20K is pre_anneal
    pre = decide(r, 20 * TPS)
    assert pre.tags == ["pre_anneal"] and pre.save
    last = decide(r, 24 * TPS, stopped=True)
    assert last.tags == ["stage_end:b"] and last.save and not last.halt     # the end is not a halt
    stop = decide(r, 3 * TPS, stopped=True)
    assert stop.save and stop.halt and not stop.probe
    assert decide(r, 3 * TPS, steps_taken=3, max_steps=3).halt
    assert not decide(r, 3 * TPS, steps_taken=2, max_steps=3).halt
    dense = recipe(probes__dense={"every": TPS, "for": 3 * TPS})  # stage b: 9K and 10K, then every 4K
    assert [decide(dense, t * TPS).probe for t in (9, 10, 11, 12)] == [True, True, False, True]


def state(**over):
    s = TrainerState(step=3, tokens=3 * TPS, stage="a", sampler={"drawn": 24}, data_consumed={"en": 24},
                     mixture={"en": 1.0}, lr=1e-3, elapsed_s=1.5, tags=["pre_anneal"],
                     origin=Origin(path="/x", step=1, tokens=TPS), next_lr=9e-4, probe_state=None,
                     metrics_records=7, guard={"skipped": 0, "in_a_row": 0, "recent": [2.0]})
    return {**s.to_json(), **over}


def test_trainer_state_round_trips_and_refuses_what_it_cannot_read():
    d = state()
    assert d["version"] == STATE_VERSION
    back = TrainerState.from_json(json.loads(json.dumps(d)), "x")
    assert back.to_json() == d and back.origin == Origin(path="/x", step=1, tokens=TPS)
    # version 1: unversioned, no guard, origin with is_checkpoint (written, never read)
    v1 = {k: v for k, v in d.items() if k not in ("version", "guard")}
    v1["origin"] = {**v1["origin"], "is_checkpoint": True}
    old = TrainerState.from_json(v1, "old")
    assert old.guard is None and old.origin.path == "/x" and old.version == STATE_VERSION
    with pytest.raises(CptError, match=r"ckpt/trainer_state.json: trainer state version 9; this cpt reads"):
        TrainerState.from_json(state(version=9), "ckpt/trainer_state.json")
    with pytest.raises(CptError, match=r"x: unknown fields bogus"):
        TrainerState.from_json(state(bogus=1), "x")
    with pytest.raises(CptError, match=r"x: trainer state lacks step, tokens"):
        TrainerState.from_json({k: v for k, v in d.items() if k not in ("step", "tokens")}, "x")
    with pytest.raises(CptError, match=r"x: origin: unknown fields where"):
        TrainerState.from_json(state(origin={"where": 1}), "x")
    with pytest.raises(CptError, match=r"x: not a trainer state record"):
        TrainerState.from_json([1], "x")


def test_one_planner_for_train_schedule_and_predict(tmp_path):
    r = recipe(init_from={"path": str(tmp_path / "not-yet"), "load": {"weights": True}}, model__preset=None)
    with pytest.raises(CptError, match=r"init_from.path: .*not-yet does not exist"):
        plan_run(r)  # training refuses it
    plan = plan_run(r, allow_missing_init=True)  # planning ahead counts from 0 and says so
    assert plan.note == f"init_from.path {tmp_path / 'not-yet'} does not exist yet: counting from token 0"
    assert [(s.name, s.start, s.end) for s in plan.stages] == [("a", 0, 8 * TPS), ("b", 8 * TPS, 24 * TPS)]
    assert plan.stage_at(8 * TPS).name == "b" and plan.stage_at(10**9).name == "b" and plan.end == 24 * TPS


def test_the_progress_bar_shows_the_step_just_taken():
    import io

    from tqdm import tqdm

    from cpt.train.loop import show_step

    out = io.StringIO()
    bar = tqdm(total=3, file=out, mininterval=0, miniters=1, ascii=True)
    show_step(bar, loss="1.500", lr="1.00e-03")
    show_step(bar, loss="1.250", lr="2.00e-03")
    last = out.getvalue().split("\r")[-1]
    assert "2/3" in last and "loss=1.250" in last and "lr=2.00e-03" in last, last
