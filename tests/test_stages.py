"""Continual pre-training stages: init_from switches, the first LR of a stage, decay branches, multi-stage
runs (and resuming inside one), replay buffers, and the errors for inconsistent stage recipes."""

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from cpt import checkpoint as ckpt_lib
from cpt.errors import CptError
from cpt.plan import make_branch
from cpt.tracking import read_metrics
from cpt.train.loop import train

TPS = 1024  # tokens per step in the tiny recipes


def records(run, key="train/loss"):
    return [r for r in read_metrics(Path(run.run.output_dir) / "metrics.jsonl") if key in r]


def init(path, weights=True, optimizer=False, schedule_state=False, checkpoint="latest"):
    return {"path": str(path), "checkpoint": checkpoint,
            "load": {"weights": weights, "optimizer": optimizer, "schedule_state": schedule_state}}


@pytest.fixture
def parent(make_recipe):
    """A finished 6-step English run to start stages from (cosine to 3e-4)."""
    r = make_recipe("parent", train__tokens=6 * TPS, data__mixture={"en": 1.0, "de": 0.0})
    train(r)
    return r


def child(make_recipe, name, init_from, **over):
    return make_recipe(name, model__preset=None, model__config={}, init_from=init_from,
                       train__tokens=6 * TPS, **over)


def test_weights_only_is_a_new_stage(make_recipe, parent, capsys):
    r = child(make_recipe, "weights", init(parent.run.output_dir))
    train(r)
    out = capsys.readouterr().out
    assert "loaded weights; reset optimizer, schedule (counter restarts at 0), data position" in out
    # the new stage starts from the parent's final weights: its baseline probe is the parent's last probe
    parent_last = records(parent, "probe/en/loss")[-1]["probe/en/loss"]
    assert records(r, "probe/en/loss")[0]["probe/en/loss"] == pytest.approx(parent_last, abs=1e-5)
    # new counter, new schedule: re-warming from 0 at step 1
    recs = records(r)
    assert [x["step"] for x in recs] == list(range(1, 7)) and recs[0]["lr"] == 0.0
    init_rec = records(r, "event")[0]
    assert init_rec["event"] == "init" and init_rec["init/loaded"] == ["weights"]


def test_all_three_switches_continue_exactly_like_one_run(make_recipe):
    """weights + optimizer + schedule_state from step 6 of a run == steps 7..12 of the uninterrupted run."""
    const = {"kind": "constant", "max_lr": 2e-3, "warmup": 2 * TPS}
    whole = make_recipe("whole", schedule=const)
    train(whole)
    first = make_recipe("first", schedule=const, train__tokens=6 * TPS)
    train(first)
    cont = child(make_recipe, "cont", init(first.run.output_dir, optimizer=True, schedule_state=True), schedule=const)
    train(cont)
    recs = records(cont)
    assert [x["step"] for x in recs] == list(range(7, 13)) and recs[0]["tokens"] == 7 * TPS
    assert [x["train/loss"] for x in recs] == pytest.approx([x["train/loss"] for x in records(whole)][6:], abs=1e-6)
    # without the optimizer's moments the same start diverges from step 2 of the stage on
    fresh = child(make_recipe, "no-optim", init(first.run.output_dir, schedule_state=True), schedule=const)
    train(fresh)
    a, b = [x["train/loss"] for x in records(fresh)], [x["train/loss"] for x in recs]
    assert a[0] == pytest.approx(b[0], abs=1e-6) and abs(a[2] - b[2]) > 1e-4


@pytest.mark.parametrize("warmup_from, expected", [("checkpoint", "parent_last"), (0.0, 0.0), (5e-4, 5e-4)])
def test_first_logged_lr_of_a_stage_is_what_the_recipe_says(make_recipe, parent, warmup_from, expected):
    sched = {"kind": "cosine", "max_lr": 1e-3, "min_lr": 1e-4, "warmup": 2 * TPS, "warmup_from": warmup_from}
    r = child(make_recipe, f"first-lr-{warmup_from}", init(parent.run.output_dir), schedule=sched)
    train(r)
    lrs = [x["lr"] for x in records(r)]
    parent_last = records(parent)[-1]["lr"]
    want = parent_last if expected == "parent_last" else expected
    assert lrs[0] == pytest.approx(want, rel=1e-12)
    assert lrs[1] == pytest.approx(want + (1e-3 - want) / 2, rel=1e-12)  # halfway up a 2-step warmup
    assert lrs[2] == pytest.approx(1e-3, rel=1e-12)
    if expected == "parent_last":
        assert parent_last == pytest.approx(3e-4 + 0.5 * (3e-3 - 3e-4) * (1 + torch.cos(torch.tensor(torch.pi * 3 / 4)).item()))


