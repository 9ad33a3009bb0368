"""The plain install: every import the package makes is a declared dependency, every verb runs, and
DeepSpeed is needed only by recipes that set train.deepspeed.

"Not installed" is simulated in a subprocess with ``sys.modules["deepspeed"] = None``: ``import
deepspeed`` then raises ImportError and ``importlib.util.find_spec("deepspeed")`` (what accelerate and
cpt ask) answers None, exactly as on a machine without the package.
"""

from __future__ import annotations

import ast
import json
import os
import re
import subprocess
import sys
import textwrap
from importlib import metadata
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
TPS = 1024


def _normalise(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _declared() -> tuple[set[str], dict[str, set[str]]]:
    tomllib = pytest.importorskip("tomllib")  # Python >= 3.11
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    name = re.compile(r"^[A-Za-z0-9_.-]+")
    required = {_normalise(name.match(d).group()) for d in project["dependencies"]}
    extras = {k: {_normalise(name.match(d).group()) for d in v} for k, v in project["optional-dependencies"].items()}
    return required, extras


def _imported_top_level(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(), filename=str(path))
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module.split(".")[0])
    return names


def test_every_third_party_import_is_a_declared_dependency():
    required, extras = _declared()
    dists = metadata.packages_distributions()  # import name -> distributions that provide it
    undeclared = {}
    for path in sorted((ROOT / "cpt").rglob("*.py")):
        for mod in _imported_top_level(path) - set(sys.stdlib_module_names) - {"cpt", "__future__"}:
            provided_by = {_normalise(d) for d in dists.get(mod, [])}
            if not provided_by:
                undeclared.setdefault(mod, []).append(f"{path.relative_to(ROOT)} (not installed here)")
            elif not provided_by & (required | extras["deepspeed"] | extras["eval"] | extras["gguf"]):  # optional, lazily
                undeclared.setdefault(mod, []).append(str(path.relative_to(ROOT)))
    assert not undeclared, f"imported by cpt but not in pyproject's dependencies: {undeclared}"
    assert "scipy" in required and "deepspeed" not in required and "deepspeed" in extras["deepspeed"]
    assert "lm-eval" not in required and "lm-eval" in extras["eval"]


def run_without_deepspeed(code: str, timeout: int = 300) -> subprocess.CompletedProcess:
    """Run ``code`` in a fresh interpreter where DeepSpeed cannot be imported; fail if anything tried."""
    prologue = "import sys\nsys.modules['deepspeed'] = None  # as if not installed\n"
    epilogue = textwrap.dedent("""
        leaked = sorted(m for m in sys.modules if m.startswith("deepspeed") and sys.modules[m] is not None)
        assert sys.modules["deepspeed"] is None and not leaked, leaked
        print("NO-DEEPSPEED-OK")
    """)
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    out = subprocess.run([sys.executable, "-c", prologue + textwrap.dedent(code) + epilogue], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=timeout)
    assert out.returncode == 0 and "NO-DEEPSPEED-OK" in out.stdout, out.stdout[-2000:] + out.stderr[-3000:]
    return out


def test_every_module_imports_and_every_verb_answers_help_without_deepspeed():
    out = run_without_deepspeed("""
        import contextlib, importlib, io, pkgutil
        import cpt
        from cpt.cli import build_parser, main

        modules = [m.name for m in pkgutil.walk_packages(cpt.__path__, "cpt.")]
        for name in modules:
            importlib.import_module(name)
        sub = next(a for a in build_parser()._actions if a.dest == "verb")
        verbs = [[v] for v in sub.choices] + [["tokenizer", "train"], ["tokenizer", "extend"]]
        for verb in verbs:
            buf = io.StringIO()
            with contextlib.redirect_stdout(buf):
                try:
                    main([*verb, "--help"])
                except SystemExit as e:
                    assert e.code == 0, (verb, e.code)
            assert buf.getvalue().startswith("usage: cpt " + " ".join(verb)), buf.getvalue()[:200]
        print("modules", len(modules), "verbs", " ".join("/".join(v) for v in verbs))
    """)
    counts = re.search(r"modules (\d+) verbs (.*)", out.stdout)
    assert int(counts.group(1)) >= 20
    assert set(counts.group(2).split()) >= {"train", "schedule", "prepare", "probe", "compare", "predict", "plan",
                                            "tokenizer/train", "tokenizer/extend", "merge"}


