"""`cpt compare`: plots and a summary table from the ``metrics.jsonl`` of several runs (no W&B needed).

One PNG per panel (LR, train loss, each probe domain's loss; all against tokens, runs overlaid, stage
boundaries as vertical lines) and one self-contained ``index.html`` (images inlined as data URIs, no
external assets: it can be mailed or attached as a CI artifact) with a row per run: the final train loss
smoothed (the EMA the train-loss panel draws, at the last step), per probe set its final loss and bits per
byte (where logged), final and worst forgetting per old domain, final adaptation per new domain, tokens,
wall time and the schedule kind.

The LR panel draws each step's LR at the step's *first* token, where the schedule that gave it is
evaluated and where `cpt schedule` draws it (:meth:`Run.lr_curve`, cpt.schedule_plot.schedule_curve); the other
panels draw a step's record at the tokens after the step, as logged.

Forgetting and adaptation come from the ``probe/<d>/forgetting``, ``max_forgetting`` and
``adaptation`` keys the trainer writes when it tracks them; for runs without them they are computed
from ``probe/<d>/loss`` against the run's first probe (its baseline). A domain is new when the last
record that classifies it says so (``adaptation``), or, without such keys, when the recipe lists it
under ``probes.new_domains``; every other domain is old.
"""

from __future__ import annotations

import base64
import html
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from cpt.errors import CptError
from cpt.tracking import read_metrics


@dataclass
class Run:
    path: Path
    name: str
    records: list[dict[str, Any]]
    recipe: dict[str, Any] = field(default_factory=dict)
    offset: int = 0  # tokens added on the x-axis: the parent run's tokens where this one started (lineage)
    parent: str | None = None  # the name of that parent run

    def series(self, key: str) -> tuple[list[int], list[float]]:
        """(tokens, values) of every record that has a finite-or-nan number under ``key``; tokens shifted
        by :attr:`offset`."""
        xs, ys = [], []
        for r in self.records:
            v = _num(r.get(key))
            if v is not None:
                xs.append(r["tokens"] + self.offset)
                ys.append(v)
        return xs, ys

    def lr_curve(self) -> tuple[list[float], list[float]]:
        """(tokens, lr) of every step that logged its LR, each at the token the step *starts* at, shifted by
        :attr:`offset`: where `cpt schedule` draws the same LR (cpt.schedule_plot.schedule_curve).

        The trainer sets a step's LR from the schedule at the tokens *before* the step and logs it on the
        step's record, stamped with the tokens *after* it; the schedule is a function of the former, so
        drawing each step's LR there puts the logged points on the schedule's own curve, puts a stage's first
        step (a re-warm from 0) on the stage's boundary line, and shows a warmup from 0 as starting at 0 (the
        first step's LR). The step's start is its record's tokens less the tokens of one step: the difference
        to the previous step's record (over the steps between them); for the first record the recipe's
        ``train.global_batch_tokens``, else the first such difference, else its tokens over its steps."""
        logged = [r for r in self.records if _num(r.get("lr")) is not None and isinstance(r.get("step"), int)]
        per: list[float | None] = [None] * len(logged)
        for i in range(1, len(logged)):
            a, b = logged[i - 1], logged[i]
            if b["step"] > a["step"]:
                per[i] = (b["tokens"] - a["tokens"]) / (b["step"] - a["step"])
        fallback = self._tokens_per_step()
        if fallback is None:  # no recipe: the nearest step measured, else the counter from 0
            fallback = next((p for p in per if p is not None), None)
        xs, ys = [], []
        for r, p in zip(logged, per, strict=True):
            p = p if p is not None else fallback if fallback is not None else r["tokens"] / max(r["step"], 1)
            start = r["tokens"] - p
            xs.append((int(start) if float(start).is_integer() else start) + self.offset)
            ys.append(_num(r["lr"]))
        return xs, ys

    def _tokens_per_step(self) -> int | None:
        """``train.global_batch_tokens`` of the run's recipe.yaml, None where it has none."""
        from cpt.units import parse_count

        value = (self.recipe.get("train") or {}).get("global_batch_tokens")
        try:
            return parse_count(value) if value is not None else None
        except ValueError:
            return None

    def init_path(self) -> Path | None:
        """The checkpoint or model dir this run started from (its ``init`` record), or None."""
        path = next((r.get("init/path") for r in self.records if r.get("event") == "init"), None)
        return Path(path) if path else None

    def stage_boundaries(self) -> list[int]:
        """Tokens at which a stage begins, from where the ``stage`` of the records changes (the first
        stage's start is not a boundary). The boundary is the last token count of the previous stage:
        a train record is stamped with the tokens at the *end* of its step, so the first record of a
        stage may lie one step past its start, the last record of the one before does not."""
        out, current, last_tokens = [], None, 0
        for r in self.records:
            stage = r.get("stage")
            if stage is not None:
                if current is not None and stage != current:
                    out.append(last_tokens)
                current = stage
            last_tokens = r["tokens"] + self.offset
        return out

    def stage_names(self) -> list[str]:
        """The names of the stages that begin at :meth:`stage_boundaries`, in order."""
        out, current = [], None
        for r in self.records:
            stage = r.get("stage")
            if stage is not None:
                if current is not None and stage != current:
                    out.append(str(stage))
                current = stage
        return out

    @property
    def finished(self) -> bool:
        """Whether the run reached its end (its final/ export exists); a stopped run has not."""
        return (self.path / "final").is_dir()

    def stage_starts(self, key: str) -> set[int]:
        """Indices into ``series(key)`` where a new stage begins."""
        out, current, i = set(), None, 0
        for r in self.records:
            if _num(r.get(key)) is None:
                continue
            stage = r.get("stage", current)
            if current is not None and stage != current:
                out.add(i)
            current, i = stage, i + 1
        return out

    def probe_domains(self) -> list[str]:
        seen: dict[str, None] = {}
        for r in self.records:
            for k in r:
                m = _PROBE_LOSS.match(k)
                if m:
                    seen[m.group(1)] = None
        return list(seen)


