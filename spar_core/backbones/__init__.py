"""Backbones: one dense-feature interface, one module per family.

``base`` holds the interface (:class:`Backbone`), its errors, weight files and the family registry; ``openclip``
(CLIP and SigLIP towers, tiny test CLIPs) and ``dinov3txt`` (DINOv3 dino.txt, its modules in ``dinotxt_model``)
each register their names on import, which this package does for both.
"""

from spar_core.backbones import dinov3txt, openclip  # noqa: F401  (each registers its family)
from spar_core.backbones.base import (
    Backbone,
    BackboneError,
    build_backbone,
    check_state_dict,
    list_backbones,
    load_weights_file,
    random_weights_seed,
    state_dict_sha256,
)
from spar_core.backbones.openclip import QUICKGELU_SUFFIX, interpolate_grid_pos, tiny_model_config

__all__ = [
    "Backbone",
    "BackboneError",
    "QUICKGELU_SUFFIX",
    "build_backbone",
    "check_state_dict",
    "interpolate_grid_pos",
    "list_backbones",
    "load_weights_file",
    "random_weights_seed",
    "state_dict_sha256",
    "tiny_model_config",
]
