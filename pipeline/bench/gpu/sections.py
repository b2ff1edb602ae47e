"""The GPU check's sections by name, in the order they run (see :mod:`pipeline.bench.gpu`)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from pipeline.bench.gpu.context import Context
from pipeline.bench.gpu.correctness import section_correctness
from pipeline.bench.gpu.end_to_end import section_pipeline
from pipeline.bench.gpu.environment import section_environment
from pipeline.bench.gpu.projection import section_projection
from pipeline.bench.gpu.runner import Deadline
from pipeline.bench.gpu.throughput import section_throughput

SectionFn = Callable[[Context, dict[str, Any], Deadline], None]

SECTION_FNS: dict[str, SectionFn] = {
    "environment": section_environment,
    "correctness": section_correctness,
    "throughput": section_throughput,
    "projection": section_projection,
    "pipeline": section_pipeline,
}
