"""Distillation: one image's path through training.

``config`` (DistillConfig, light) -> ``driver.distill`` opens the inputs and builds the ``plan`` (DistillPlan, the
run's params) -> Ray Train runs ``worker.train_worker`` on every rank: ``stream`` pairs each image with its
cached teacher target, each batch goes through ``step.StepRunner``
(one optimizer step), rank 0 saves ``checkpoint``s and logs through ``tracking`` -> the driver exports the student
(``checkpoint.load_student`` reads it back). ``checkpoint_io``: the authors' checkpoints in, open_clip out;
``mlflow_model``: the student as an MLflow pyfunc model; ``cli``: argument definitions only.
"""
