"""Every config of every group composes with its entry point's config, and what it names
instantiates: adapters, sources, loggers, callbacks and CPU trainers for real; targets that need
a GPU, a dataset or a cluster by binding their arguments to the class's signature."""

from __future__ import annotations

import inspect

import pytest
from hydra import compose, initialize_config_dir
from hydra.utils import get_object, instantiate
from omegaconf import OmegaConf

from cross_modal_sd.adapters import build_adapter
from cross_modal_sd.config import CONF_DIR, group_option, group_options
from cross_modal_sd.decoding.budget import Budget
from cross_modal_sd.evaluation.strategies import parse_strategies
from cross_modal_sd.pair import SampleSource, make_source
from cross_modal_sd.utils import instantiate_group
from cross_modal_sd.world.config import MiniWorldConfig

# The entry point whose config holds each group.
GROUPS = {
    "adapter": "train",
    "loss": "train",
    "trainer": "train",
    "logger": "train",
    "callbacks": "train",
    "data": "train",
    "experiment": "train",
    "hparams_search": "train",
    "models": "build",
    "source": "extract",
    "decoding": "evaluate",
    "hydra/launcher": "train",
}
ENTRY_POINTS = ("train", "evaluate", "extract", "build", "measure")
# Required values a user passes on the command line.
FILL = {"source=dsec": ["source.root=DSEC"], "models=eventgpt_videollava": ["models.draft=E"]}


def _options() -> list[tuple[str, str]]:
    return [(group, name) for group in GROUPS for name in group_options(group)]


def test_every_group_option_is_covered():
    on_disk = {p.parent.relative_to(CONF_DIR).as_posix() for p in CONF_DIR.rglob("*.yaml")}
    on_disk.discard(".")  # the entry points themselves
    assert on_disk == set(GROUPS)


def _bind(node: dict) -> None:
    """The node's `_target_` resolves and accepts its keys (no object is built)."""
    target = get_object(node["_target_"])
    kwargs = {k: v for k, v in node.items() if not k.startswith("_")}
    inspect.signature(target).bind_partial(**kwargs)


def _compose(entry: str, overrides: list[str]):
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return compose(entry, overrides=overrides, return_hydra_config=True)


@pytest.mark.parametrize(("group", "name"), _options())
def test_option_composes_and_instantiates(group, name, tmp_path):
    override = f"{group}={name}"
    entry = GROUPS[group]
    out = f"output_dir={tmp_path}" if entry in ("train", "evaluate") else f"+output_dir={tmp_path}"
    overrides = [override, *FILL.get(override, []), out]
    if group == "hparams_search" and name == "optuna":
        pytest.importorskip("hydra_plugins.hydra_optuna_sweeper")
    cfg = _compose(entry, overrides)
    plain = OmegaConf.masked_copy(cfg, [k for k in cfg if k != "hydra"])
    OmegaConf.resolve(plain)  # every interpolation of the job's config resolves
    if group == "adapter":
        if name.startswith("H"):  # feature heads: the target's width both ways, its vocabulary
            node = {**OmegaConf.to_container(cfg.adapter, resolve=True), "vocab_size": 50}
            adapter = build_adapter(node, 48, 48)
            assert adapter.name == name and adapter.kind == "head"
        else:
            adapter = build_adapter(cfg.adapter, 32, 48)
            assert adapter.name == name and (adapter.in_dim, adapter.out_dim) == (32, 48)
    elif group == "source":
        if name == "dsec":
            _bind(OmegaConf.to_container(cfg.source, resolve=True))  # needs a DSEC folder to build
        else:
            assert isinstance(make_source(cfg.source), SampleSource)
    elif group in ("logger", "callbacks"):
        node = cfg.get(group)
        nodes = OmegaConf.to_container(node, resolve=True) if node is not None else {}
        built = instantiate_group(nodes)
        assert set(built) == {k for k, v in nodes.items() if v is not None}
    elif group == "trainer":
        node = OmegaConf.to_container(cfg.trainer, resolve=True)
        if name == "cpu":
            trainer = instantiate(node, logger=False, enable_checkpointing=False)
            assert trainer.max_epochs == cfg.trainer.max_epochs
        else:
            _bind(node)  # GPUs and process groups are not built here
    elif group == "models":
        if name.startswith("mini"):
            world = MiniWorldConfig.from_dict(
                OmegaConf.to_container(cfg.models.world, resolve=True)
            )
            assert world.regime == cfg.models.world.regime
    elif group == "decoding":
        strategies = parse_strategies(cfg.strategies, cfg.decoding, 10, 2)
        phases = {cfg.decoding.phase, "autoregressive", "head"}  # head: the feature-head strategies
        assert {s.sd.decode for s in strategies if s.sd} <= phases
        heads = [s.sd for s in strategies if s.sd and s.sd.decode == "head"]
        assert all(h.policy.decode_gamma == cfg.decoding.head_gamma for h in heads)
    elif group == "hydra/launcher":
        _bind(OmegaConf.to_container(cfg.hydra.launcher))
    elif group == "loss":
        assert group_option("loss", name) is not None


def test_mini_regimes_are_distinct_worlds():
    digests = {}
    for name in ("mini", "mini_p30", "mini_p15"):
        cfg = _compose("build", [f"models={name}"])
        world = MiniWorldConfig.from_dict(OmegaConf.to_container(cfg.models.world, resolve=True))
        digests[world.regime] = world.digest()
    assert set(digests) == {"reference", "p30", "p15"} and len(set(digests.values())) == 3


@pytest.mark.parametrize("entry", ENTRY_POINTS)
def test_entry_points_compose_with_their_defaults(entry, tmp_path):
    overrides = ["ckpt=x.pt"] if entry == "evaluate" else []
    cfg = _compose(
        entry, [*overrides, f"+output_dir={tmp_path}"] if entry == "build" else overrides
    )
    if entry == "evaluate":
        for deployment in cfg.deployments:
            assert Budget(cfg.cores, deployment, cfg.draft_cores).cores == cfg.cores
    if entry in ("extract", "evaluate"):
        assert isinstance(make_source(cfg.source), SampleSource)
