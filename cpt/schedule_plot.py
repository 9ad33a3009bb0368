"""`cpt schedule`'s plot: LR against tokens for one or more schedules, with stage boundaries and mixture
shares. Each step's LR is drawn at its first token, as `cpt compare` draws a run's logged LR
(cpt.compare.Run.lr_curve), so the two coincide point for point."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from cpt.compare import overlay_style
from cpt.schedules import Schedule


def schedule_curve(sched: Schedule, steps: tuple[int, int] | None = None,
                   most: int = 100_000) -> tuple[list[float], list[float]]:
    """(tokens, lr) that `cpt schedule` draws for ``sched``: the schedule is the LR of the step that starts
    at a token, so each step's LR is drawn at its first token, as `cpt compare` draws a run's logged LR
    (:meth:`Run.lr_curve`) and the two coincide point for point. Sampled at 1001 points, at the phase edges
    (sharp corners) and, with ``steps`` = (the first step's first token, tokens per step), at the first
    token of every step (of every k-th where there are more than ``most``)."""
    import numpy as np

    edges = sorted({p.start for p in sched.phases} | {p.end for p in sched.phases})
    xs = np.union1d(np.linspace(0, sched.total_tokens, 1001), edges)
    if steps is not None and steps[1] > 0:
        first, per = steps
        stride = max(1, -(-(sched.total_tokens - first) // per // most))
        xs = np.union1d(xs, np.arange(first, sched.total_tokens, per * stride))
    return xs.tolist(), [sched(x) for x in xs.tolist()]


def plot_schedules(schedules: dict[str, Schedule], path: str | Path, title: str | None = None,
                   stages: dict[str, list[tuple[int, str]]] | None = None,
                   mixtures: dict[str, list[tuple[int, int, Any]]] | None = None,
                   steps: dict[str, tuple[int, int]] | None = None) -> Path:
    """Plot LR against tokens for several schedules on one axis and save a PNG: phase boundaries (end of
    warmup, start of a decay) faint dotted lines, stage starts (``stages``: {label: [(tokens, name)]})
    dashed lines labelled with the stage's name. Each step's LR is at the step's first token
    (:func:`schedule_curve`; ``steps``: {label: (first step's first token, tokens per step)} samples every
    step's). ``mixtures`` ({label: [(stage start, stage end, MixtureSchedule)]}) adds a panel below with
    each source's share of the data against tokens, where some recipe mixes more than one source."""
    # Imported here so that training never pays for matplotlib; a Figure on an Agg canvas (no
    # pyplot) renders headless and leaves the process-wide backend alone.
    import numpy as np
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import EngFormatter, PercentFormatter

    mixed = any(len(m.active()) > 1 or not m.is_constant for parts in (mixtures or {}).values()
                for _, _, m in parts)
    fig = Figure(figsize=(8, 6.5 if mixed else 4.5), layout="constrained")
    FigureCanvasAgg(fig)
    if mixed:
        ax, mx = fig.subplots(2, 1, sharex=True, height_ratios=[2, 1])
    else:
        ax, mx = fig.add_subplot(), None
    for i, (label, sched) in enumerate(schedules.items()):
        color = f"C{i % 10}"
        edges = sorted({p.start for p in sched.phases} | {p.end for p in sched.phases})
        xs, ys = schedule_curve(sched, (steps or {}).get(label))
        # identical curves would hide each other: each later one thinner, in another dash pattern
        ax.plot(xs, ys, color=color, label=label, **overlay_style(i, len(schedules)))
        starts = dict((stages or {}).get(label, []))
        for e in edges:
            if 0 < e < sched.total_tokens and e not in starts:
                ax.axvline(e, color=color, alpha=0.35, linewidth=0.8, linestyle=":")
        for tokens, name in starts.items():
            for a in (ax, mx) if mx is not None else (ax,):
                a.axvline(tokens, color=color, alpha=0.8, linewidth=1.0, linestyle="--")
            ax.annotate(name, (tokens, 1), xycoords=("data", "axes fraction"), xytext=(2, -2),
                        textcoords="offset points", rotation=90, va="top", fontsize=8, color=color)
    if mx is not None:
        _plot_shares(mx, mixtures, np)
        mx.set_ylabel("share of sequences")
        mx.yaxis.set_major_formatter(PercentFormatter(1.0))
        mx.set_ylim(-0.02, 1.02)
        mx.legend(fontsize=8)
    (mx if mx is not None else ax).set_xlabel("tokens")
    ax.xaxis.set_major_formatter(EngFormatter())
    ax.set_ylabel("learning rate")
    ax.set_ylim(bottom=0)
    ax.legend()
    if title:
        ax.set_title(title)
    path = Path(path)
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    return path


def _plot_shares(ax, mixtures: dict[str, list[tuple[int, int, Any]]], np) -> None:
    """Each source's share against tokens, a colour per source and a line style per recipe; jumps drawn
    sharp (the share just before a step point is sampled too)."""
    sources = sorted({k for parts in mixtures.values() for _, _, m in parts for k in m.active()})
    colors = {k: f"C{j % 10}" for j, k in enumerate(sources)}
    for i, (label, parts) in enumerate(mixtures.items()):
        xs, ys = [], {k: [] for k in sources}
        for start, end, m in parts:
            cut = [t for t, _, _ in m.points] + [t - 1 for t, _, _ in m.points if t > 0]
            local = np.union1d(np.linspace(0, end - start, 201), [t for t in cut if 0 <= t <= end - start])
            for t in local:
                shares = m.share_at(float(t))
                xs.append(start + t)
                for k in sources:
                    ys[k].append(shares.get(k, 0.0))
        for k in sources:
            if any(ys[k]):
                name = k if len(mixtures) == 1 else f"{k} ({label})"
                ax.plot(xs, ys[k], color=colors[k], label=name, **overlay_style(i, len(mixtures)))
