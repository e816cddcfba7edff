"""Hyperparameter search: the thesis versions as fixed trials, search spaces and experiments."""
