"""The draft/target pair and its samples: what extraction, training and evaluation all read.

This room sits below every pipeline stage (docs/design.md §3): `load_pair` opens the models a
`conf/models/*` config names, and a `SampleSource` (`conf/source/*`, chosen by `_target_`)
turns mini-world scenes or DSEC clips into `PairSample`s for both models.
"""

from cross_modal_sd.pair.models import PairModels, load_pair
from cross_modal_sd.pair.samples import PairSample
from cross_modal_sd.pair.sources import DsecSource, MiniSource, SampleSource, make_source

__all__ = [
    "DsecSource",
    "MiniSource",
    "PairModels",
    "PairSample",
    "SampleSource",
    "load_pair",
    "make_source",
]