def test_train_deepspeed_without_the_package_is_one_clear_line(make_recipe, tmp_path):
    r = make_recipe("ds", train__deepspeed=str(ROOT / "recipes/deepspeed/zero2.json"))
    path = tmp_path / "ds.yaml"
    path.write_text(r.to_yaml())
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    code = ("import sys; sys.modules['deepspeed'] = None; from cpt.cli import main; "
            f"sys.exit(main(['train', {str(path)!r}]))")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 2
    assert out.stderr.strip() == ('cpt: error: train.deepspeed needs the deepspeed package: '
                                  'pip install -e ".[deepspeed]"')


def test_branch_wsd_s_and_optimizer_init_work_without_deepspeed(make_recipe, tmp_path):
    """The README's plain install: a WSD run, a decay branch from its stable phase (weights, optimizer and
    counter loaded), then WSD-S from the decayed branch: every stage finishes and exports."""
    wsd = {"kind": "wsd", "max_lr": 2e-3, "min_lr": 2e-4, "warmup": 0.125, "decay": {"length": 0.25}}
    main = make_recipe("wsd-main", schedule=wsd, train__tokens=8 * TPS, checkpoint__every=4 * TPS)
    main_path = tmp_path / "main.yaml"
    main_path.write_text(main.to_yaml())
    branch_dir = main.run.output_dir + "-decay-at-4"
    wsd_s = make_recipe("wsd-s", model__preset=None, model__config={}, schedule=wsd, train__tokens=4 * TPS,
                        init_from={"path": branch_dir,
                                   "load": {"weights": True, "optimizer": True, "schedule_state": True}})
    wsd_s_path = tmp_path / "wsd-s.yaml"
    wsd_s_path.write_text(wsd_s.to_yaml())
    ckpt = main.run.output_dir + "/checkpoints/step-00000004"
    run_without_deepspeed(f"""
        from cpt.cli import main
        assert main(["train", {str(main_path)!r}]) == 0
        assert main(["train", {str(main_path)!r}, "--branch-from", {ckpt!r}, "--decay", "2 steps"]) == 0
        assert main(["train", {str(wsd_s_path)!r}]) == 0
    """)
    from cpt.tracking import read_metrics

    branch = [r for r in read_metrics(Path(branch_dir) / "metrics.jsonl") if "train/loss" in r]
    assert [r["step"] for r in branch] == [5, 6] and branch[0]["lr"] > branch[1]["lr"] > 2e-4  # decaying
    init = next(r for r in read_metrics(Path(branch_dir) / "metrics.jsonl") if r.get("event") == "init")
    assert "optimizer" in init["init/loaded"]
    wsd_s_records = read_metrics(Path(wsd_s.run.output_dir) / "metrics.jsonl")
    init = next(r for r in wsd_s_records if r.get("event") == "init")
    assert {"weights", "optimizer"} <= set(init["init/loaded"])
    steps = [r["step"] for r in wsd_s_records if "train/loss" in r]
    assert steps[0] == 7 and len(steps) >= 1  # the counter goes on from the branch's end
    for run_dir in (main.run.output_dir, branch_dir, wsd_s.run.output_dir):
        assert (Path(run_dir) / "final" / "model.safetensors").is_file()
    assert json.loads((Path(branch_dir) / "final" / "config.json").read_text())["model_type"] == "llama"


def test_ci_runs_the_readme_test_command_word_for_word_in_a_fresh_venv():
    blocks = re.findall(r"```bash\n(.*?)```", (ROOT / "README.md").read_text(), re.S)
    commands = [line for b in blocks for line in b.splitlines() if line and not line.startswith("#")]
    test_command = next(c for c in commands if "pytest" in c)
    assert test_command.startswith("python3 -m pip install torch==2.13.0 && ")  # torch pinned, first
    # the ZeRO and lm-eval tests run, not skip
    assert set(re.search(r'-e "\.\[([\w,]+)\]"', test_command).group(1).split(",")) >= {"dev", "deepspeed", "eval"}
    ci = (ROOT / ".ci/run").read_text()
    assert test_command in ci.splitlines()
    venv = ci.index('python3 -m venv "$venv"')
    assert ci.index("mktemp -d") < venv < ci.index('. "$venv/bin/activate"') < ci.index(test_command)


def test_nothing_outside_the_repository_is_read_by_the_tests_or_the_package():
    """CI runs with the project's shared/ folder beside the clone, a user's clone has none: a reference to
    it would pass CI and fail on a fresh machine, so it is refused here."""
    outside = re.compile(r"""["'/]""" + "sha" + "red" + r"""["'/]""")
    hits = [f"{p.relative_to(ROOT)}:{i}" for p in [*(ROOT / "tests").glob("*.py"), *(ROOT / "cpt").rglob("*.py")]
            for i, line in enumerate(p.read_text().splitlines(), 1) if outside.search(line)]
    assert not hits, hits
