"""Distillation: config and plan, the training step, the Ray Train worker loop, checkpoints, student import/export."""
