import os
from importlib.metadata import version as _v

# OpenMP threads that wait by spinning (libgomp's default) hold a core for milliseconds after
# every torch op. On a small machine with anything else running (the other trial, the Ray
# driver, a test suite) that made 2-thread CPU epochs 10-100x slower (`tune-clipfh bench`,
# line 5). Sleeping waiters cost little by comparison. Read by libgomp when torch loads, so it
# is set here, before any submodule imports torch; Ray workers inherit it from the driver. An
# explicit user setting wins.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

__version__ = _v('tune-clipfh')
