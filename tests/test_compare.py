"""`cpt compare` on two hand-written run dirs: PNGs per panel, one self-contained HTML page, and table
numbers worked out by hand (computed forgetting for a run without tracked keys, logged ones otherwise)."""

from __future__ import annotations

import base64
import json
import math
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from cpt.compare import Run, ema, load_run, summarize

# Run A: one stage, no forgetting keys (computed from probe/<d>/loss against the first probe);
# its recipe marks de as new.
RUN_A = [
    {"step": 0, "tokens": 0, "probe/en/loss": 5.0, "probe/de/loss": 6.0},
    {"step": 1, "tokens": 1024, "train/loss": 7.0, "lr": 1e-3, "time/elapsed_s": 1.5},
    {"step": 2, "tokens": 2048, "train/loss": 6.0, "lr": 5e-4, "time/elapsed_s": 3.0},
    {"step": 2, "tokens": 2048, "probe/en/loss": 5.5, "probe/de/loss": 5.2},
    {"step": 3, "tokens": 3072, "train/loss": 5.5, "lr": 1e-4, "time/elapsed_s": 4.5},
    {"step": 3, "tokens": 3072, "probe/en/loss": 5.25, "probe/de/loss": 4.9},
]
# Run B: two stages with the trainer's forgetting keys; code is new in stage b, which starts at
# tokens 1000 (its baseline probe); the first train record of b ends its first step, at 2000.
RUN_B = [
    {"step": 0, "tokens": 0, "stage": "a", "probe/en/loss": 4.0, "probe/code/loss": 7.0},
    {"step": 1, "tokens": 1000, "stage": "a", "train/loss": 3.0, "lr": 1e-3, "time/elapsed_s": 70.0},
    {"step": 1, "tokens": 1000, "stage": "b", "probe/en/loss": 4.0, "probe/code/loss": 7.0,  # stage baseline
     "probe/en/forgetting": 0.0, "probe/en/max_forgetting": 0.0, "probe/en/max_forgetting_tokens": 1000,
     "probe/code/adaptation": 0.0},
    {"step": 2, "tokens": 2000, "stage": "b", "train/loss": 4.0, "lr": 1e-3, "time/elapsed_s": 140.0},
    {"step": 2, "tokens": 2000, "stage": "b", "probe/en/loss": 4.3, "probe/code/loss": 6.0,
     "probe/en/forgetting": 0.3, "probe/en/max_forgetting": 0.3, "probe/en/max_forgetting_tokens": 2000,
     "probe/code/adaptation": 1.0},
    {"step": 3, "tokens": 3000, "stage": "b", "train/loss": 3.5, "lr": 5e-4, "time/elapsed_s": 3725.0},
    {"step": 3, "tokens": 3000, "stage": "b", "probe/en/loss": 4.1, "probe/code/loss": 5.5,
     "probe/en/forgetting": 0.1, "probe/en/max_forgetting": 0.3, "probe/en/max_forgetting_tokens": 2000,
     "probe/code/adaptation": 1.5},
]


