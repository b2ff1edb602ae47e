"""The student checkpoint: its on-disk format (``format``), written by training and read by every evaluation."""
