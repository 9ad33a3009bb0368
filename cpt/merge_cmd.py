"""`cpt merge`: the verb over cpt.merge (averages of checkpoints) and cpt.merge_tasks (interpolation toward a
base model; task arithmetic, TIES, DARE), with each model written probed on held-out sets when asked.

    cpt merge CKPT... --out DIR [--weights SPEC]                               average (uniform, ema, wsm)
    cpt merge FINAL --toward BASE --weight 0.25,0.5,0.75 --out DIR             DIR/0.25/, DIR/0.5/, DIR/0.75/
    cpt merge --task-arithmetic --base BASE --donor CPT:1 --donor INSTRUCT:1 --out DIR
    cpt merge --ties --density 0.2 ... | --dare --drop 0.9 --seed 0 ...

``--sets NAME=PREPARED_DIR ...`` or ``--probe RUN_DIR|RECIPE`` (the run's or recipe's ``probes.sets`` and
``probes.max_sequences``) probe every model involved with :func:`cpt.probe_cmd.run_probe` (the held-out loss
of ``cpt probe``, so numbers agree with it): for ``--toward`` the base, each weight and the final model, a
frontier of forgetting against adaptation; otherwise the inputs and the merged model. A table is printed
and ``probe.json`` written into ``--out``.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from cpt.errors import CptError


def add_arguments(m: argparse.ArgumentParser, dtypes: tuple[str, ...]) -> None:
    m.add_argument("checkpoints", nargs="*", metavar="CKPT",
                   help="cpt checkpoints, HF model dirs, or run dirs (their checkpoints), OLDEST FIRST: ema and wsm "
                        "weigh by this order; with --toward: the one CPT result to interpolate")
    m.add_argument("--out", required=True, type=Path, metavar="DIR",
                   help="the HF model dir to write (+ merge.json); with --toward the folder of one dir per weight")
    m.add_argument("--weights", default=None, metavar="SPEC",
                   help="uniform (default) | w1,w2,... (one per checkpoint, normalised to sum 1) | ema:DECAY "
                        "(newest 1-DECAY, k older DECAY^k(1-DECAY), the first the rest) | wsm:SHAPE (WSM: "
                        "emulate a linear, cosine, 1-sqrt or rex decay over the checkpoints)")
    m.add_argument("--last", type=int, default=None, metavar="K",
                   help="merge only the last K (after run dirs are expanded)")
    t = m.add_argument_group("merging back toward the starting model (WiSE-FT)")
    t.add_argument("--toward", type=Path, default=None, metavar="BASE",
                   help="interpolate the one CKPT toward BASE: (1 - a) * BASE + a * CKPT for each --weight a")
    t.add_argument("--weight", default=None, metavar="A[,A...]",
                   help="weights in [0, 1] of the CPT model (1 = it, 0 = BASE); each into DIR/<a>/")
    v = m.add_argument_group("task vectors: BASE + merge(DONOR_i - BASE)")
    how = v.add_mutually_exclusive_group()
    for flag, method in (("--task-arithmetic", "task_arithmetic"), ("--ties", "ties"), ("--dare", "dare")):
        how.add_argument(flag, dest="method", action="store_const", const=method,
                         help={"task_arithmetic": "BASE + sum w_i (DONOR_i - BASE)",
                               "ties": "TIES: trim each delta to --density, elect signs, disjoint mean",
                               "dare": "DARE: drop delta entries with probability --drop, rescale, sum"}[method])
    v.add_argument("--base", type=Path, default=None, help="the model the deltas are taken from")
    v.add_argument("--donor", action="append", default=[], metavar="PATH:W",
                   help="a model and its weight (repeat): e.g. --donor CPT:1 --donor INSTRUCT:1")
    v.add_argument("--density", type=float, default=0.2, help="TIES: share of each delta tensor kept (default 0.2)")
    v.add_argument("--drop", type=float, default=0.9, help="DARE: probability of dropping an entry (default 0.9)")
    v.add_argument("--seed", type=int, default=0, help="DARE: seed of the drops (default 0)")
    v.add_argument("--files-from", type=Path, default=None, metavar="PATH",
                   help="the input whose config, tokenizer and layout the output takes (default the last donor)")
    m.add_argument("--dtype", default="auto", choices=["auto", *dtypes],
                   help="dtype of the output (auto: as the input it takes its files from stores it; for a cpt "
                        "checkpoint its config's dtype, as final/)")
    m.add_argument("--overwrite", action="store_true", help="replace DIR (or DIR/<a>) if it exists")
    p = m.add_argument_group("probing what was written (as cpt probe)")
    p.add_argument("--sets", nargs="+", default=[], metavar="NAME=PREPARED_DIR", help="held-out sets to probe on")
    p.add_argument("--probe", type=Path, default=None, metavar="RUN_DIR|RECIPE",
                   help="probe on that run's (or recipe's) probes.sets, with its probes.max_sequences")
    p.add_argument("--max-sequences", type=int, default=None,
                   help="held-out sequences per set (default: --probe's recipe's, else 64)")


def cmd_merge(ns: argparse.Namespace) -> int:
    dtype = None if ns.dtype == "auto" else ns.dtype
    sets, max_sequences = probe_sets(ns.sets, ns.probe, ns.max_sequences)  # a bad set fails before merging
    if ns.toward is not None:
        models = _toward(ns, dtype)
    elif ns.method is not None:
        models = _task(ns, dtype)
    else:
        models = _average(ns, dtype)
    if sets:
        probe_models(models, sets, max_sequences, ns.out / "probe.json")
    return 0


def _refuse_extra(ns: argparse.Namespace, mode: str, flags: dict[str, bool]) -> None:
    extra = [flag for flag, given in flags.items() if given]
    if extra:
        raise CptError(f"cpt merge {mode}: {', '.join(extra)} do not go with it")


def _average(ns: argparse.Namespace, dtype: str | None) -> list[tuple[str, Path]]:
    from cpt.merge import describe, merge_checkpoints, merge_coefficients, resolve_inputs

    if not ns.checkpoints:
        raise CptError("cpt merge: give the checkpoints to average (CKPT ...), or --toward BASE, or a task-vector "
                       "method (--task-arithmetic, --ties, --dare) with --base and --donor")
    _refuse_extra(ns, "CKPT...", {"--weight (for --toward)": ns.weight is not None, "--base": ns.base is not None,
                                  "--donor": bool(ns.donor), "--files-from": ns.files_from is not None})
    spec = ns.weights or "uniform"
    paths = resolve_inputs(ns.checkpoints, last=ns.last)
    coefficients = merge_coefficients(spec, len(paths))
    print(describe(spec, paths, coefficients))
    out = merge_checkpoints(paths, coefficients, ns.out, method=spec, dtype=dtype, overwrite=ns.overwrite)
    print(f"merged: {out}")
    return [(p.name, p) for p in paths] + [("merged", out)]


def _toward(ns: argparse.Namespace, dtype: str | None) -> list[tuple[str, Path]]:
    from cpt.merge_tasks import interpolate, interpolation_weights

    if len(ns.checkpoints) != 1:
        raise CptError(f"cpt merge --toward BASE: give one CPT model to interpolate (CKPT), got {len(ns.checkpoints)}")
    if ns.weight is None:
        raise CptError("cpt merge --toward BASE: give --weight A[,A...] (the CPT model's weight, in [0, 1])")
    _refuse_extra(ns, "--toward", {"--weights": ns.weights is not None, "--last": ns.last is not None,
                                   "--base/--donor": ns.base is not None or bool(ns.donor),
                                   "--files-from": ns.files_from is not None})
    final = Path(ns.checkpoints[0])
    weights = interpolation_weights(ns.weight)
    outs = interpolate(final, ns.toward, weights, ns.out, dtype=dtype, overwrite=ns.overwrite)
    for a, out in zip(weights, outs, strict=True):
        print(f"merged: {out}  = {1 - a:g} * {ns.toward} + {a:g} * {final}")
    models = [] if 0 in weights else [("0 (base)", ns.toward)]
    models += [(f"{a:g}", out) for a, out in sorted(zip(weights, outs, strict=True))]
    return models + ([] if 1 in weights else [("1 (final)", final)])


def parse_donors(values: list[str]) -> tuple[list[Path], list[float]]:
    """``["dir:1.0", ...]`` -> ([dir, ...], [1.0, ...]): the weight after the last colon, required."""
    paths, weights = [], []
    for v in values:
        path, sep, w = v.rpartition(":")
        try:
            weight = float(w)
        except ValueError:
            weight = None
        if not sep or not path or weight is None:
            raise CptError(f"--donor {v!r}: expected PATH:WEIGHT (e.g. --donor runs/de/final:1.0)")
        paths.append(Path(path))
        weights.append(weight)
    return paths, weights


def _task(ns: argparse.Namespace, dtype: str | None) -> list[tuple[str, Path]]:
    from cpt.merge_tasks import merge_task_vectors

    flag = "--" + ns.method.replace("_", "-")
    if ns.base is None or not ns.donor:
        raise CptError(f"cpt merge {flag}: give --base BASE and --donor PATH:WEIGHT (one or more)")
    _refuse_extra(ns, flag, {"CKPT (use --donor)": bool(ns.checkpoints), "--weights": ns.weights is not None,
                             "--last": ns.last is not None, "--weight": ns.weight is not None})
    donors, weights = parse_donors(ns.donor)
    out = merge_task_vectors(ns.base, donors, weights, ns.out, method=ns.method, density=ns.density, drop=ns.drop,
                             seed=ns.seed, files_from=ns.files_from, dtype=dtype, overwrite=ns.overwrite)
    terms = " ".join(f"{'+' if w >= 0 else '-'} {abs(w):g} * ({d} - base)" for d, w in zip(donors, weights, strict=True))
    print(f"merged ({ns.method}): {out}  = {ns.base} {terms}")
    return [("base", ns.base)] + [(f"donor {i + 1}", d) for i, d in enumerate(donors)] + [("merged", out)]


# ---------------------------------------------------------------------------------------------- probing


def probe_sets(sets: list[str], probe: Path | None, max_sequences: int | None) -> tuple[dict[str, str], int]:
    """The held-out sets to probe on (``--sets``, and ``--probe``'s recipe's ``probes.sets``) and how many
    sequences of each (``--max-sequences``, else the recipe's, else 64)."""
    from cpt.probe_cmd import parse_named

    named = parse_named(sets, "--sets")
    if probe is not None:
        from cpt.recipe import load_recipe

        recipe_file = probe / "recipe.yaml" if probe.is_dir() else probe
        if not recipe_file.is_file():
            raise CptError(f"--probe {probe}: neither a run dir with a recipe.yaml nor a recipe file")
        probes = load_recipe(recipe_file).probes
        if not probes.sets:
            raise CptError(f"--probe {probe}: its recipe has no probes.sets")
        named = {**probes.sets, **named}
        max_sequences = max_sequences or probes.max_sequences
    for name, path in named.items():
        if not Path(path).is_dir():
            raise CptError(f"probe set {name}: {path} is not a prepared dir")
    return named, max_sequences or 64


def probe_models(models: list[tuple[str, Path]], sets: dict[str, str], max_sequences: int, out: Path) -> Path:
    """``cpt probe`` of each (label, model dir) on ``sets``: a table printed, the results written to ``out``."""
    from cpt.probe_cmd import run_probe, write_result

    rows: list[dict[str, Any]] = []
    for label, path in models:
        result = run_probe(path, sets, {}, max_sequences=max_sequences)
        rows.append({"label": label, "model": str(path), "sets": result["sets"]})
    names = list(sets)
    print(f"{'model':<12} " + " ".join(f"{n + ' loss':>12}" for n in names) + "  path")
    for r in rows:
        print(f"{r['label']:<12} " + " ".join(f"{r['sets'][n]['loss']:>12.4f}" for n in names) + f"  {r['model']}")
    written = write_result({"sets": sets, "max_sequences": max_sequences, "models": rows}, out)
    print(f"probes: {written}")
    return written
