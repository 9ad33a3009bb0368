"""LR schedules against numbers worked out by hand from their closed forms."""

import math

import pytest
from pydantic import TypeAdapter, ValidationError

from cpt.errors import CptError
from cpt.schedule_plot import plot_schedules
from cpt.schedules import (
    Phase,
    Schedule,
    ScheduleConfig,
    build_schedule,
    describe,
)

T = 1_000_000  # stage budget in tokens
TPS = 1_000  # tokens per optimizer step
MAX, MIN = 1e-3, 1e-4


def build(total=T, tokens_per_step=TPS, start_lr=None, batch_size=None, **recipe):
    cfg = TypeAdapter(ScheduleConfig).validate_python(recipe)
    return build_schedule(cfg, total, tokens_per_step, start_lr=start_lr, batch_size=batch_size)


def close(a, b):
    return math.isclose(a, b, rel_tol=1e-9, abs_tol=1e-15)


# --- each kind at chosen points ------------------------------------------------------------------


def test_constant():
    s = build(kind="constant", max_lr=MAX, warmup=100_000)
    assert s(0) == 0.0
    assert close(s(50_000), MAX / 2)
    assert s(100_000) == MAX
    assert s(T - 1) == MAX and s(10 * T) == MAX


@pytest.mark.parametrize(
    "kind, middle",
    [
        ("linear", (MAX + MIN) / 2),
        ("cosine", (MAX + MIN) / 2),
        # REX at p = 1/2: (1/2) / (1/2 + 1/4) = 2/3 of the way from min to max
        ("rex", MIN + (MAX - MIN) * 2 / 3),
    ],
)
def test_decays_to_min_lr(kind, middle):
    s = build(kind=kind, max_lr=MAX, min_lr=MIN, warmup=200_000)
    assert s(0) == 0.0
    assert close(s(100_000), MAX / 2)
    assert close(s(200_000), MAX)
    assert close(s(600_000), middle)  # middle of the decay [200K, 1M)
    assert s(T) == MIN and s(2 * T) == MIN


def test_linear_and_cosine_quarter_points():
    lin = build(kind="linear", max_lr=MAX)
    cos = build(kind="cosine", max_lr=MAX, min_lr=MIN)
    assert close(lin(250_000), 0.75 * MAX)
    assert close(cos(250_000), MIN + (MAX - MIN) * 0.5 * (1 + math.cos(math.pi / 4)))


def test_inv_sqrt():
    s = build(kind="inv_sqrt", max_lr=MAX, warmup=10_000, timescale=30_000)
    assert close(s(10_000), MAX)
    assert close(s(10_000 + 30_000), MAX / math.sqrt(2))  # t - warmup = alpha
    assert close(s(10_000 + 90_000), MAX / 2)  # alpha / (alpha + 3 alpha) = 1/4
    end = MAX * math.sqrt(30_000 / (30_000 + T - 10_000))
    assert close(s(T - 1e-6), end) and s(T) == s(5 * T) == pytest.approx(end)


def test_wsd_shapes():
    # decay over [800K, 1M): middle at 900K, a quarter in at 850K
    common = dict(kind="wsd", max_lr=MAX, min_lr=MIN, warmup=100_000)
    lin = build(**common, decay={"length": "20%", "shape": "linear"})
    sqrt = build(**common, decay={"length": "20%", "shape": "1-sqrt"})
    exp = build(**common, decay={"length": "20%", "shape": "exponential"})
    for s in (lin, sqrt, exp):
        assert close(s(50_000), MAX / 2)
        assert s(100_000) == s(500_000) == s(799_999) == MAX
        assert s(T) == MIN
    assert close(lin(900_000), (MAX + MIN) / 2)
    assert close(sqrt(850_000), MIN + (MAX - MIN) * 0.5)  # 1 - sqrt(1/4)
    assert close(exp(900_000), math.sqrt(MAX * MIN))


def test_wsd_default_decay_is_last_ten_percent_1_sqrt():
    s = build(kind="wsd", max_lr=MAX)
    assert [(p.name, p.start, p.end, p.shape) for p in s.phases] == [
        ("stable", 0, 900_000, "constant"),
        ("decay", 900_000, T, "1-sqrt"),
    ]
    assert close(s(925_000), MAX * 0.5)


