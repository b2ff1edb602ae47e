"""Results: segmentation benchmarks, teacher fidelity, speed, single-image segment/embed, run comparison, plots."""
