"""What ``get_recommendations`` returns. Kept free of numpy so that ``import ondevice``
stays light; the levels that fill it in live in :mod:`ondevice.levels`."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any, overload

from .policy import PrivacyLevel

__all__ = ["Recommendation", "Recommendations"]


@dataclass(frozen=True, slots=True)
class Recommendation:
    """One recommended item, the level that produced it, and why.

    ``item_id`` is the catalog's item id and ``title`` its title in the bundle;
    ``score`` is the ranking score of the method that answered (higher is better,
    comparable only within one answer); ``level`` is the privacy level whose method
    ranked it; ``explanation`` says why, in words a user can read (for example
    "because you liked “Collage template”").
    """

    item_id: str
    title: str
    score: float
    level: PrivacyLevel
    explanation: str

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form."""
        return {
            "item_id": self.item_id,
            "title": self.title,
            "score": self.score,
            "level": self.level.value,
            "explanation": self.explanation,
        }


@dataclass(frozen=True, slots=True)
class Recommendations(Sequence[Recommendation]):
    """The ranked answer of :meth:`~ondevice.PersonalizationEngine.get_recommendations`.

    A sequence of :class:`Recommendation`, best first. ``level`` is the level that
    answered; ``requested`` the engine's level; ``fallbacks`` says, for each level that
    could not answer, why (for example "individual: no interactions yet").
    """

    items: tuple[Recommendation, ...]
    level: PrivacyLevel
    requested: PrivacyLevel
    fallbacks: tuple[str, ...] = ()

    @overload
    def __getitem__(self, index: int) -> Recommendation: ...
    @overload
    def __getitem__(self, index: slice) -> Sequence[Recommendation]: ...
    def __getitem__(self, index: int | slice) -> Recommendation | Sequence[Recommendation]:
        return self.items[index]

    def __len__(self) -> int:
        return len(self.items)

    def __iter__(self) -> Iterator[Recommendation]:
        return iter(self.items)

    @property
    def item_ids(self) -> list[str]:
        """The recommended item ids, best first."""
        return [r.item_id for r in self.items]

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form."""
        return {
            "level": self.level.value,
            "requested": self.requested.value,
            "fallbacks": list(self.fallbacks),
            "items": [r.to_dict() for r in self.items],
        }
