"""``spar bench gpu``: one prepared check of the GPU path, measured end to end, that never loses what it measured.

Sections (each in its own ``try``, with its own time budget; the JSON + Markdown report is rewritten after every
section and after every item inside one, so a crash or a kill keeps everything measured so far):

* ``environment``: versions, the accelerator, measured matmul TFLOP/s (bf16, fp16, fp32, tf32; 8192^3 on a GPU);
* ``correctness``: the teacher and the single pass on the device, in fp32 (and tf32) and under bf16/fp16
  autocast, against an independent CPU fp32 reference (a naive one-window-at-a-time teacher) on a real photo;
* ``throughput``: teacher windows/s and achieved TFLOP/s as a fraction of the measured matmul rate for a window
  batch sweep (model alone and the full sliding teacher), single pass vs teacher on one large image, peak memory;
* ``projection``: the paper-scale precompute (25k SA-1B-like views, SigLIP2 crop 512 stride 24, the ingest
  recipe's sizes) from the measured rate: windows, TFLOPs, GPU-hours, cache bytes;
* ``pipeline``: ingest -> precompute (Ray GPU tasks) -> distill (Ray Train, bf16, then fp16 + gradient scaling or
  fp32 on CPU) -> fidelity eval -> segment, on real photos with a local Ray and the embedded MLflow store,
  through :func:`pipeline.workflow.orchestrator.run_pipeline`; each stage's time and where it really ran.

``--mode cpu`` runs the same sections with tiny models and images (CI runs it so the script cannot rot).

Modules: :mod:`.harness` (plans, the report, one section under its time limits, what sections share),
:mod:`.checks` (the device sections), :mod:`.end_to_end` (the ``pipeline`` section) and :mod:`.command`
(``spar bench gpu``: runs them in order and prints the summary).
"""
