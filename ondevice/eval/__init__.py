"""Offline evaluation of the personalization levels (operator side; never imported by
the device runtime). Run ``python -m ondevice.eval --help``.

It needs the ``operator`` extra (``pip install 'ondevice-personalization[operator]'``):
importing it without raises an ``ImportError`` that says so.
"""

import ondevice.operator  # noqa: F401  (raises ImportError naming the extra if it is missing)
from ondevice.eval.harness import Dataset, EvalResult, EvalSettings, evaluate, from_synthetic

__all__ = ["Dataset", "EvalResult", "EvalSettings", "evaluate", "from_synthetic"]