_PROBE_LOSS = re.compile(r"^probe/([^/]+)/loss$")


def link_lineage(runs: list[Run]) -> None:
    """Draw a run started with init_from after its parent when the parent is among ``runs``: a run whose
    counter restarted at 0 (init_from without schedule_state) gets, as its x offset, the parent's tokens
    at the checkpoint it started from (that checkpoint's trainer_state.json; a parent's final/: its last
    tokens), so pre-training -> CPT reads as one trajectory. A run that continued the counter needs none."""
    by_dir = {r.path.resolve(): r for r in runs}
    for run in runs:
        start = run.init_path()
        first = min((r["tokens"] for r in run.records), default=None)
        if start is None or first != 0:
            continue
        start = start.resolve()
        if start.parent.name == "checkpoints":
            parent = by_dir.get(start.parent.parent)
            tokens = _checkpoint_tokens(start)
        else:  # final/ (or another model dir inside the parent's run dir)
            parent = by_dir.get(start.parent)
            tokens = max((r["tokens"] for r in parent.records), default=None) if parent else None
        if parent is not None and parent is not run and tokens is not None:
            run.offset, run.parent = tokens + parent.offset, parent.name


def _checkpoint_tokens(ckpt: Path) -> int | None:
    """The token counter a cpt checkpoint was saved at (None when it cannot be read)."""
    from cpt.state import read_trainer_state

    try:
        return read_trainer_state(ckpt).tokens
    except CptError:
        return None


def load_run(run_dir: str | Path) -> Run:
    path = Path(run_dir)
    metrics = path / "metrics.jsonl"
    if not metrics.is_file():
        raise CptError(f"{path}: not a cpt run directory (no metrics.jsonl)")
    records = [r for r in read_metrics(metrics) if "tokens" in r]
    recipe: dict[str, Any] = {}
    if (path / "recipe.yaml").is_file():
        try:
            recipe = yaml.safe_load((path / "recipe.yaml").read_text()) or {}
        except yaml.YAMLError as e:
            raise CptError(f"{path / 'recipe.yaml'}: not valid YAML ({e})") from None
    name = (recipe.get("run") or {}).get("name") or path.name
    return Run(path, str(name), records, recipe)


