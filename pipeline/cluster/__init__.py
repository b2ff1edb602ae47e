"""Running on a cluster: Ray Jobs submission."""
