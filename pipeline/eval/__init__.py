"""Results: segmentation benchmarks, teacher fidelity, speed, single-image segment/embed, run comparison, plots.

config (what is asked; light) -> model (which model, what it sees, dense features) -> segment (photos to PNGs and
arrays) / benchmark (mIoU over a dataset, Ray fan-out; ``spar eval``'s dispatch) / fidelity / speed -> tracking
(the one MLflow logging path); runs (compare runs), viz (PCA pictures), cli (arguments only).
"""
