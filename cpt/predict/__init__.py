"""Predict loss curves across LR schedules from one or two runs, and search for a better schedule.

``laws`` holds the two laws and their exact conventions; ``curves`` reads runs and recipes into LR/loss
curves; ``fit`` fits a law with bootstrap intervals; ``evaluate`` scores a prediction against a run;
``search`` ranks schedules of a family; ``report`` writes the tables and the plot; ``verb`` is `cpt predict`.
"""

from cpt.predict.curves import Curve, recipe_curve, recipe_lrs, run_curve
from cpt.predict.evaluate import closest_run, compare, final_points, smooth
from cpt.predict.fit import Fit, check_identifiable, fit
from cpt.predict.laws import LAMBDA, LAWS, PARAMS, areas, law_curve, law_jacobian
from cpt.predict.report import plot_predictions, render_predictions, render_report
from cpt.predict.search import FAMILIES, SearchResult, family_candidates, search
from cpt.predict.verb import run_predict

__all__ = [
    "FAMILIES", "LAMBDA", "LAWS", "PARAMS", "Curve", "Fit", "SearchResult", "areas", "check_identifiable",
    "closest_run", "compare", "family_candidates", "final_points", "fit", "law_curve", "law_jacobian",
    "plot_predictions", "recipe_curve", "recipe_lrs", "render_predictions", "render_report", "run_curve",
    "run_predict", "search", "smooth",
]
