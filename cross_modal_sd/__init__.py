"""Cross-modal speculative decoding: an event-camera VLM drafts tokens for an RGB-video VLM."""

from pathlib import Path

from omegaconf import OmegaConf


def _mini_cache_dir(root: str, world) -> str:
    """`<root>/<world digest>/cache`: a mini-world cache lives beside the models it came from,
    so a rebuilt world never trains on states of the models it replaced."""
    from cross_modal_sd.world.build import MiniWorldConfig

    config = MiniWorldConfig.from_dict(OmegaConf.to_container(world, resolve=True))
    return str(Path(root) / config.digest() / "cache")


OmegaConf.register_new_resolver("mini_cache_dir", _mini_cache_dir, replace=True)