# --------------------------------------------------------------------------------------- the summary


def summarize(run: Run, metric: str = "loss", smoothing: float = 0.9) -> dict[str, Any]:
    """The numbers of a run's table row, forgetting and adaptation in ``metric`` (loss, nats per token,
    or bpb, bits per byte: comparable across tokenizers).

    ``forgetting``: {old domain: {"final", "worst", "worst_tokens"}}; ``adaptation``: {new domain:
    final}; ``probes``: {probe set: {"loss": its last probe's, "bpb": likewise where logged}};
    ``final_train_loss``: the train loss smoothed as the train-loss panel draws it (:func:`ema` with
    ``smoothing``, restarted at stage starts) at the last step, not one step's noisy loss (the raw loss
    where the last one is not finite: a diverged run shows it); ``tokens``, ``wall_s``, ``finished`` and
    ``schedule`` (None where unknown).
    """
    sfx = "" if metric == "loss" else f"_{metric}"
    _, train = run.series("train/loss")
    if train and math.isfinite(train[-1]):
        train = ema(train, smoothing, run.stage_starts("train/loss"))
    _, wall = run.series("time/elapsed_s")
    stages = run.recipe.get("stages") or []
    new_in_recipe = set((stages[-1] if stages else {}).get("new_domains")
                        or (run.recipe.get("probes") or {}).get("new_domains") or [])
    forgetting: dict[str, dict[str, float]] = {}
    adaptation: dict[str, float] = {}
    for d in run.probe_domains():
        if not run.series(f"probe/{d}/{metric}")[0]:
            continue  # no such metric for this set (bpb of a set prepared without byte counts)
        role = None  # from the last record that says which role the domain had (its last stage)
        for r in run.records:
            if f"probe/{d}/forgetting" in r:
                role = "old"
            elif f"probe/{d}/adaptation" in r:
                role = "new"
        if role is None:
            role = "new" if d in new_in_recipe else "old"
        if role == "new":
            _, ys = run.series(f"probe/{d}/adaptation{sfx}")
            if ys:
                adaptation[d] = ys[-1]
            else:
                _, losses = run.series(f"probe/{d}/{metric}")
                adaptation[d] = losses[0] - losses[-1]
            continue
        fk, mk, tk = (f"probe/{d}/forgetting{sfx}", f"probe/{d}/max_forgetting{sfx}",
                      f"probe/{d}/max_forgetting_tokens{sfx}")
        logged = [r for r in run.records if _num(r.get(fk)) is not None]
        if logged:  # tracked by the trainer: per-stage baselines, running maximum and where it was
            worst = [_num(r.get(mk, r[fk])) for r in logged]
            i = _argmax(worst)
            forgetting[d] = {"final": _num(logged[-1][fk]), "worst": worst[i],
                             "worst_tokens": int(logged[i].get(tk, logged[i]["tokens"]))}
        else:
            xs, losses = run.series(f"probe/{d}/{metric}")
            deltas = [v - losses[0] for v in losses]
            i = _argmax(deltas)
            forgetting[d] = {"final": deltas[-1], "worst": deltas[i], "worst_tokens": xs[i]}
    return {
        "name": run.name,
        "path": str(run.path),
        "schedule": _schedule_kinds(run.recipe),
        "tokens": max((r["tokens"] for r in run.records), default=None),
        "finished": run.finished,
        "metric": metric,
        "after": (run.parent, run.offset) if run.parent else None,
        "wall_s": wall[-1] if wall else None,
        "final_train_loss": train[-1] if train else None,
        "smoothing": smoothing,
        "probes": {d: {m: ys[-1] for m in UNITS if (ys := run.series(f"probe/{d}/{m}")[1])}
                   for d in run.probe_domains()},
        "forgetting": forgetting,
        "adaptation": adaptation,
    }


