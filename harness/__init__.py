"""
The machinery behind train.py, out of the reader's way: the settings rules and the configurator, the checks of
every input (checks.py), the Run that owns out_dir (artifacts.py: fingerprints, resume, atomic writes, the
lock), what it adds to a training loop (loop.py), the code walk behind the fingerprints (codedeps.py), the
torchrun helpers (distributed.py) and the report (reports.py). Nothing here is needed to read the method.
"""

from harness.artifacts import run_main, start  # noqa: F401 (train.main's two calls)
