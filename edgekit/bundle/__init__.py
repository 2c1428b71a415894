"""The deployable bundle: a directory + a reproducible .tar with a manifest."""