def test_power():
    # batch 4 sequences: 4 * 4.6 * n^-0.51 is below max_lr = 0.02 from n ~ 0.6M on
    law = lambda n: min(0.02, 4 * 4.6 * n**-0.51)  # noqa: E731
    s = build(
        kind="power", max_lr=0.02, warmup=100, decay={"length": 200_000, "shape": "linear"}, batch_size=4
    )
    assert s(0) == 0.0 and close(s(100), 0.02) and close(s(50), 0.01)  # warmup ends on the cap
    assert s(10_000) == 0.02  # capped
    assert 4 * 4.6 * 700_000**-0.51 < 0.02
    assert close(s(700_000), law(700_000))
    assert close(s(800_000), law(800_000))  # the decay starts from the power law...
    assert close(s(900_000), law(800_000) / 2)  # ... and falls linearly to min_lr = 0
    assert s(T) == 0.0


def test_power_warmup_ramps_to_power_law():
    s = build(kind="power", max_lr=0.02, warmup=800_000, decay={"length": 100_000}, batch_size=4)
    target = 4 * 4.6 * 800_000**-0.51
    assert close(s(400_000), target / 2)
    assert close(s(800_000), target)


# --- warmup starts and lengths ---------------------------------------------------------------------


def test_warmup_from_value_and_checkpoint():
    s = build(kind="constant", max_lr=MAX, warmup=1000, warmup_from=5e-4)
    assert s(0) == 5e-4 and close(s(500), 7.5e-4) and s(1000) == MAX
    s = build(kind="constant", max_lr=MAX, warmup=1000, warmup_from="checkpoint", start_lr=2e-4)
    assert s(0) == 2e-4 and close(s(500), 6e-4)
    # re-warming may also ramp down, if the new stage peaks below the checkpoint's last LR
    s = build(kind="constant", max_lr=MAX, warmup=1000, warmup_from="checkpoint", start_lr=3e-3)
    assert close(s(500), 2e-3)


@pytest.mark.parametrize(
    "warmup, tokens",
    [
        (25_000, 25_000),
        ("25K", 25 * 1024),
        ("25000 tokens", 25_000),
        ("25 steps", 25 * TPS),
        ("2.5%", 25_000),
        (0.025, 25_000),
    ],
)
def test_lengths_resolve(warmup, tokens):
    s = build(kind="linear", max_lr=MAX, warmup=warmup)
    assert s.phases[0].end == tokens


def test_warmup_in_steps_is_counted_in_tokens():
    s = build(kind="linear", max_lr=MAX, warmup="10 steps")  # the LR of step k is s(k * tokens_per_step)
    assert close(s(5 * TPS), MAX / 2) and close(s(10 * TPS), MAX)


# --- agreement with transformers ---------------------------------------------------------------------


@pytest.mark.parametrize("decay_type", ["linear", "cosine", "1-sqrt"])
@pytest.mark.parametrize("min_lr_ratio", [0.0, 0.1])
def test_wsd_matches_transformers(decay_type, min_lr_ratio):
    import torch  # here, so that the other tests do not wait for transformers to import
    import transformers

    steps, warm, decay, tps = 120, 10, 30, 512
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=MAX)
    hf = transformers.get_wsd_schedule(
        opt,
        num_warmup_steps=warm,
        num_decay_steps=decay,
        num_training_steps=steps,
        min_lr_ratio=min_lr_ratio,
        decay_type=decay_type,
    )
    # transformers warms up from min_lr_ratio * lr, not from 0
    ours = build(
        total=steps * tps,
        tokens_per_step=tps,
        kind="wsd",
        max_lr=MAX,
        min_lr=min_lr_ratio * MAX,
        warmup=f"{warm} steps",
        warmup_from=min_lr_ratio * MAX,
        decay={"length": f"{decay} steps", "shape": decay_type},
    )
    for step in range(steps + 5):
        assert close(ours(step * tps), opt.param_groups[0]["lr"]), step
        opt.step()
        hf.step()


# --- the infinite schedule ---------------------------------------------------------------------------


@pytest.mark.parametrize("cooldown_shape", ["cosine", "inv_sqrt"])
def test_infinite(cooldown_shape):
    const, low = 4e-4, 4e-5
    cooldown = {"length": "10%", "shape": cooldown_shape, "to": const}
    if cooldown_shape == "inv_sqrt":
        cooldown["timescale"] = 20_000
    s = build(
        kind="infinite",
        max_lr=MAX,
        warmup="1%",
        cooldown=cooldown,
        anneal={"length": 50_000, "shape": "exponential", "to": low},
    )
    assert [(p.name, p.start, p.end) for p in s.phases] == [
        ("warmup", 0, 10_000),
        ("cooldown", 10_000, 110_000),
        ("constant", 110_000, 950_000),
        ("anneal", 950_000, T),
    ]
    for prev, nxt in zip(s.phases, s.phases[1:], strict=False):
        b = prev.end
        assert close(prev.lr_end, nxt.lr_start)
        assert s(b - 1e-3) == pytest.approx(s(b), rel=1e-6)  # continuous from the left
    assert s(10_000) == MAX
    assert s(110_000) == s(500_000) == s(949_999) == const
    assert close(s(975_000), math.sqrt(const * low))  # exponential anneal midpoint
    assert close(s(T - 1e-9), low) and s(T) == s(3 * T) == low
    if cooldown_shape == "cosine":
        assert close(s(60_000), (MAX + const) / 2)
    else:
        # normalised 1/sqrt(1 + t/alpha) over D = 100K, alpha = 20K, at t = alpha
        s_end = 1 / math.sqrt(6)
        f = (1 / math.sqrt(2) - s_end) / (1 - s_end)
        assert close(s(30_000), const + (MAX - const) * f)


