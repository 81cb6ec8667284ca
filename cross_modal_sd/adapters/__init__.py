"""Adapters L1-L5: map draft decoder hidden states into the target's hidden space.

Levels are configs, not classes: ``conf/adapter/L1.yaml`` ... ``L5.yaml`` select one of the
classes below plus its hyper-parameters (L1-L3 are all :class:`BottleneckAdapter`). ``H1`` /
``H2`` are feature-level draft heads (:class:`FeatureHead`): they read the target's own states,
for the decode phase.
"""

from cross_modal_sd.adapters.base import Adapter
from cross_modal_sd.adapters.bottleneck import BottleneckAdapter, BottleneckBlock
from cross_modal_sd.adapters.eagle import EagleAdapter
from cross_modal_sd.adapters.head import FeatureHead, HeadCache
from cross_modal_sd.adapters.registry import (
    ADAPTER_CLASSES,
    UnknownAdapterError,
    adapter_from_payload,
    adapter_payload,
    build_adapter,
)
from cross_modal_sd.adapters.sequence import CausalTransformerAdapter, CausalTransformerLayer

__all__ = [
    "ADAPTER_CLASSES",
    "Adapter",
    "BottleneckAdapter",
    "BottleneckBlock",
    "CausalTransformerAdapter",
    "CausalTransformerLayer",
    "EagleAdapter",
    "FeatureHead",
    "HeadCache",
    "UnknownAdapterError",
    "adapter_from_payload",
    "adapter_payload",
    "build_adapter",
]