def write_run(path: Path, name: str, kind: str, records: list[dict], new_domains=None) -> Path:
    path.mkdir(parents=True)
    (path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    recipe = {"run": {"name": name, "output_dir": str(path)}, "schedule": {"kind": kind, "max_lr": 1e-3},
              "probes": {"sets": {}, "new_domains": new_domains}}
    (path / "recipe.yaml").write_text(yaml.safe_dump(recipe))
    return path


@pytest.fixture
def runs(tmp_path):
    return (write_run(tmp_path / "a", "run-a", "cosine", RUN_A, new_domains=["de"]),
            write_run(tmp_path / "b", "run-b", "wsd", RUN_B))


# The final train loss is the train-loss panel's EMA (0.9, bias-corrected, restarted at stage starts) at
# the last step. Run A, losses 7, 6, 5.5: averages 0.7, 0.63 + 0.6 = 1.23, 1.107 + 0.55 = 1.657 over
# 1 - 0.9^n = 0.1, 0.19, 0.271. Run B restarts at stage b: 4 (0.4 / 0.1), then (0.36 + 0.35) / 0.19.
EMA_A = [7.0, 1.23 / 0.19, 1.657 / 0.271]
EMA_B_LAST = 0.71 / 0.19


def test_summaries_by_hand(runs):
    a, b = (summarize(load_run(r)) for r in runs)
    assert a["forgetting"] == {"en": pytest.approx({"final": 0.25, "worst": 0.5, "worst_tokens": 2048})}
    assert a["adaptation"] == {"de": pytest.approx(6.0 - 4.9)}
    assert a["probes"] == {"en": {"loss": 5.25}, "de": {"loss": 4.9}}  # the last probe's values
    assert (a["final_train_loss"], a["tokens"], a["wall_s"], a["schedule"]) == (
        pytest.approx(EMA_A[-1]), 3072, 4.5, "cosine")
    assert ema([7.0, 6.0, 5.5], 0.9) == pytest.approx(EMA_A)
    assert b["forgetting"] == {"en": pytest.approx({"final": 0.1, "worst": 0.3, "worst_tokens": 2000})}
    assert b["adaptation"] == {"code": 1.5}
    assert b["probes"] == {"en": {"loss": 4.1}, "code": {"loss": 5.5}}
    assert (b["final_train_loss"], b["tokens"], b["wall_s"], b["schedule"]) == (
        pytest.approx(EMA_B_LAST), 3000, 3725.0, "wsd")
    assert summarize(load_run(runs[0]), smoothing=0.0)["final_train_loss"] == 5.5  # no smoothing: the last step
    assert load_run(runs[1]).stage_boundaries() == [1000]
    staged = {"schedule": {"kind": "wsd"}, "stages": [{"name": "a"}, {"name": "b", "schedule": {"kind": "cosine"}}]}
    assert summarize(Run(runs[1], "x", [], staged))["schedule"] == "wsd; b: cosine"
    # without a baseline probe the first record of stage b ends its first step (2000); still 1000
    bare = write_run(runs[1].parent / "c", "run-c", "wsd", [r for r in RUN_B if r["step"] != 1 or "train/loss" in r])
    assert load_run(bare).stage_boundaries() == [1000]


def test_ema_by_hand_restarts_at_stage_boundaries():
    # bias-corrected, beta 0.5: 1; (0.25 + 1) / 0.75; (0.625 + 1.5) / 0.875
    assert ema([1.0, 2.0, 3.0], 0.5) == pytest.approx([1.0, 1.25 / 0.75, 2.125 / 0.875])
    assert ema([1.0, 2.0, 3.0], 0.5, restart_at={2}) == pytest.approx([1.0, 1.25 / 0.75, 3.0])


def test_cli_compare_writes_pngs_and_a_self_contained_page(runs, tmp_path):
    from cpt.cli import main

    (runs[0] / "final").mkdir()  # run-a reached its end; run-b stopped (no final/)
    out = tmp_path / "cmp"
    assert main(["compare", str(runs[0]), str(runs[1]), "--out", str(out)]) == 0
    pngs = sorted(p.name for p in out.glob("*.png"))
    assert pngs == ["lr.png", "probe_code.png", "probe_de.png", "probe_en.png", "train_loss.png"]
    page = (out / "index.html").read_text()
    images = re.findall(r'<img src="data:image/png;base64,([A-Za-z0-9+/=]+)"', page)
    assert len(images) == len(pngs)
    assert all(base64.b64decode(img)[:8] == b"\x89PNG\r\n\x1a\n" for img in images)
    assert not re.search(r'(src|href)="(?!data:)', page)  # no external assets
    rows = {m.group(1): m.group(0) for m in re.finditer(r"<tr><td[^>]*>([^<]+)</td>.*?</tr>", page)}
    cells = {name: re.findall(r"<td[^>]*>([^<]*)</td>", row) for name, row in rows.items()}
    head = re.findall(r"<th>([^<]*)</th>", page)
    assert head == ["run", "schedule", "tokens", "wall time", "final train loss (EMA 0.9)",
                    "en loss: final", "forgetting en: final", "forgetting en: worst (at tokens)",
                    "de loss: final", "adaptation de: final", "code loss: final", "adaptation code: final"]
    assert cells["run-a"] == ["run-a", "cosine", "3,072", "4.5 s", "6.1144", "5.2500", "0.2500", "0.5000 (2,048)",
                              "4.9000", "1.1000", "", ""]
    assert cells["run-b"] == ["run-b", "wsd", "3,000 (stopped: no final/)", "1:02:05", "3.7368", "4.1000", "0.1000",
                              "0.3000 (2,000)", "", "", "5.5000", "1.5000"]
    assert load_run(runs[1]).stage_names() == ["b"]


def test_compare_in_bits_per_byte(runs, tmp_path):
    """--metric bpb: probe panels and forgetting columns from probe/<d>/bpb (computed against the first
    probe where the trainer logged no _bpb keys); refused where no run has bpb."""
    from cpt.compare import compare
    from cpt.errors import CptError

    with pytest.raises(CptError, match="--metric bpb: no run logged probe/<set>/bpb"):
        compare(list(runs), tmp_path / "none", metric="bpb")
    records = [{**r, **({"probe/en/bpb": r["probe/en/loss"] / 4} if "probe/en/loss" in r else {})} for r in RUN_A]
    a = write_run(tmp_path / "bpb", "run-bpb", "cosine", records)
    s = summarize(load_run(a), "bpb")
    assert s["forgetting"] == {"en": pytest.approx({"final": 0.0625, "worst": 0.125, "worst_tokens": 2048})}
    assert s["adaptation"] == {}  # de has no bpb
    assert s["probes"] == {"en": {"loss": 5.25, "bpb": 5.25 / 4}, "de": {"loss": 4.9}}
    page = compare([a], tmp_path / "cmp", metric="bpb")
    assert sorted(p.name for p in page.parent.glob("probe_*.png")) == ["probe_en_bpb.png"]
    text = page.read_text()
    assert "bits per byte" in text
    # final values of both units where logged (de has no bpb column), deltas in the metric asked for
    assert re.findall(r"<th>([^<]*)</th>", text)[5:] == [
        "en loss: final", "en bpb: final", "forgetting en: final", "forgetting en: worst (at tokens)", "de loss: final"]
    assert re.findall(r"<td[^>]*>([^<]*)</td>", text)[5:] == ["5.2500", "1.3125", "0.0625", "0.1250 (2,048)", "4.9000"]


def test_final_train_loss_is_smoothed_and_a_non_finite_end_shows(tmp_path):
    """One noisy last step moves the table's train loss by a tenth of its jump (EMA 0.9), not all of it;
    a run whose last loss is NaN shows nan rather than a smoothed number that hides it."""
    flat = [{"step": k, "tokens": 100 * k, "train/loss": 2.0, "lr": 1e-3} for k in range(1, 41)]
    noisy = write_run(tmp_path / "n", "noisy", "constant", [*flat, {"step": 41, "tokens": 4100, "train/loss": 3.0}])
    # 40 steps at 2 then one at 3: (2 (1 - 0.9^41) + 0.1) / (1 - 0.9^41)
    assert summarize(load_run(noisy))["final_train_loss"] == pytest.approx(2.0 + 0.1 / (1 - 0.9**41))
    nan = write_run(tmp_path / "x", "nan", "constant", [*flat, {"step": 41, "tokens": 4100, "train/loss": "nan"}])
    assert math.isnan(summarize(load_run(nan))["final_train_loss"])


def test_lr_is_drawn_at_each_steps_first_token(runs, tmp_path):
    """A step's LR is logged on its record (tokens after the step) but drawn where the schedule that gave
    it is evaluated: the step's first token, the record's tokens less one step (the difference to the
    previous step's record; for the first, the recipe's train.global_batch_tokens, else that difference)."""
    assert load_run(runs[0]).lr_curve() == ([0, 1024, 2048], [1e-3, 5e-4, 1e-4])
    assert load_run(runs[1]).lr_curve() == ([0, 1000, 2000], [1e-3, 1e-3, 5e-4])
    one = [{"step": 5, "tokens": 5 * 512, "train/loss": 1.0, "lr": 2e-4}]  # a counter continued from step 4
    lone = write_run(tmp_path / "lone", "lone", "constant", one)
    assert load_run(lone).lr_curve() == ([2048], [2e-4])  # no recipe train: the counter from 0, 512 a step
    recipe = yaml.safe_load((lone / "recipe.yaml").read_text())
    (lone / "recipe.yaml").write_text(yaml.safe_dump({**recipe, "train": {"global_batch_tokens": "1K"}}))
    assert load_run(lone).lr_curve() == ([5 * 512 - 1024], [2e-4])  # the recipe's tokens per step


def test_cpt_schedule_and_cpt_compare_draw_a_runs_lr_at_the_same_points(make_recipe, tmp_path, monkeypatch):
    """Issue 20 (b): a real two-stage run (the second stage re-warming from 0) and `cpt schedule` of its
    recipe: every point of compare's lr.png line lies on the schedule plot's line, at the same x, with the
    same LR; the first point of each stage at the stage's first token (0, then the boundary)."""
    from matplotlib.figure import Figure

    from cpt.cli import main
    from cpt.train.loop import train

    drawn: dict[str, Figure] = {}
    savefig = Figure.savefig
    monkeypatch.setattr(Figure, "savefig", lambda fig, path, **kw: (drawn.__setitem__(Path(path).name, fig),
                                                                    savefig(fig, path, **kw))[1])
    stages = [{"name": "en", "tokens": 3 * 1024, "mixture": {"en": 1.0}},
              {"name": "de", "tokens": 4 * 1024, "mixture": {"de": 1.0},
               "schedule": {"kind": "wsd", "max_lr": 2e-3, "min_lr": 2e-4, "warmup": 2048, "decay": {"length": 1024}}}]
    recipe = make_recipe("lr-points", train__tokens=None, data__mixture=None, stages=stages, probes__sets={})
    train(recipe)
    path = tmp_path / "lr-points.yaml"
    path.write_text(recipe.to_yaml())
    assert main(["schedule", str(path), "--out", str(tmp_path / "schedule.png")]) == 0
    assert main(["compare", recipe.run.output_dir, "--out", str(tmp_path / "cmp")]) == 0

    def line(fig):
        (found,) = [ln for ln in fig.axes[0].get_lines() if ln.get_label() == "lr-points"]
        return dict(zip(found.get_xdata().tolist(), found.get_ydata().tolist(), strict=True))

    planned, logged = line(drawn["schedule.png"]), line(drawn["lr.png"])
    assert sorted(logged) == [k * 1024 for k in range(7)]  # each step at its first token: 0 .. 6K
    for x, lr in logged.items():
        assert planned[x] == pytest.approx(lr, rel=1e-12, abs=1e-15), x
    assert logged[0] == 0.0 and logged[3 * 1024] == 0.0  # each stage's first step: its warmup from 0
    assert logged[5 * 1024] == pytest.approx(2e-3)  # the re-warmed stage reaches max_lr after its 2 warmup steps


def test_compare_errors_name_the_problem(tmp_path):
    from cpt.compare import compare
    from cpt.errors import CptError

    with pytest.raises(CptError, match="not a cpt run directory"):
        compare([tmp_path], tmp_path / "out")


def test_browser_check_skips_without_chromium(runs, tmp_path):
    from cpt.compare import compare

    page = compare(list(runs), tmp_path / "cmp")
    script = Path(__file__).resolve().parents[1] / "scripts" / "check_compare_html.py"
    proc = subprocess.run([sys.executable, str(script), str(page), "--chromium", str(tmp_path / "no-browser")],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0 and proc.stdout.startswith("SKIP: Chromium not installed")


@pytest.mark.skipif(not Path("/usr/bin/chromium").exists(),
                    reason="optional: needs Debian's chromium (apt-get install chromium), not installed by CI")
def test_page_renders_in_headless_chromium(runs, tmp_path):
    from cpt.compare import compare

    page = compare(list(runs), tmp_path / "cmp")
    script = Path(__file__).resolve().parents[1] / "scripts" / "check_compare_html.py"
    proc = subprocess.run([sys.executable, str(script), str(page)], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert proc.stdout.startswith("OK: ") and "images decoded" in proc.stdout


def test_a_run_started_from_a_run_among_those_compared_is_drawn_after_it(runs, tmp_path):
    """Lineage: run-c starts (counter at 0) from run-b's checkpoint at token 2000, run-d from run-b's
    final/: they are drawn from 2000 and 3000 on; a run that continued the counter is left as it is."""
    from cpt.compare import compare, link_lineage

    ckpt = runs[1] / "checkpoints" / "step-00000002"
    ckpt.mkdir(parents=True)
    from cpt.state import STATE_FILE, Origin, TrainerState
    state = TrainerState(step=2, tokens=2000, stage="b", sampler={}, data_consumed={}, mixture={}, lr=1e-3,
                         elapsed_s=1.0, tags=[], origin=Origin())
    (ckpt / STATE_FILE).write_text(json.dumps(state.to_json()))
    child = [{"step": 0, "tokens": 0, "event": "init", "init/path": str(ckpt)},
             {"step": 0, "tokens": 0, "probe/en/loss": 4.3},
             {"step": 1, "tokens": 500, "train/loss": 4.0, "lr": 1e-3},
             {"step": 1, "tokens": 500, "probe/en/loss": 4.6}]
    c = write_run(tmp_path / "c", "run-c", "cosine", child)
    d = write_run(tmp_path / "d", "run-d", "cosine", [{**child[0], "init/path": str(runs[1] / "final")}, *child[1:]])
    e = write_run(tmp_path / "e", "run-e", "cosine", [{**r, "tokens": r["tokens"] + 2000} for r in child])
    loaded = [load_run(p) for p in (runs[1], c, d, e)]
    link_lineage(loaded)
    assert [(r.name, r.parent, r.offset) for r in loaded] == [
        ("run-b", None, 0), ("run-c", "run-b", 2000), ("run-d", "run-b", 3000), ("run-e", None, 0)]
    assert loaded[1].series("probe/en/loss") == ([2000, 2500], [4.3, 4.6])
    page = compare([runs[1], c], tmp_path / "cmp").read_text()
    assert "500 (stopped: no final/) (after run-b at 2,000)" in page
    assert load_run(c).series("probe/en/loss")[0] == [0, 500]  # alone, as logged
