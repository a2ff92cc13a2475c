"""Operator-side tools: build a catalog from a consenting panel's interactions.

Never imported by the device runtime. :func:`ondevice.operator.build.build_catalog` is
the entry point; the bundle writer lives in ``ondevice.operator.bundle_writer``.
"""
