"""Progress bars for the operator's long runs, drawn by ``tqdm`` on stderr."""

from __future__ import annotations

from types import TracebackType
from typing import Any

from tqdm import tqdm  # type: ignore[import-untyped]

__all__ = ["TqdmProgress"]


class TqdmProgress:
    """A ``progress(done, total, stage)`` callback (see ``ondevice.operator.build.Progress``)
    that draws ``tqdm`` bars.

    With ``label`` there is one bar for the whole run, named ``label``, and the current
    stage is shown after it; without, every stage gets a bar of its own (the builder's
    stages count different things: items, iterations). Use it as a context manager, or
    call :meth:`close`.
    """

    def __init__(self, label: str | None = None, *, unit: str = "step") -> None:
        self._label = label
        self._unit = unit
        self._bar: Any = None
        self._stage: str | None = None

    def __call__(self, done: int, total: int, stage: str) -> None:
        bar = self._bar
        new_stage = self._label is None and stage != self._stage
        if bar is None or new_stage or bar.total != total:
            self.close()
            bar = self._bar = tqdm(
                total=total, desc=self._label or stage, unit=self._unit, dynamic_ncols=True
            )
        if self._label is not None:
            bar.set_postfix_str(stage, refresh=False)
        bar.update(max(0, min(done, total) - bar.n))
        self._stage = stage

    def close(self) -> None:
        """Finish the current bar, if any."""
        if self._bar is not None:
            self._bar.close()
            self._bar = None

    def __enter__(self) -> TqdmProgress:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()
