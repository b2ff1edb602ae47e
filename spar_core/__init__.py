"""spar_core: the SPAR method in pure single-device PyTorch (no storage, no distribution, no tracking).

Public API: :func:`build_backbone` (dense features at any resolution), :func:`sliding_window_features` (the
teacher), :func:`distill_loss`, :func:`trainable_parameters`, open-vocabulary segmentation
(:func:`parse_classes`, :func:`build_classifier`, :func:`predict`) and metrics (:class:`IoUAccumulator`,
:func:`feature_fidelity`).
"""

from spar_core.backbones import Backbone, BackboneError, build_backbone, list_backbones
from spar_core.distill import distill_loss, trainable_parameters
from spar_core.metrics import IoUAccumulator, feature_fidelity
from spar_core.segment import ClassListError, TextClassifier, build_classifier, parse_classes, predict
from spar_core.sliding import fine_factor, num_windows, sliding_window_features, window_starts

__all__ = [
    "Backbone",
    "BackboneError",
    "ClassListError",
    "IoUAccumulator",
    "TextClassifier",
    "build_backbone",
    "build_classifier",
    "distill_loss",
    "feature_fidelity",
    "fine_factor",
    "list_backbones",
    "num_windows",
    "parse_classes",
    "predict",
    "sliding_window_features",
    "trainable_parameters",
    "window_starts",
]
