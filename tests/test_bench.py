"""scripts/bench_trainer.py: the lockstep that times the sides one at a time, and its failure modes; one
real lockstep of cpt's loop, the bare loop and transformers.Trainer on a tiny model."""

from __future__ import annotations

import threading
import time

import pytest

from cpt.errors import CptError
from scripts.bench_trainer import (
    BenchError,
    Config,
    Lockstep,
    Side,
    bare_side,
    batons_in_cpt_loop,
    check_variants,
    cpt_side,
    parse_variant,
    rounds_of,
    save_trainer_dataset,
    trainer_side,
)


class Watch:
    """Counts the sides running at once (the lockstep allows one)."""

    def __init__(self):
        self.lock, self.now, self.most = threading.Lock(), 0, 0

    def sleeper(self, seconds: float, steps: int, fail_at: int | None = None):
        def body(side: Side) -> None:
            for k in range(steps):
                side.turn()
                with self.lock:
                    self.now += 1
                    self.most = max(self.most, self.now)
                try:
                    if k == fail_at:
                        raise ValueError("boom in the side")
                    time.sleep(seconds)
                finally:
                    with self.lock:
                        self.now -= 1
        return body


def test_lockstep_times_each_side_alone_and_finishes():
    watch, timed = Watch(), 6
    fast, slow = Side("fast", watch.sleeper(0.01, timed + 1)), Side("slow", watch.sleeper(0.03, timed + 1))
    seen = []
    Lockstep([fast, slow], timed, on_step=seen.append).run()
    assert watch.most == 1  # never two sides at once
    assert seen == list(range(timed))
    assert len(fast.times) == len(slow.times) == timed and fast.calls == slow.calls == timed + 1
    assert 2.0 < sum(slow.times) / sum(fast.times) < 4.5  # each turn is that side's own work
    assert not fast._thread.is_alive() and not slow._thread.is_alive()
    assert rounds_of([1, 2, 3, 4, 5, 6, 7], warmup=1, per_round=3) == [9, 18]


def test_a_failing_side_stops_the_benchmark_without_deadlock():
    watch = Watch()
    ok, bad = Side("ok", watch.sleeper(0.001, 11)), Side("bad", watch.sleeper(0.001, 11, fail_at=3))
    t0 = time.perf_counter()
    with pytest.raises(BenchError, match=r"(?s)side bad failed.*boom in the side"):
        Lockstep([ok, bad], 10, timeout=30).run()
    assert time.perf_counter() - t0 < 10
    assert not ok._thread.is_alive() and not bad._thread.is_alive()  # the waiting side was let go


def test_a_side_that_stops_early_or_never_yields_is_named():
    watch = Watch()
    with pytest.raises(BenchError, match="side short finished after 3 step"):
        Lockstep([Side("long", watch.sleeper(0.001, 6)), Side("short", watch.sleeper(0.001, 3))], 5).run()
    with pytest.raises(BenchError, match="side silent finished after 0 step"):
        Lockstep([Side("silent", lambda side: None)], 2).run()


def test_variants_parse_and_fail_with_the_recipes_message():
    assert parse_variant("ac:train.activation_checkpointing=true,probes.max_sequences=8") == (
        "ac", {"train.activation_checkpointing": True, "probes.max_sequences": 8})
    check_variants([("ac", {"train.activation_checkpointing": True})])
    with pytest.raises(CptError, match=r"--variant x: train.compil: unknown key \(did you mean 'compile'\?\)"):
        check_variants([("x", {"train.compil": True})])
    with pytest.raises(CptError, match="name is taken"):
        check_variants([("bare", {"train.compile": True})])


def test_real_lockstep_cpt_bare_trainer(tmp_path, tokenizer_dir, prepared):
    from cpt.data.tokenizer import load_tokenizer

    hf = tmp_path / "hf"
    save_trainer_dataset(prepared["en"]["train"], hf)
    cfg = Config("1.5M", 128, 2, tokenizer_dir, prepared["en"]["train"], hf, tmp_path)
    timed = 3
    recipe = cfg.recipe(tmp_path / "cpt", timed + 1, {"tracking.progress": False})
    tokenizer = load_tokenizer(tokenizer_dir)
    sides = [trainer_side(cfg, recipe, tokenizer, timed + 1, tmp_path / "trainer"),
             bare_side(cfg, recipe, tokenizer, timed + 1), cpt_side("cpt", recipe)]
    with batons_in_cpt_loop():
        Lockstep(sides, timed).run()
    import cpt.train.loop
    from cpt.train.step import train_step

    assert cpt.train.loop.train_step is train_step  # the wrapper is gone again
    assert {s.name: s.calls for s in sides} == {"Trainer": timed + 1, "bare": timed + 1, "cpt": timed + 1}
    assert all(len(s.times) == timed and min(s.times) > 0 for s in sides)
    assert len({s.info["params"] for s in sides}) == 1  # one model for all
    assert sides[2].info["completed"] and (tmp_path / "cpt" / "final" / "config.json").is_file()
    assert "fused" in sides[0].info["optimizer"] and "fused" in sides[1].info["optimizer"]
