"""The speedup model: end-to-end SD time predicted from component costs and acceptance.

* `costs`: `CostProfile` (what each step costs) and profile files;
* `acceptance`: `Acceptance` (per-sample teacher-forced match and confidence sequences);
* `model`: `simulate` / `predict` (the SD loop replayed over acceptance, priced by costs);
* `measure`: the one cost-measurement harness (`measure_profile`) and its command line;
* `validation`: predicted against measured speedups, with the measured intervals;
* `project`: real-scale projections and levers.
"""

from cross_modal_sd.speedup.acceptance import Acceptance
from cross_modal_sd.speedup.costs import (
    CostProfile,
    ProfileError,
    fit_line,
    load_profile,
    mean_profile,
    save_profile,
    shipped_profiles,
)
from cross_modal_sd.speedup.model import QUANTITIES, predict, simulate

__all__ = [
    "QUANTITIES",
    "Acceptance",
    "CostProfile",
    "ProfileError",
    "fit_line",
    "load_profile",
    "mean_profile",
    "predict",
    "save_profile",
    "shipped_profiles",
    "simulate",
]