def test_infinite_without_anneal_stays_constant():
    s = build(kind="infinite", max_lr=MAX, cooldown={"length": 100_000, "to": 5e-4})
    assert [p.name for p in s.phases] == ["cooldown", "constant"]
    assert s(T) == s(10 * T) == 5e-4


def test_infinite_linear_anneal_to_zero():
    s = build(
        kind="infinite",
        max_lr=MAX,
        cooldown={"length": 100_000, "to": 5e-4},
        anneal={"length": 100_000, "shape": "linear", "to": 0},
    )
    assert close(s(950_000), 2.5e-4) and s(T) == 0.0


# --- WSD decay branches ------------------------------------------------------------------------------


@pytest.mark.parametrize("shape", ["linear", "cosine", "1-sqrt", "exponential"])
def test_decay_branch_equals_shorter_run(shape):
    tps, at, length = 256, 300 * 256, 40 * 256
    recipe = dict(
        kind="wsd", max_lr=MAX, min_lr=MIN, warmup="20 steps", decay={"length": "40 steps", "shape": shape}
    )
    branch = build(total=1000 * tps, tokens_per_step=tps, decay_at="300 steps", **recipe)
    short = build(total=at + length, tokens_per_step=tps, **recipe)
    for step in range(1000):
        assert close(branch(step * tps), short(step * tps)), step
    assert branch.phases[-1].name == "hold" and branch(999 * tps) == MIN


# --- validation --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "recipe, kwargs, key",
    [
        (
            dict(kind="wsd", max_lr=MAX, warmup="50%", decay={"length": "60%"}),
            {},
            r"schedule\.decay\.length: 60% \(.*\) plus schedule\.warmup: 50% .* exceed the stage budget of",
        ),
        (
            dict(kind="linear", max_lr=MAX, warmup="2000 steps"),
            {},
            r"schedule\.warmup: 2000 steps .* exceeds",
        ),
        (
            dict(kind="cosine", max_lr=MAX, min_lr=2 * MAX),
            {},
            r"schedule\.min_lr: 0\.002 exceeds schedule\.max_lr",
        ),
        (
            dict(kind="wsd", max_lr=MAX, decay={"shape": "exponential"}),
            {},
            r"schedule\.min_lr: an exponential",
        ),
        (
            dict(kind="constant", max_lr=MAX, warmup=10, warmup_from="checkpoint"),
            {},
            r"schedule\.warmup_from: 'checkpoint' needs a checkpoint to start from \(init_from\)",
        ),
        (
            dict(kind="wsd", max_lr=MAX, decay_at="95%"),
            {},
            r"schedule\.decay_at: 95% .* plus schedule\.decay\.length",
        ),
        (
            dict(kind="wsd", max_lr=MAX, warmup="20%", decay_at="10%"),
            {},
            r"schedule\.decay_at: 10% .* inside the warmup",
        ),
        (dict(kind="power", max_lr=MAX), {}, r"kind 'power' needs the batch size"),
        (
            dict(kind="power", max_lr=0.02, min_lr=0.019),
            {"batch_size": 4},
            r"schedule\.min_lr: 0\.019 exceeds the power-law",
        ),
        (
            dict(kind="infinite", max_lr=MAX, cooldown={"length": "10%", "to": 2 * MAX}),
            {},
            r"schedule\.cooldown\.to: 0\.002 exceeds schedule\.max_lr",
        ),
        (
            dict(kind="infinite", max_lr=MAX, cooldown={"length": "10%", "to": MIN, "shape": "inv_sqrt"}),
            {},
            r"schedule\.cooldown\.timescale: needed",
        ),
        (
            dict(kind="infinite", max_lr=MAX, cooldown={"length": "10%", "to": MIN, "timescale": 10}),
            {},
            r"schedule\.cooldown\.timescale: only used",
        ),
        (
            dict(
                kind="infinite",
                max_lr=MAX,
                cooldown={"length": "10%", "to": MIN},
                anneal={"length": "5%", "to": 0},
            ),
            {},
            r"schedule\.anneal\.to: an exponential",
        ),
        (
            dict(
                kind="infinite",
                max_lr=MAX,
                cooldown={"length": "10%", "to": MIN},
                anneal={"length": "5%", "to": MAX},
            ),
            {},
            r"schedule\.anneal\.to: 0\.001 exceeds schedule\.cooldown\.to",
        ),
        (
            dict(
                kind="infinite",
                max_lr=MAX,
                warmup="30%",
                cooldown={"length": "60%", "to": MIN},
                anneal={"length": "20%", "to": MIN / 2},
            ),
            {},
            r"schedule\.anneal\.length: 20% .* plus schedule\.cooldown\.length: 60% .* plus schedule\.warmup: 30%",
        ),
    ],
)
def test_validation_names_the_key(recipe, kwargs, key):
    with pytest.raises(CptError, match=key):
        build(**recipe, **kwargs)


