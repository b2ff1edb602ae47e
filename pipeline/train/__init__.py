"""Distillation: one image's path through training.

``config`` (DistillConfig, light) -> ``driver.distill`` opens the inputs and builds the ``plan`` (DistillPlan, the
run's params) -> Ray Train runs ``worker.train_worker`` on every rank: ``stream`` pairs each image with its
cached teacher target, each batch goes through ``step.StepRunner`` (one optimizer step), rank 0 saves training
checkpoints (``state``: the student format of :mod:`pipeline.student.format` plus optimizer and RNG state) and
logs through ``tracking``; ``run_dir`` finds the checkpoint to resume from -> the driver ``export``s the student.
``checkpoint_io``: the authors' checkpoints in, open_clip out; ``cli``: argument definitions only.
"""
