"""Shared pytest fixtures."""

import pytest

from cross_modal_sd.config import register_resolvers

# What the entry points do before Hydra composes: tests compose conf/ themselves.
register_resolvers()

SMALL_WORLD = {
    "train_scenes": 40,
    "val_scenes": 4,
    "test_scenes": 4,
    "max_new_tokens": 24,
    "target_tower": {"hidden": 64, "layers": 2, "heads": 4, "mlp": 256},  # fast to train
    "target_train": {"steps": 40, "batch_size": 8, "lr": 3e-3, "perception_steps": 20},
    "draft_train": {"steps": 40, "batch_size": 8, "lr": 3e-3, "perception_steps": 20},
}


@pytest.fixture(scope="session")
def small_world_cfg(tmp_path_factory):
    """`conf/models/mini.yaml` shrunk for tests: a briefly trained world built once per session.

    Its models are poor (40 steps) but real: built, saved, verified and loaded by the same code
    as the default world, so pipeline tests exercise every path in seconds.
    """
    from omegaconf import OmegaConf

    from cross_modal_sd.world.build import MiniWorldConfig, build_mini_world

    root = tmp_path_factory.mktemp("mini")
    build_mini_world(MiniWorldConfig.from_dict(SMALL_WORLD), root=root, log=lambda *_: None)
    return OmegaConf.create({"kind": "mini", "root": str(root), "world": SMALL_WORLD})
