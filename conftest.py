"""Suite-wide import hygiene (tests/ and benchmarks/ have their own conftest.py for the rest).

The repository root holds ``kernels/``, installed as ``m2mega.kernels``. transformers (>= 5.2x) depends on
the unrelated PyPI package ``kernels`` and imports it when it builds a model; ``python -m pytest`` and
``python -m torch.distributed.run`` put the working directory first on ``sys.path``, where our folder
would shadow that package (``ImportError: cannot import name 'CUDAProperties' from 'kernels'``). m2mega is
installed (editable), so the root is not needed on the path: drop it here, and keep every subprocess the
tests start from adding it (``PYTHONSAFEPATH``, Python >= 3.11).
"""

import os
import sys

_ROOT = os.path.dirname(os.path.abspath(__file__))
sys.path[:] = [p for p in sys.path if p not in ("", ".") and os.path.abspath(p) != _ROOT]
os.environ["PYTHONSAFEPATH"] = "1"
