"""`cpt compare` on two hand-written run dirs: PNGs per panel, one self-contained HTML page, and table
numbers worked out by hand (computed forgetting for a run without tracked keys, logged ones otherwise)."""

from __future__ import annotations

import base64
import json
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


def test_summaries_by_hand(runs):
    a, b = (summarize(load_run(r)) for r in runs)
    assert a["forgetting"] == {"en": pytest.approx({"final": 0.25, "worst": 0.5, "worst_tokens": 2048})}
    assert a["adaptation"] == {"de": pytest.approx(6.0 - 4.9)}
    assert (a["final_train_loss"], a["tokens"], a["wall_s"], a["schedule"]) == (5.5, 3072, 4.5, "cosine")
    assert b["forgetting"] == {"en": pytest.approx({"final": 0.1, "worst": 0.3, "worst_tokens": 2000})}
    assert b["adaptation"] == {"code": 1.5}
    assert (b["final_train_loss"], b["tokens"], b["wall_s"], b["schedule"]) == (3.5, 3000, 3725.0, "wsd")
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
    # columns: run, schedule, tokens, wall, train loss, en final, en worst (at), de adaptation, code adaptation
    assert cells["run-a"] == ["run-a", "cosine", "3,072", "4.5 s", "5.5000", "0.2500", "0.5000 (2,048)",
                              "1.1000", ""]
    assert cells["run-b"] == ["run-b", "wsd", "3,000 (stopped: no final/)", "1:02:05", "3.5000", "0.1000",
                              "0.3000 (2,000)", "", "1.5000"]
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
    page = compare([a], tmp_path / "cmp", metric="bpb")
    assert sorted(p.name for p in page.parent.glob("probe_*.png")) == ["probe_en_bpb.png"]
    assert "bits per byte" in page.read_text()


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
