"""Fixtures of the core tests."""

from __future__ import annotations

import pytest

from spar_core.backbones import Backbone, build_backbone


@pytest.fixture(scope="session")
def siglip2() -> Backbone:
    """The full-size SigLIP2 B/16-512 tower with seeded random weights (~1.5 GB in float32; built once for the
    backbone and the reference-parity tests, ~5 s each time). Tests that change it (trainable flags) run last."""
    return build_backbone("siglip2-vit-b16-512", seed=0)