def test_no_warmup_starts_at_max_lr(make_recipe, parent):
    r = child(make_recipe, "no-warmup", init(parent.run.output_dir),
              schedule={"kind": "constant", "max_lr": 7e-4})
    train(r)
    assert records(r)[0]["lr"] == 7e-4


def test_decay_branch_equals_one_wsd_run_that_decays_there(make_recipe):
    wsd = {"kind": "wsd", "max_lr": 2e-3, "min_lr": 2e-4, "warmup": 0.125,
           "decay": {"length": 0.25, "shape": "1-sqrt"}}
    main = make_recipe("main", schedule=wsd, train__tokens=16 * TPS, checkpoint__every=4 * TPS,
                       checkpoint__keep_last=4)
    train(main, max_steps=8)
    ckpt = main.run.output_dir + "/checkpoints/step-00000008"
    branch = make_branch(main, ckpt, decay="4 steps")
    assert branch.run.output_dir == main.run.output_dir + "-decay-at-8"
    train(branch)
    # the single run: same schedule, budget 12 steps, decay in its last 4 (warmup frozen at 2 steps)
    single = make_recipe("single", schedule={**wsd, "warmup": 2 * TPS, "decay": {"length": 4 * TPS, "shape": "1-sqrt"}},
                         train__tokens=12 * TPS)
    train(single)
    b, s = records(branch), records(single)
    assert [x["step"] for x in b] == list(range(9, 13))
    assert [x["lr"] for x in b] == pytest.approx([x["lr"] for x in s][8:], rel=1e-12)
    assert b[-1]["lr"] == pytest.approx(2e-4 + (2e-3 - 2e-4) * (1 - (3 / 4) ** 0.5))
    assert [x["train/loss"] for x in b] == pytest.approx([x["train/loss"] for x in s][8:], abs=1e-6)
    train(main, resume=True)  # the main run goes on to its own decay (steps 13..16)
    with pytest.raises(CptError, match="at token 12288, in the decay phase"):
        make_branch(main, main.run.output_dir + "/checkpoints/step-00000012")


def test_branch_needs_wsd_or_infinite(make_recipe, parent):
    with pytest.raises(CptError, match="needs a wsd or infinite schedule"):
        make_branch(parent, parent.run.output_dir)


def test_multi_stage_run_and_resume_inside_stage_two(make_recipe, prepared):
    stages = [
        {"name": "en", "tokens": 4 * TPS, "mixture": {"en": 1.0}},
        {"name": "de", "tokens": 6 * TPS, "mixture": {"de": 0.75, "en": 0.25},
         "schedule": {"kind": "cosine", "max_lr": 2e-3, "min_lr": 2e-4, "warmup": 2 * TPS,
                      "warmup_from": "checkpoint"}},
    ]
    over = dict(train__tokens=None, data__mixture=None, stages=stages, checkpoint__keep_last=1,
                probes__sets={"en": str(prepared["en"]["validation"]), "de": str(prepared["de"]["validation"])})
    whole = make_recipe("stages", **over)
    train(whole)
    recs = records(whole)
    assert [x["stage"] for x in recs] == ["en"] * 4 + ["de"] * 6
    # stage 2 re-warms from the LR stage 1 ended at (its schedule is the run schedule: cosine over 4 steps)
    assert recs[4]["lr"] == pytest.approx(recs[3]["lr"], rel=1e-12) and recs[6]["lr"] == pytest.approx(2e-3)
    starts = [x for x in records(whole, "event") if x["event"] == "stage_start"]
    assert [(x["stage"], x["tokens"]) for x in starts] == [("en", 0), ("de", 4 * TPS)]
    assert starts[1]["stage_start/new_domains"] == ["de"]
    ends = [x for x in records(whole, "event") if x["event"] == "stage_end"]
    assert "stage_end/de/adaptation" in ends[1] and "stage_end/en/max_forgetting" in ends[1]
    assert ends[1]["stage_end/de/adaptation"] > 0  # German loss fell during the German stage
    # stage ends are kept whatever keep_last says; the next stage can start from them by name
    tags = [ckpt_lib.read_trainer_state(d).tags for d in ckpt_lib.checkpoint_dirs(whole.run.output_dir)]
    assert tags == [["stage_end:en"], ["stage_end:de"]]
    assert ckpt_lib.find_checkpoint(whole.run.output_dir, "en").name == "step-00000004"

    split = make_recipe("stages-split", **over)
    train(split, max_steps=7)  # stops 3 steps into stage 2
    train(split, resume=True)
    assert [x["train/loss"] for x in records(split)] == [x["train/loss"] for x in recs]
    assert [x["probe/en/loss"] for x in records(split, "probe/en/loss")] == pytest.approx(
        [x["probe/en/loss"] for x in records(whole, "probe/en/loss")], abs=1e-6)


