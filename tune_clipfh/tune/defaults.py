"""Experiment defaults shared by the Python API (:mod:`.experiment`) and the CLI.

Ray- and torch-free, so the CLI reads them without loading either.
"""

ASHA_GRACE = 3
"""ASHA's grace period in reported epochs: a search trial runs at least this many."""
ASHA_REDUCTION = 3
"""ASHA's reduction factor: about 1 in this many trials goes on at each rung."""
