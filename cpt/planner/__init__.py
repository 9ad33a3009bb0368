"""`cpt plan`: the replay share and max LR that keep the old domain within a forgetting budget while
learning the new data best, from a few short pilot runs.

``law`` holds the two-domain law (one form for both domains: a distribution-shift term in the stage's LR
area whose amplitude is linear in the replay share and a power of the peak LR, and `cpt predict`'s annealing
term in proportion to the domain's share of the batch) and its fit with
bootstrap intervals; ``design`` the pilot design, the candidates' predictions, the pick and the checks
that say when not to trust it; ``report`` plan.md and frontier.png; ``verb`` is `cpt plan`.
"""

from cpt.planner.design import PilotSpec, Prediction, design_pilots, pick, predict, predict_all
from cpt.planner.law import NAMES, DomainFit, Pilot, Schedule, fit_domain, shift

__all__ = ["NAMES", "DomainFit", "Pilot", "PilotSpec", "Prediction", "Schedule", "design_pilots", "fit_domain",
           "pick", "predict", "predict_all", "shift"]