def test_schema_rejects_unknown_keys_and_kinds():
    ta = TypeAdapter(ScheduleConfig)
    for bad in (
        dict(kind="wsd", max_lr=MAX, decay_length="10%"),
        dict(kind="wsd", max_lr=MAX, decay={"length": "10%", "shap": "linear"}),
        dict(kind="step", max_lr=MAX),
        dict(kind="cosine", max_lr=0),
        dict(kind="wsd", max_lr=MAX, decay={"shape": "rex"}),
    ):
        with pytest.raises(ValidationError):
            ta.validate_python(bad)


def test_recipe_round_trip():
    ta = TypeAdapter(ScheduleConfig)
    raw = {
        "kind": "infinite",
        "max_lr": "3e-4",
        "warmup": "1%",  # YAML reads 3e-4 as a string
        "cooldown": {"length": "10%", "shape": "cosine", "to": 1.5e-4},
        "anneal": {"length": "200 steps", "shape": "exponential", "to": 3e-5},
    }
    cfg = ta.validate_python(raw)
    dumped = ta.dump_python(cfg, mode="json")
    assert dumped["warmup"] == "1%" and dumped["anneal"]["length"] == "200 steps"
    assert ta.validate_python(dumped) == cfg


# --- the Schedule object, describe, plot ---------------------------------------------------------------


def test_schedule_rejects_gaps():
    with pytest.raises(ValueError, match="contiguous"):
        Schedule((Phase("a", 0, 10, 1.0, 1.0, "constant"), Phase("b", 11, 20, 1.0, 1.0, "constant")), 20)


def test_describe_and_plot(tmp_path):
    wsd = build(kind="wsd", max_lr=MAX, min_lr=MIN, warmup="1%", decay_at="50%")
    text = describe(wsd)
    lines = text.splitlines()
    assert lines[0].split() == ["phase", "tokens", "lr", "shape"]
    assert lines[1].split() == ["warmup", "0", "->", "10000", "0", "->", "0.001", "linear"]
    assert [ln.split()[0] for ln in lines[1:5]] == ["warmup", "stable", "decay", "hold"]
    inv = build(kind="inv_sqrt", max_lr=MAX, timescale="1K")
    assert "inv_sqrt (timescale 1K)" in describe(inv)
    path = plot_schedules({"wsd": wsd, "inv_sqrt": inv}, tmp_path / "lr.png", title="schedules")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_schedule_verb_groups_overrides_by_recipe_and_labels_stages(tmp_path, capsys):
    """key=value before the first recipe applies to all, after a recipe to it alone: one recipe against a
    variant of itself in one call, each labelled with what it overrides."""
    from pathlib import Path

    from cpt.cli import _schedule_groups, main

    assert _schedule_groups(["train.tokens=1M", "a.yaml", "b.yaml", "schedule.max_lr=1e-3", "run.seed=2"]) == [
        ("a.yaml", ["train.tokens=1M"], []),
        ("b.yaml", ["train.tokens=1M", "schedule.max_lr=1e-3", "run.seed=2"], ["schedule.max_lr=1e-3", "run.seed=2"])]
    with pytest.raises(CptError, match="needs at least one recipe"):
        _schedule_groups(["train.tokens=1M"])
    root = Path(__file__).resolve().parents[1]
    recipe = str(root / "recipes/paper/infinite-3stages.yaml")
    out = tmp_path / "lr.png"
    assert main(["schedule", recipe, recipe, "schedule.max_lr=1e-3", "--out", str(out), "--title", "two"]) == 0
    printed = capsys.readouterr().out
    assert "infinite-3stages: 3 stage(s)" in printed and "infinite-3stages (schedule.max_lr=1e-3): 3 stage(s)" in printed
    assert printed.count("0.002") > printed.split("(schedule.max_lr=1e-3)")[1].count("0.002")  # the variant peaks lower
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
