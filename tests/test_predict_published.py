"""`cpt predict` on published curves: the multi-power law paper's own 25M runs (Luo et al. 2025; MIT, see
tests/data/published_curves/), read as a user reads them, fitted on the paper's fit set and scored on two of
its held-out runs as the paper scores them, against the errors the paper's repository reports for itself.

The full measurement (all sizes, all six held-out runs, the exact schedules) is
`python scripts/predict_experiment.py published --repo PATH`, recorded in docs/prediction.md."""

from pathlib import Path

import numpy as np
import pytest

from cpt.predict import fit
from cpt.predict.evaluate import compare
from cpt.predict.files import file_curve

DATA = Path(__file__).parent / "data" / "published_curves"
FIT = ("cosine_24000", "constant_24000", "wsdcon_9")  # the source's TRAIN_SET (src/config.py)
# The source's own errors of its fit on these held-out runs (its logs/25.log: prede, worste)
SOURCE = {"wsd_20000_24000": (0.000998797970943345, 0.0029792601756465724),
          "wsdcon_3": (0.0012851551383490619, 0.00641766790558688)}
TARGET = 1.2


def curve(name: str):
    # the loss is measured after its step's update: the source's S1 includes the logged step's LR
    return file_curve(f"{name}={DATA / f'25M_{name}.csv'},loss_at=after")[0]


def test_compare_gives_the_worst_relative_error_beside_the_mean():
    real = np.array([np.nan, 4.0, 2.0, 1.0])
    e = compare(np.array([9.0, 4.4, 2.0, 0.9]), real, start=1, window=1, final=1)
    assert e["mare"] == pytest.approx((0.1 + 0.0 + 0.1) / 3) and e["worst"] == pytest.approx(0.1)


def test_multipower_on_the_papers_own_curves_is_within_its_reported_mean_error():
    """PredE (mean relative error over the logged steps) within 1.2x of the source's on both held-out runs.
    Read as they come (the LR rebuilt linearly between 128-step records), the largest error per run misses
    that target (docs/prediction.md, *On published curves*); it is held to the measured 1.7x here, so that
    a regression shows."""
    f = fit([curve(n) for n in FIT], "multipower", bootstrap=0)
    for name, (prede, worste) in SOURCE.items():
        real = curve(name)
        e = compare(f.curve(real), real.losses, real.peak, window=1, final=1)
        assert e["mare"] <= TARGET * prede, (name, e["mare"], prede)
        assert e["worst"] <= 1.7 * worste, (name, e["worst"], worste)


def test_a_step_change_between_sparse_records_is_noted():
    """The two-stage run drops its LR at step 8000, between records 7936 and 8000: rebuilt linearly, the drop
    starts 63 steps early (the largest error of such runs read as they come); the reading says so."""
    _, how = file_curve(f"w={DATA / '25M_wsdcon_3.csv'}")
    assert "changes by 90% of its peak between records 64 steps apart (steps 7936-8000)" in how
    assert "step change starts early" in how and "LR of every step" in how
    assert "note" not in file_curve(f"c={DATA / '25M_cosine_24000.csv'}")[1]  # 128 steps of a cosine: < 1%