def _schedule_kinds(recipe: dict[str, Any]) -> str | None:
    """The run's schedule kind, followed by those of stages with their own: ``wsd; b: cosine``."""
    kinds = [(recipe.get("schedule") or {}).get("kind")]
    kinds += [f"{st.get('name')}: {st['schedule']['kind']}" for st in recipe.get("stages") or []
              if (st.get("schedule") or {}).get("kind")]
    return "; ".join(k for k in kinds if k) or None


def _argmax(values: list[float]) -> int:
    """Index of the largest value, NaN counting as largest (a diverged loss is the worst point)."""
    best = 0
    for i, v in enumerate(values):
        if math.isnan(v):
            return i
        if v > values[best]:
            best = i
    return best


# ------------------------------------------------------------------------------------------ plotting


def ema(values: list[float], beta: float, restart_at: set[int] = frozenset()) -> list[float]:
    """Bias-corrected exponential moving average (as TensorBoard / W&B smooth), restarted at the
    indices in ``restart_at``: smoothing across a stage boundary would blur the very jump at the
    shift that the plot is there to show."""
    out, avg, n = [], 0.0, 0
    for i, v in enumerate(values):
        if i in restart_at:
            avg, n = 0.0, 0
        if math.isnan(v):  # keep the curve going; the raw line shows the NaN as a gap
            out.append(avg / (1 - beta**n) if n else v)
            continue
        avg, n = beta * avg + (1 - beta) * v, n + 1
        out.append(avg / (1 - beta**n))
    return out


UNITS = {"loss": "nats / token", "bpb": "bits / byte"}


