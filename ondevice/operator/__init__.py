"""Operator-side tools: build a catalog from a consenting panel's interactions.

Never imported by the device runtime. :func:`ondevice.operator.build.build_catalog` is
the entry point; the bundle writer lives in ``ondevice.operator.bundle_writer``.

The operator's side needs the ``operator`` extra (``implicit`` trains the ALS model,
``scipy`` holds its sparse matrices, ``threadpoolctl`` keeps BLAS to one thread while it
runs, ``tqdm`` draws the progress bars): importing this package without them raises an
``ImportError`` that says how to install them.
"""

from __future__ import annotations

from importlib.util import find_spec

__all__ = ["OPERATOR_EXTRA", "missing_operator_modules", "require_operator_extra"]

OPERATOR_EXTRA = ("implicit", "scipy", "threadpoolctl", "tqdm")
"""The modules the ``operator`` extra installs (``pip install
'ondevice-personalization[operator]'``)."""


def missing_operator_modules() -> list[str]:
    """The modules of the ``operator`` extra that cannot be imported, in order."""
    missing = []
    for name in OPERATOR_EXTRA:
        try:
            found = find_spec(name) is not None
        except (ImportError, ValueError):
            found = False
        if not found:
            missing.append(name)
    return missing


def require_operator_extra(part: str) -> None:
    """Raise ``ImportError`` naming the install command if the extra is incomplete."""
    missing = missing_operator_modules()
    if missing:
        raise ImportError(
            f"{part} needs the 'operator' extra ({', '.join(missing)} not installed): "
            "pip install 'ondevice-personalization[operator]'"
        )


require_operator_extra("ondevice.operator (the catalog builder and the evaluation harness)")
