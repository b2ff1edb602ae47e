"""The old home of the student checkpoint's loader, kept as an import path only: MLflow models registered before the
loader moved to :mod:`pipeline.student.format` carry code that imports it from here."""

from pipeline.student.format import load_student, read_backbone_info

__all__ = ["load_student", "read_backbone_info"]