def test_infinite_schedule_keeps_the_pre_anneal_checkpoint(make_recipe):
    inf = {"kind": "infinite", "max_lr": 2e-3, "warmup": 2 * TPS,
           "cooldown": {"length": 2 * TPS, "shape": "cosine", "to": 1e-3},
           "anneal": {"length": 3 * TPS, "shape": "exponential", "to": 1e-4}}
    r = make_recipe("infinite", schedule=inf, checkpoint__keep_last=1)
    train(r)
    pre = ckpt_lib.find_checkpoint(r.run.output_dir, "pre_anneal")
    assert pre.name == "step-00000009"  # 12 steps, the anneal takes the last 3
    lrs = [x["lr"] for x in records(r)]
    assert lrs[8] == pytest.approx(1e-3) and lrs[9] == pytest.approx(1e-3)  # constant until the anneal
    assert lrs[-1] == pytest.approx(1e-3 * (1e-4 / 1e-3) ** (2 / 3))


def test_replay_buffer_counts_repeats(make_recipe, capsys):
    r = make_recipe("buffer", data__replay_buffer={"en": 16 * 128}, data__warn_epochs=2.0)  # 16 sequences
    train(r)
    recs = records(r)
    assert recs[-1]["data/en/epochs"] == pytest.approx(12 * 4 / 16)  # 4 en sequences per step
    assert "source en has been read 2.0 times over" in capsys.readouterr().out
    en_rows = set()
    from cpt.data.mixture import MixtureSampler  # the buffer is one fixed subset: 16 distinct sequences
    from cpt.data.source import SubsetSource, TokenSource
    buf = SubsetSource(TokenSource(r.data.sources["en"]), 16, r.run.seed, "en")
    s = MixtureSampler({"en": 16, "de": 100}, {"en": 0.5, "de": 0.5}, seed=3)
    for name, i in s.draw(96):
        if name == "en":
            en_rows.add(int(buf.indices[i]))
    assert len(en_rows) == 16


def test_stage_errors_are_clear(make_recipe, parent):
    with pytest.raises(CptError, match=r"stages\[1\].tokens = 1500: must be a positive multiple of one step"):
        make_recipe("bad", train__tokens=None, data__mixture=None,
                    stages=[{"name": "a", "tokens": 1024, "mixture": {"en": 1.0}},
                            {"name": "b", "tokens": 1500, "mixture": {"de": 1.0}}])
    with pytest.raises(CptError, match=r"stages\[0\].mixture: weights sum to 0.5"):
        make_recipe("bad", train__tokens=None, data__mixture=None,
                    stages=[{"name": "a", "tokens": 1024, "mixture": {"en": 0.5}}])
    with pytest.raises(CptError, match="init_from.path: /nope does not exist"):
        train(child(make_recipe, "nope", init("/nope")))
    with pytest.raises(CptError, match="init_from.load.optimizer: .* Hugging Face model dir"):
        train(child(make_recipe, "hf-optim", init(Path(parent.run.output_dir) / "final", optimizer=True)))
    with pytest.raises(CptError, match="model.preset: init_from.load.weights loads the model"):
        make_recipe("both", init_from=init(parent.run.output_dir))
    # optimizer moments of another architecture are refused, not broadcast
    from transformers import AutoModelForCausalLM

    from cpt.train.optim import make_optimizer
    wide = make_recipe("wide", train__tokens=2 * TPS, model__config={"hidden_size": 96, "intermediate_size": 128,
                                                                   "num_attention_heads": 4, "num_key_value_heads": 4})
    train(wide)
    tiny = AutoModelForCausalLM.from_pretrained(Path(parent.run.output_dir) / "final")
    opt = make_optimizer(tiny, parent.train.optimizer, 1e-3, "cpu")
    with pytest.raises(CptError, match=r"moment of shape \(.*96.*\) for a parameter of shape .*another architecture"):
        ckpt_lib.load_optimizer_state(opt, ckpt_lib.find_checkpoint(wide.run.output_dir))


def test_checkpoint_is_a_hugging_face_model_dir(parent):
    from transformers import AutoModelForCausalLM

    ck = ckpt_lib.find_checkpoint(parent.run.output_dir)
    model = AutoModelForCausalLM.from_pretrained(ck)
    saved = load_file(str(ck / "model.safetensors"))
    assert torch.equal(model.state_dict()["lm_head.weight"], saved["lm_head.weight"])