def plot_panels(runs: list[Run], out_dir: Path, smoothing: float = 0.9, metric: str = "loss") -> dict[str, Path]:
    """Write one PNG per panel into ``out_dir``; returns {panel title: png path}, in display order. Probe
    panels show ``metric`` (loss or bpb); y-axes carry their units; stage boundaries are labelled with
    the stage that begins there."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import EngFormatter

    domains: dict[str, None] = {}
    for run in runs:  # the sets some run logged the metric for (a set without byte counts has no bpb)
        domains.update(dict.fromkeys(d for d in run.probe_domains() if run.series(f"probe/{d}/{metric}")[0]))
    what = {"loss": "held-out loss", "bpb": "held-out bits per byte"}[metric]
    panels = [("lr", "learning rate (each step's at its first token)", "lr", "learning rate"),
              ("train_loss", "train loss", "train/loss", f"loss ({UNITS['loss']})")]
    panels += [(f"probe_{_slug(d)}" + ("" if metric == "loss" else f"_{metric}"), f"{what}: {d}",
                f"probe/{d}/{metric}", f"{metric} ({UNITS[metric]})") for d in domains]
    # a source's share of the data, where some run's mixture changes over time (data/<name>/share)
    shares = sorted({m.group(1) for run in runs for r in run.records for k in r
                     if (m := re.fullmatch(r"data/(.+)/share", k))})
    if any(len(set(run.series(f"data/{n}/share")[1])) > 1 for run in runs for n in shares):
        panels += [(f"share_{_slug(n)}", f"data share: {n}", f"data/{n}/share", "share of the step's sequences")
                   for n in shares]

    out: dict[str, Path] = {}
    out_dir.mkdir(parents=True, exist_ok=True)
    for stem, title, key, ylabel in panels:
        fig = Figure(figsize=(8, 4.5), dpi=100, layout="constrained")
        FigureCanvasAgg(fig)  # attaches itself to the figure; no pyplot, no global state
        ax = fig.add_subplot()
        for i, run in enumerate(runs):
            color = f"C{i % 10}"
            xs, ys = run.lr_curve() if key == "lr" else run.series(key)
            if not xs:
                continue
            if key == "train/loss":
                ax.plot(xs, ys, color=color, alpha=0.25, linewidth=0.8)
                ax.plot(xs, ema(ys, smoothing, run.stage_starts(key)), color=color, linewidth=1.6, label=run.name)
            elif key.startswith("probe/"):
                ax.plot(xs, ys, color=color, marker="o", markersize=3, linewidth=1.4, label=run.name)
            else:  # the LR and data shares: identical curves would hide each other
                ax.plot(xs, ys, color=color, label=run.name, **overlay_style(i, len(runs)))
            for b, name in zip(run.stage_boundaries(), run.stage_names(), strict=True):
                ax.axvline(b, color=color, linestyle="--", linewidth=0.9, alpha=0.7)
                ax.annotate(name, (b, 1), xycoords=("data", "axes fraction"), xytext=(2, -2),
                            textcoords="offset points", rotation=90, va="top", fontsize=8, color=color)
        ax.set_title(title + (f" (EMA {smoothing:g}; raw faint)" if key == "train/loss" else ""))
        ax.set_xlabel("tokens")
        ax.set_ylabel(ylabel)
        ax.xaxis.set_major_formatter(EngFormatter())
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
        path = out_dir / f"{stem}.png"
        fig.savefig(path)
        out[title] = path
    return out


def overlay_style(i: int, n: int) -> dict[str, Any]:
    """Line style of curve ``i`` of ``n`` overlaid ones that may coincide: the first widest and solid,
    each later one thinner and dashed differently, so every curve stays visible on top of the others."""
    dashes = ["-", "--", "-.", ":"]
    return {"linestyle": dashes[i % len(dashes)], "linewidth": 1.2 + 1.6 * (n - 1 - i) / max(1, n - 1)}


def _slug(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name)


# ------------------------------------------------------------------------------------------- the page


def render_html(summaries: list[dict[str, Any]], pngs: dict[str, Path]) -> str:
    old = list(dict.fromkeys(d for s in summaries for d in s["forgetting"]))
    new = list(dict.fromkeys(d for s in summaries for d in s["adaptation"]))
    metric = summaries[0]["metric"] if summaries else "loss"
    smoothing = summaries[0].get("smoothing", 0.9) if summaries else 0.9
    # per probe set: its final values (loss, bpb where some run logged it), then its deltas
    domains = list(dict.fromkeys([*old, *new, *(d for s in summaries for d in s.get("probes", {}))]))
    shown = {d: [m for m in UNITS if any(m in s.get("probes", {}).get(d, {}) for s in summaries)] for d in domains}
    head = ["run", "schedule", "tokens", "wall time", f"final train loss (EMA {smoothing:g})"]
    for d in domains:
        head += [f"{d} {m}: final" for m in shown[d]]
        head += [f"forgetting {d}: final", f"forgetting {d}: worst (at tokens)"] if d in old else []
        head += [f"adaptation {d}: final"] if d in new else []
    rows = []
    for s in summaries:
        tokens = _fmt_tokens(s["tokens"]) + ("" if s["finished"] else " (stopped: no final/)")
        if s.get("after"):
            tokens += f" (after {s['after'][0]} at {_fmt_tokens(s['after'][1])})"
        cells = [s["name"], s["schedule"] or "?", tokens, _fmt_seconds(s["wall_s"]), _fmt(s["final_train_loss"])]
        for d in domains:
            cells += [_fmt(s.get("probes", {}).get(d, {}).get(m)) for m in shown[d]]
            if d in old:
                f = s["forgetting"].get(d)
                cells += [_fmt(f["final"]), f"{_fmt(f['worst'])} ({_fmt_tokens(f['worst_tokens'])})"] if f else ["", ""]
            if d in new:
                cells += [_fmt(s["adaptation"][d]) if d in s["adaptation"] else ""]
        rows.append("<tr>" + "".join(f"<td title=\"{html.escape(s['path'])}\">{html.escape(c)}</td>"
                                     if j == 0 else f"<td>{html.escape(c)}</td>" for j, c in enumerate(cells))
                    + "</tr>")
    figures = "\n".join(
        f'<figure><img src="data:image/png;base64,{base64.b64encode(p.read_bytes()).decode("ascii")}" '
        f'alt="{html.escape(title)}"></figure>'
        for title, p in pngs.items()
    )
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>cpt compare</title>
<style>
body {{ font-family: system-ui, sans-serif; margin: 2em; }}
table {{ border-collapse: collapse; font-size: 0.9em; }}
th, td {{ border: 1px solid #ccc; padding: 0.3em 0.6em; text-align: right; }}
td:first-child, th:first-child {{ text-align: left; }}
td:not(:first-child):not(:nth-child(3)) {{ white-space: nowrap; }}
figure {{ display: inline-block; margin: 0.5em; }}
img {{ max-width: 100%; }}
</style></head>
<body>
<h1>cpt compare</h1>
<p>Final train loss = the smoothed train-loss line at the last step (bias-corrected EMA, factor
{smoothing:g}, restarted at each stage start: the end of the solid line of the train-loss panel), not
one step's loss. Per probe set: its held-out loss (nats per token) and bits per byte at the last probe;
forgetting = held-out {"loss (nats per token)" if metric == "loss" else "bits per byte"} minus its
stage-start value on an old domain (worst = highest point of the curve); adaptation = the drop on a new
domain. Each step's learning rate is drawn at the step's first token, as <code>cpt schedule</code> draws
it. Dashed vertical lines mark stage boundaries, labelled with the stage that begins there. A run
without final/ stopped before its end.</p>
<table>
<tr>{"".join(f"<th>{html.escape(h)}</th>" for h in head)}</tr>
{chr(10).join(rows)}
</table>
{figures}
</body></html>
"""


