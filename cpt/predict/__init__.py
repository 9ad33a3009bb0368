"""Predict loss curves across LR schedules from any number of runs, and search for a better schedule.

``laws`` holds the two laws and their exact conventions; ``curves`` reads runs and recipes into LR/loss
curves and ``files`` curves logged by other trainers (CSV, JSONL, JSON, a W&B export); ``fit`` fits a law
with bootstrap intervals and ``checks`` says where a fit is degenerate; ``evaluate`` scores a prediction
against a run and the naive baseline; ``search`` ranks schedules of a family; ``report`` writes the tables
and the plot; ``verb`` is `cpt predict`.
"""

from cpt.predict.checks import fit_warnings, held_out_warning
from cpt.predict.curves import Curve, recipe_curve, recipe_lrs, run_curve
from cpt.predict.evaluate import baseline, closest_run, compare, final_points, smooth
from cpt.predict.files import file_curve
from cpt.predict.fit import Fit, check_identifiable, fit, fit_points
from cpt.predict.laws import LAMBDA, LAWS, PARAMS, areas, law_curve, law_jacobian, law_values_jacobian
from cpt.predict.report import plot_predictions, render_predictions, render_report
from cpt.predict.search import FAMILIES, SearchResult, family_candidates, search
from cpt.predict.verb import run_predict

__all__ = [
    "FAMILIES", "LAMBDA", "LAWS", "PARAMS", "Curve", "Fit", "SearchResult", "areas", "baseline", "check_identifiable",
    "closest_run", "compare", "family_candidates", "file_curve", "final_points", "fit", "fit_points", "fit_warnings",
    "held_out_warning", "law_curve", "law_jacobian", "law_values_jacobian", "plot_predictions", "recipe_curve",
    "recipe_lrs", "render_predictions", "render_report", "run_curve", "run_predict", "search", "smooth",
]
