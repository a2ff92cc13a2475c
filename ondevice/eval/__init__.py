"""Offline evaluation of the personalization levels (operator side; never imported by
the device runtime). Run ``python -m ondevice.eval --help``."""

from ondevice.eval.harness import Dataset, EvalResult, EvalSettings, evaluate, from_synthetic

__all__ = ["Dataset", "EvalResult", "EvalSettings", "evaluate", "from_synthetic"]