def _fmt(v: float | None) -> str:
    return "" if v is None else f"{v:.4f}"


def _fmt_tokens(n: int | None) -> str:
    return "" if n is None else f"{n:,}"


def _fmt_seconds(s: float | None) -> str:
    if s is None:
        return ""
    if s < 60:
        return f"{s:.1f} s"
    h, rest = divmod(round(s), 3600)
    return f"{h}:{rest // 60:02d}:{rest % 60:02d}" if h else f"{rest // 60}:{rest % 60:02d} min"


def compare(run_dirs: list[str | Path], out_dir: str | Path, smoothing: float = 0.9, metric: str = "loss") -> Path:
    """Plots and ``index.html`` for ``run_dirs`` in ``out_dir``; returns the HTML path. ``metric``: what the
    probe panels and the forgetting columns use, loss (nats per token) or bpb (bits per byte)."""
    if not run_dirs:
        raise CptError("cpt compare needs at least one run directory")
    if metric not in UNITS:
        raise CptError(f"--metric {metric}: expected loss or bpb")
    if not 0 <= smoothing < 1:
        raise CptError(f"--smoothing {smoothing}: expected a value in [0, 1)")
    runs = [load_run(p) for p in run_dirs]
    names = [r.name for r in runs]
    for r in runs:  # two runs with one name (same recipe, other dirs) must stay apart in the legend
        if names.count(r.name) > 1:
            r.name = f"{r.name} ({r.path})"
    out = Path(out_dir)
    if metric != "loss" and not any(r.series(f"probe/{d}/{metric}")[0] for r in runs for d in r.probe_domains()):
        raise CptError(f"--metric {metric}: no run logged probe/<set>/{metric} (probe sets prepared before byte "
                       f"counts: re-run cpt prepare)")
    link_lineage(runs)
    pngs = plot_panels(runs, out, smoothing, metric)
    page = out / "index.html"
    page.write_text(render_html([summarize(r, metric, smoothing) for r in runs], pngs), encoding="utf-8")
    return page


def _num(v: Any) -> float | None:
    """A metric value as a float: JSONL stores non-finite numbers as the strings "nan", "inf", "-inf"."""
    if isinstance(v, bool) or v is None:
        return None
    if isinstance(v, (int, float)):
        return float(v)
    if isinstance(v, str) and v.lower() in ("nan", "inf", "-inf", "infinity", "-infinity"):
        return float(v)
    return None
