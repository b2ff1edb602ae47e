"""The distilled student as an MLflow pyfunc model (logged "from code": nothing of it is pickled).

``log_student_model`` logs this file as the model's code and the student checkpoint directory (safetensors
weights, ``backbone.json``, ``config.json``, checksums) as the model's artifacts, with an input/output signature,
the base backbone and the cache lineage as metadata, and registers it under a name. Then::

    model = mlflow.pyfunc.load_model("models:/spar-student/1")
    feats = model.predict(image)                                    # (H, W, 3) uint8 -> (H/p, W/p, D) float32
    labels = model.predict(image, params={"output": "segmentation", "classes": "sky;cat,kitten;grass"})

loads the checkpoint with the project's own loader (:func:`pipeline.student.format.load_student`, checksums verified,
base weights identity checked) and runs the project's own single-pass forward.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import mlflow
import numpy as np
from mlflow.pyfunc import PythonModel

from pipeline.data.resize import resize_linear
from pipeline.eval.model import build_text_classifier, dense_features, label_map, resolve_classes
from pipeline.student.format import load_student, read_backbone_info

__all__ = ["StudentModel", "log_student_model", "student_signature", "CHECKPOINT_ARTIFACT"]

CHECKPOINT_ARTIFACT = "checkpoint"


class StudentModel(PythonModel):
    """pyfunc wrapper: dense features (default) or a segmentation label map of one RGB image."""

    # The input is described by the explicit tensor signature (student_signature), not by type hints: this tells
    # MLflow's PythonModel.__init_subclass__ not to wrap predict for hint-based validation (and not to warn at
    # import that predict has no hints). Signature enforcement of the logged model is unaffected.
    _skip_type_hint_validation = True

    def load_context(self, context: Any) -> None:
        self.bb = load_student(context.artifacts[CHECKPOINT_ARTIFACT], device="cpu")
        self._classifiers: dict[str, Any] = {}

    def _image(self, model_input: Any) -> np.ndarray:
        if isinstance(model_input, dict):  # pyfunc hands a named tensor input over as {"image": array}
            model_input = model_input.get("image", next(iter(model_input.values()), None))
        img = np.asarray(model_input)
        if img.ndim == 4 and img.shape[0] == 1:
            img = img[0]
        if img.ndim != 3 or img.shape[2] != 3:
            raise ValueError(f"expected one RGB image (H, W, 3) uint8, got an array of shape {img.shape}")
        return np.ascontiguousarray(img.astype(np.uint8, copy=False))

    def predict(self, context, model_input, params=None):  # noqa: ANN001 - no hints: MLflow reads them as a schema
        """(H, W, 3) uint8 -> features (H/p, W/p, D) float32, or with ``output=segmentation`` labels (H, W)."""
        params = params or {}
        img = self._image(model_input)
        h, w = img.shape[:2]
        p = self.bb.patch_size
        size = (max(p, h // p * p), max(p, w // p * p))  # the forward needs multiples of the patch size
        x = resize_linear(img, size)
        if str(params.get("output", "features")) == "features":
            return dense_features(self.bb, x, "single")[0].cpu().numpy().astype(np.float32)  # (h/p, w/p, D)
        classes = str(params.get("classes", ""))
        if classes not in self._classifiers:
            self._classifiers[classes] = build_text_classifier(self.bb, resolve_classes(classes))
        scale = float(params.get("logit_scale", 40.0))
        pred = label_map(self.bb, self._classifiers[classes], x, (h, w), logit_scale=scale)  # (H, W)
        return pred.cpu().numpy().astype(np.int32)


def student_signature(dim: int) -> Any:
    """Input: one RGB image (H, W, 3) uint8; output: features (H/p, W/p, D); params: output, classes."""
    from mlflow.models import ModelSignature
    from mlflow.types import ParamSchema, ParamSpec, Schema, TensorSpec

    return ModelSignature(
        inputs=Schema([TensorSpec(np.dtype(np.uint8), (-1, -1, 3), name="image")]),
        outputs=Schema([TensorSpec(np.dtype(np.float32), (-1, -1, dim), name="features")]),
        params=ParamSchema(
            [
                ParamSpec("output", "string", "features"),  # or "segmentation" (then an (H, W) label map)
                ParamSpec("classes", "string", ""),  # segmentation: "a,synonym;b;c"
                ParamSpec("logit_scale", "double", 40.0),
            ]
        ),
    )


def log_student_model(
    run_id: str, student_dir: str | Path, registered_name: str, lineage: dict[str, Any]
) -> Any:
    """Log ``student_dir`` as a pyfunc model of run ``run_id`` and register it as ``registered_name``.

    Returns the ``ModelInfo`` (``registered_model_version`` holds the version). The active tracking URI is used.
    """
    info = read_backbone_info(student_dir)
    dim = int(lineage.get("dim", -1))
    metadata = {
        "base_backbone": info["name"],
        "base_weights_id": info["weights_id"],
        "base_pretrained": info.get("pretrained") or "",
        "trainable_blocks": str(info.get("trainable_blocks", "")),
        **{k: str(v) for k, v in lineage.items()},
    }
    with mlflow.start_run(run_id=run_id, log_system_metrics=False):
        return mlflow.pyfunc.log_model(
            name="student",
            python_model=str(Path(__file__).resolve()),  # models from code: this file, not a pickle
            artifacts={CHECKPOINT_ARTIFACT: str(student_dir)},
            signature=student_signature(dim),
            metadata=json.loads(json.dumps(metadata)),
            registered_model_name=registered_name or None,
            pip_requirements=[],  # the project's own environment (uv.lock) serves it
        )


mlflow.models.set_model(StudentModel())
