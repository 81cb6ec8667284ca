"""Build adapters from configs and rebuild them from exported plain-dict payloads.

Only classes registered here can be built from a config: a ``best_model.pt`` is data, and
rebuilding from it must never import an arbitrary dotted path it happens to contain.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from omegaconf import DictConfig, OmegaConf

from cross_modal_sd.adapters.base import Adapter
from cross_modal_sd.adapters.bottleneck import BottleneckAdapter
from cross_modal_sd.adapters.eagle import EagleAdapter
from cross_modal_sd.adapters.head import FeatureHead
from cross_modal_sd.adapters.sequence import CausalTransformerAdapter

ADAPTER_CLASSES: dict[str, type[Adapter]] = {
    f"cross_modal_sd.adapters.{cls.__name__}": cls
    for cls in (BottleneckAdapter, CausalTransformerAdapter, EagleAdapter, FeatureHead)
}


class UnknownAdapterError(ValueError):
    """An adapter level name or ``_target_`` that is not registered."""


def adapter_class(target: str) -> type[Adapter]:
    """Registered class for a ``_target_`` (``cross_modal_sd.adapters.<Class>`` or ``<Class>``).

    Raises:
        UnknownAdapterError: not registered; the message lists the known targets.
    """
    full = target if "." in target else f"cross_modal_sd.adapters.{target}"
    if full not in ADAPTER_CLASSES:
        raise UnknownAdapterError(
            f"unknown adapter _target_ {target!r}; known targets: {', '.join(ADAPTER_CLASSES)}"
        )
    return ADAPTER_CLASSES[full]


def build_adapter(
    cfg: Mapping[str, Any] | DictConfig,
    in_dim: int | None = None,
    out_dim: int | None = None,
) -> Adapter:
    """Build an adapter from a level name, a Hydra node or a stored plain-dict config.

    Args:
        cfg: the ``adapter`` node of a composed Hydra config (for a level by name:
            ``cross_modal_sd.config.group_option("adapter", "L1")``), or an
            :attr:`Adapter.config` dict (which also holds the dims).
        in_dim: draft hidden width; may be omitted when ``cfg`` holds it.
        out_dim: target hidden width; may be omitted when ``cfg`` holds it.

    Returns:
        A freshly initialised adapter.

    Raises:
        UnknownAdapterError: unknown ``_target_``.
        ValueError: ``_target_`` missing, a dim missing, or a dim conflicting with ``cfg``'s.
    """
    if isinstance(cfg, DictConfig):
        cfg = OmegaConf.to_container(cfg, resolve=True)
    kwargs = dict(cfg)
    if "_target_" not in kwargs:
        raise ValueError(
            f"adapter config has no '_target_' (keys: {sorted(kwargs)}); "
            f"known targets: {', '.join(ADAPTER_CLASSES)}"
        )
    cls = adapter_class(kwargs.pop("_target_"))
    for field, given in (("in_dim", in_dim), ("out_dim", out_dim)):
        stored = kwargs.get(field)
        if given is not None and stored is not None and given != stored:
            raise ValueError(
                f"adapter config has {field}={stored} but {field}={given} was requested "
                f"(does the checkpoint match this cache?)"
            )
        if given is None and stored is None:
            raise ValueError(f"adapter config has no {field} and none was passed")
        kwargs[field] = stored if given is None else given
    return cls(**kwargs)


def adapter_payload(adapter: Adapter) -> dict[str, Any]:
    """Pickle-free export: ``{"adapter_config": plain dict, "state_dict": CPU tensors}``.

    The result loads with ``torch.load(..., weights_only=True)``; callers add their own keys
    (metrics, cache digest) next to these two.
    """
    return {
        "adapter_config": adapter.config,
        "state_dict": {k: v.detach().cpu() for k, v in adapter.state_dict().items()},
    }


def adapter_from_payload(payload: Mapping[str, Any]) -> Adapter:
    """Rebuild an adapter (config + weights) from :func:`adapter_payload`'s dict.

    Raises:
        ValueError: a required key is missing, or the weights do not fit the config.
        UnknownAdapterError: the stored ``_target_`` is not registered.
    """
    missing = [key for key in ("adapter_config", "state_dict") if key not in payload]
    if missing:
        raise ValueError(
            f"adapter payload lacks {missing} (has {sorted(payload)}); was it written by "
            f"adapter_payload()?"
        )
    adapter = build_adapter(payload["adapter_config"])
    try:
        adapter.load_state_dict(payload["state_dict"], strict=True)
    except RuntimeError as err:
        raise ValueError(f"adapter payload weights do not match its adapter_config: {err}") from err
    return adapter