def test_cli_branch_dry_run_prints_the_branch_recipe(make_recipe, tmp_path, capsys):
    import yaml

    from cpt.cli import main as cli

    wsd = {"kind": "wsd", "max_lr": 2e-3, "min_lr": 2e-4, "warmup": 0.125, "decay": {"length": 0.25}}
    main = make_recipe("cli-main", schedule=wsd, train__tokens=8 * TPS, checkpoint__every=4 * TPS)
    train(main, max_steps=4)
    path = tmp_path / "main.yaml"
    path.write_text(main.to_yaml())
    ckpt = main.run.output_dir + "/checkpoints/step-00000004"
    capsys.readouterr()
    assert cli(["train", str(path), "--branch-from", ckpt, "--decay", "2 steps", "--dry-run"]) == 0
    branch = yaml.safe_load(capsys.readouterr().out)
    assert branch["schedule"]["decay_at"] == "4K" and branch["schedule"]["decay"]["length"] == "2K"
    assert branch["init_from"]["load"] == {"weights": True, "optimizer": True, "schedule_state": True}
    assert branch["train"]["tokens"] == "2K" and branch["run"]["output_dir"].endswith("cli-main-decay-at-4")
    assert cli(["train", str(path), "--decay", "10%"]) == 2  # --decay without --branch-from


def test_english_then_german_shows_forgetting_and_adaptation(make_recipe, prepared):
    """Real text: after an English stage, a German stage raises English loss (forgetting > 0) and lowers
    German loss (adaptation > 0), and the logged worst forgetting is at least the final one."""
    stages = [{"name": "en", "tokens": 64 * TPS, "mixture": {"en": 1.0}},
              {"name": "de", "tokens": 24 * TPS, "mixture": {"de": 1.0}}]
    r = make_recipe("en-then-de", train__tokens=None, data__mixture=None, stages=stages,
                    train__micro_batch_size=8, probes__max_sequences=16, schedule={"kind": "constant", "max_lr": 3e-3, "warmup": 4 * TPS},
                    probes__sets={"en": str(prepared["en"]["validation"]), "de": str(prepared["de"]["validation"])},
                    probes__every=20 * TPS, probes__dense={"every": 4 * TPS, "for": 16 * TPS})
    train(r)
    end = [x for x in records(r, "event") if x["event"] == "stage_end"][-1]
    assert end["stage"] == "de"
    assert end["stage_end/en/forgetting"] > 0.1, end
    assert end["stage_end/de/adaptation"] > 0.1, end
    assert end["stage_end/en/max_forgetting"] >= end["stage_end/en/forgetting"]
    de_probes = [x for x in records(r, "probe/en/loss") if x["stage"] == "de"]
    # baseline, dense every 4 steps inside [64, 80), then the regular cadence (multiples of 20) and the end
    assert [x["tokens"] // TPS for x in de_probes] == [64, 68, 72, 76, 80, 88]
    assert all("probe/en/forgetting" in x and "probe/de/adaptation" in x for x in de_probes)


def test_resume_at_a_stage_boundary_drops_records_written_after_the_checkpoint(make_recipe):
    import json

    stages = [{"name": "a", "tokens": 3 * TPS, "mixture": {"en": 1.0}},
              {"name": "b", "tokens": 3 * TPS, "mixture": {"de": 1.0}}]
    over = dict(train__tokens=None, data__mixture=None, stages=stages)
    whole = make_recipe("boundary-whole", **over)
    train(whole)
    split = make_recipe("boundary-split", **over)
    train(split, max_steps=3)  # stops on the boundary, checkpoint tagged stage_end:a
    with open(Path(split.run.output_dir) / "metrics.jsonl", "a") as f:  # the next stage had begun logging
        f.write(json.dumps({"step": 3, "tokens": 3 * TPS, "stage": "b", "event": "stage_start"}) + "\n")
    train(split, resume=True)

    def history(run):
        return [(r["step"], r.get("stage"), r.get("event"), r.get("train/loss"), r.get("probe/en/loss"))
                for r in read_metrics(Path(run.run.output_dir) / "metrics.jsonl")]
    a, b = history(whole), history(split)
    assert [x[:3] for x in b if x[2] == "resume"] == [(3, None, "resume")]  # the resume is an event of its own
    b = [x for x in b if x[2] != "resume"]
    assert [x[:3] for x in a] == [x[:3] for x in b]
    for x, y in zip(a, b, strict=True):
        for p, q in zip(x[3:], y[3:], strict=True):
            assert p == q or abs(p - q) < 1e-6
