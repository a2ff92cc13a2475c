"""Declared purposes: what may be stored, why, for how long, and at which privacy level.

Nothing reaches the profile without a declaration. The host app declares each profile
*signal* (a slowly changing attribute such as a plan type) and each *context* field (a
property of the moment, such as the time of day) with a purpose and a retention;
interactions have a built-in declared shape (:data:`BUILTIN_FIELDS`). Every write is
validated here before a transaction starts, so a refused call writes nothing.
"""

from __future__ import annotations

import datetime as _dt
import enum
import json
import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Final

from .errors import InvalidInputError, PolicyViolationError

__all__ = [
    "BUILTIN_FIELDS",
    "DEFAULT_EVENTS",
    "ContextField",
    "FieldPurpose",
    "Interaction",
    "Policy",
    "PrivacyLevel",
    "Signal",
    "SignalValue",
]

SignalValue = str | int | float | bool

#: Longest user id, item id or string value accepted, in UTF-8 bytes.
MAX_ID_BYTES: Final = 256
MAX_STRING_BYTES: Final = 256
#: Largest absolute interaction value or numeric signal accepted.
MAX_ABS_VALUE: Final = 1e12
#: Earliest timestamp accepted (2000-01-01T00:00:00Z): older values are almost surely a
#: unit mistake (milliseconds, or a zero default).
MIN_TIMESTAMP: Final = 946_684_800.0

#: Unicode category Cc (C0 and C1 control characters, and DEL).
_CONTROL: Final = re.compile("[\x00-\x1f\x7f-\x9f]")

DEFAULT_EVENTS: Final = ("view", "click", "add_to_cart", "purchase", "like", "rate", "dismiss")


class PrivacyLevel(enum.Enum):
    """The five levels, from collecting nothing to keeping a derived user vector.

    Each level collects everything the levels below it collect, and more:

    ``none``
        Nothing is stored. Recommendations are global popularity.
    ``segment``
        Declared signals and aggregate counters (interactions per day and event type,
        and factor-space sums with no item ids). No per-item history.
    ``behavioral``
        Adds the rolling window of interactions (item, event, time, value) and the
        user's blocked items.
    ``contextual``
        Adds the declared context stored with each interaction.
    ``individual``
        Adds derived state: the user vector folded in on the device.
    """

    NONE = "none"
    SEGMENT = "segment"
    BEHAVIORAL = "behavioral"
    CONTEXTUAL = "contextual"
    INDIVIDUAL = "individual"

    @property
    def rank(self) -> int:
        """Position in the order none < segment < behavioral < contextual < individual."""
        return _LEVEL_ORDER.index(self)

    def allows(self, other: PrivacyLevel) -> bool:
        """True if this level collects everything ``other`` collects."""
        return self.rank >= other.rank

    @classmethod
    def parse(cls, value: PrivacyLevel | str) -> PrivacyLevel:
        """Accept a level or its name; anything else is an :class:`InvalidInputError`."""
        if isinstance(value, PrivacyLevel):
            return value
        if isinstance(value, str):
            try:
                return cls(value.strip().lower())
            except ValueError:
                pass
        names = ", ".join(level.value for level in cls)
        raise InvalidInputError(f"privacy_level must be one of {names}; got {value!r}")


_LEVEL_ORDER: Final = tuple(PrivacyLevel)


@dataclass(frozen=True, slots=True)
class FieldPurpose:
    """What a stored field is for, how long it is kept and from which level it is kept.

    ``name`` is the stored field (``table.column``, or a declared signal or context
    field); ``purpose`` says what it is used for, in words shown to the user;
    ``retention_days`` how long it is kept (None: until the user removes it);
    ``min_level`` the lowest privacy level that stores it and ``max_level`` the
    highest (None: every level from ``min_level`` up).
    """

    name: str
    purpose: str
    #: Days the field is kept; ``None``: until the user removes it.
    retention_days: float | None
    min_level: PrivacyLevel
    #: The highest level that keeps it (None: every level from ``min_level`` up). The
    #: segment level's aggregates, for example, are not kept once the window is.
    max_level: PrivacyLevel | None = None

    def collected_at(self, level: PrivacyLevel) -> bool:
        """Whether ``level`` stores this field."""
        return level.allows(self.min_level) and (
            self.max_level is None or self.max_level.allows(level)
        )

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready description, as shown in reports and exports."""
        return {
            "name": self.name,
            "purpose": self.purpose,
            "retention_days": self.retention_days,
            "collected_from_level": self.min_level.value,
            "collected_up_to_level": None if self.max_level is None else self.max_level.value,
        }


_TYPES: Final[Mapping[str, type]] = {"str": str, "int": int, "float": float, "bool": bool}


def _check_name(kind: str, name: str) -> None:
    if not isinstance(name, str) or not name.isidentifier() or len(name) > 64:
        raise InvalidInputError(f"{kind} name must be a Python-style identifier; got {name!r}")


def _check_purpose(kind: str, name: str, purpose: str) -> None:
    if not isinstance(purpose, str) or len(purpose.strip()) < 3:
        raise InvalidInputError(f"{kind} {name!r} needs a purpose: say why it is stored")


def _check_retention(kind: str, name: str, days: float) -> None:
    if isinstance(days, bool) or not isinstance(days, int | float):
        raise InvalidInputError(f"{kind} {name!r}: retention_days must be a number")
    if not math.isfinite(days) or days <= 0:
        raise InvalidInputError(f"{kind} {name!r}: retention_days must be positive and finite")


@dataclass(frozen=True, slots=True)
class _Declared:
    """Shared shape of :class:`Signal` and :class:`ContextField`."""

    name: str
    type: str
    purpose: str
    retention_days: float
    choices: tuple[str, ...] | None = None
    max_length: int = 64

    def _check(self, kind: str) -> None:
        _check_name(kind, self.name)
        if self.type not in _TYPES:
            raise InvalidInputError(
                f"{kind} {self.name!r}: type must be one of {sorted(_TYPES)}; got {self.type!r}"
            )
        _check_purpose(kind, self.name, self.purpose)
        _check_retention(kind, self.name, self.retention_days)
        if self.choices is not None:
            if self.type != "str":
                raise InvalidInputError(f"{kind} {self.name!r}: choices need type 'str'")
            if not self.choices or not all(isinstance(c, str) for c in self.choices):
                raise InvalidInputError(f"{kind} {self.name!r}: choices must be non-empty strings")
        if not 1 <= self.max_length <= MAX_STRING_BYTES:
            raise InvalidInputError(
                f"{kind} {self.name!r}: max_length must be between 1 and {MAX_STRING_BYTES}"
            )

    def validate(self, value: object, *, kind: str) -> SignalValue:
        """Return ``value`` if it fits this declaration, else raise InvalidInputError."""
        where = f"{kind} {self.name!r}"
        if self.type == "bool":
            if not isinstance(value, bool):
                raise InvalidInputError(f"{where} must be a bool; got {type(value).__name__}")
            return value
        if isinstance(value, bool):
            raise InvalidInputError(f"{where} must be {self.type}; got bool")
        if self.type == "int":
            if not isinstance(value, int):
                raise InvalidInputError(f"{where} must be an int; got {type(value).__name__}")
            if abs(value) > MAX_ABS_VALUE:
                raise InvalidInputError(f"{where} is out of range")
            return value
        if self.type == "float":
            if not isinstance(value, int | float):
                raise InvalidInputError(f"{where} must be a number; got {type(value).__name__}")
            return _finite(float(value), where)
        if not isinstance(value, str):
            raise InvalidInputError(f"{where} must be a str; got {type(value).__name__}")
        _check_text(value, where, self.max_length)
        if self.choices is not None and value not in self.choices:
            # Never echo the refused value: error messages end up in app logs.
            raise InvalidInputError(f"{where} must be one of {list(self.choices)}")
        return value

    def describe(self, min_level: PrivacyLevel) -> FieldPurpose:
        """The field's purpose entry for reports."""
        return FieldPurpose(self.name, self.purpose, float(self.retention_days), min_level)

    def to_dict(self) -> dict[str, Any]:
        """The declaration as JSON-ready data (stored in the profile, exported)."""
        return {
            "name": self.name,
            "type": self.type,
            "purpose": self.purpose,
            "retention_days": self.retention_days,
            "choices": list(self.choices) if self.choices is not None else None,
            "max_length": self.max_length,
        }


@dataclass(frozen=True, slots=True)
class Signal(_Declared):
    """A declared profile signal, e.g. ``Signal("plan", "str", "pick plan-specific tips",
    retention_days=365, choices=("free", "pro"))``. Signals are stored from the
    ``segment`` level up and feed segment assignment."""

    def __post_init__(self) -> None:
        self._check("signal")


@dataclass(frozen=True, slots=True)
class ContextField(_Declared):
    """A declared context field sent with interactions, e.g. the time of day. Stored
    with the interaction from the ``contextual`` level up; at lower levels it is
    validated and then dropped."""

    def __post_init__(self) -> None:
        self._check("context field")


def _finite(value: float, where: str) -> float:
    if not math.isfinite(value):
        raise InvalidInputError(f"{where} must be finite; got {value!r}")
    if abs(value) > MAX_ABS_VALUE:
        raise InvalidInputError(f"{where} is out of range (|x| <= {MAX_ABS_VALUE:g})")
    return value


def _check_text(value: str, where: str, max_bytes: int) -> None:
    if not value:
        raise InvalidInputError(f"{where} must not be empty")
    try:
        size = len(value.encode("utf-8"))
    except UnicodeEncodeError:
        raise InvalidInputError(f"{where} is not valid text (lone surrogate)") from None
    if size > max_bytes:
        raise InvalidInputError(f"{where} is too long ({size} bytes; at most {max_bytes})")
    if _CONTROL.search(value):
        raise InvalidInputError(f"{where} contains control characters")


def check_id(value: object, what: str) -> str:
    """Validate a user id or item id: a non-empty str of at most 256 UTF-8 bytes."""
    if not isinstance(value, str):
        raise InvalidInputError(f"{what} must be a str; got {type(value).__name__}")
    _check_text(value, what, MAX_ID_BYTES)
    return value


@dataclass(frozen=True, slots=True)
class Interaction:
    """One thing a user did with an item: the built-in declared shape.

    ``item_id`` is the catalog item's id; ``event`` one of the policy's events
    (``view`` by default; see :attr:`Policy.events`). ``timestamp`` is seconds since
    the Unix epoch (UTC); ``None`` means "now" by the engine's clock. ``value`` is
    optional (a rating, a dwell time...). ``context`` maps declared context fields to
    values.
    """

    item_id: str
    event: str = "view"
    timestamp: float | None = None
    value: float | None = None
    context: Mapping[str, SignalValue] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form (as exported)."""
        return {
            "item_id": self.item_id,
            "event": self.event,
            "timestamp": self.timestamp,
            "value": self.value,
            "context": dict(self.context),
        }


_INTERACTION_KEYS: Final = frozenset({"item_id", "event", "timestamp", "value", "context"})

#: Marks a built-in field kept for the profile's retention period (filled in by
#: :meth:`Policy.purposes`). ``None`` means "kept until the user removes it".
PROFILE_RETENTION: Final = -1.0

#: The built-in fields and why they are kept.
BUILTIN_FIELDS: Final = (
    FieldPurpose(
        "users.user_id",
        "keep a separate profile for each person who uses this app on this device",
        PROFILE_RETENTION,
        PrivacyLevel.SEGMENT,
    ),
    FieldPurpose(
        "interactions.item_id",
        "find items related to what you used, and never recommend what you already have",
        PROFILE_RETENTION,
        PrivacyLevel.BEHAVIORAL,
    ),
    FieldPurpose(
        "interactions.event",
        "weigh strong signals (a purchase) above weak ones (a view)",
        PROFILE_RETENTION,
        PrivacyLevel.BEHAVIORAL,
    ),
    FieldPurpose(
        "interactions.timestamp",
        "favour what you did recently, and delete interactions when retention ends",
        PROFILE_RETENTION,
        PrivacyLevel.BEHAVIORAL,
    ),
    FieldPurpose(
        "interactions.value",
        "weigh interactions by strength (a rating, a dwell time) when the app sends one",
        PROFILE_RETENTION,
        PrivacyLevel.BEHAVIORAL,
    ),
    FieldPurpose(
        "activity.daily_counts",
        "how often you use the app (events per day, no items), to choose your segment; "
        "from the behavioral level up the window tells this instead",
        PROFILE_RETENTION,
        PrivacyLevel.SEGMENT,
        PrivacyLevel.SEGMENT,
    ),
    FieldPurpose(
        "derived.taste_aggregates",
        "a summary of your tastes in the catalog's factor space (no item ids), to choose "
        "your segment; from the behavioral level up the window tells this instead",
        PROFILE_RETENTION,
        PrivacyLevel.SEGMENT,
        PrivacyLevel.SEGMENT,
    ),
    FieldPurpose(
        "blocked_items.item_id",
        "never recommend an item you asked not to see again (kept until you unblock it)",
        None,
        PrivacyLevel.BEHAVIORAL,
    ),
    FieldPurpose(
        "egress.report",
        "show you exactly what left this device (a randomized segment ID), when, and at "
        "which privacy cost (both epsilons, and what the report spent)",
        365.0,
        PrivacyLevel.SEGMENT,
    ),
    FieldPurpose(
        "report_memos.memo",
        "keep a year of reports from adding up: one randomized draw per segment you have "
        "held, reused (and randomized again) for every later report of that segment; kept "
        "until you are forgotten or the level is set to none",
        None,
        PrivacyLevel.SEGMENT,
    ),
    FieldPurpose(
        "report_schedule.due_at",
        "send this week's report at a random moment of the week, so that reports of "
        "this device cannot be linked by their timing: a keyed tag (no user id), the "
        "week and the moment, kept like the ledger so it is never drawn twice",
        8.0,
        PrivacyLevel.NONE,
    ),
    FieldPurpose(
        "report_clock.times",
        "two times for the whole profile (no user): the latest time the reporting path "
        "has seen, so that a clock set back never reopens a reported week, and when this "
        "device last sent a report, so that two reports never leave back to back; kept "
        "until the profile is wiped",
        None,
        PrivacyLevel.NONE,
    ),
    FieldPurpose(
        "budget_ledger.spend",
        "keep the lifetime privacy budget and the one-report-a-week rule even after a "
        "user is forgotten or the level lowered: a keyed tag (no user id), the week of "
        "each report and the lifetime epsilon it spent; kept at every level for a year "
        "of the reporting clock (which never goes back)",
        365.0,
        PrivacyLevel.NONE,
    ),
    FieldPurpose(
        "derived.user_vector",
        "your taste vector, computed on this device from your own interactions",
        PROFILE_RETENTION,
        PrivacyLevel.INDIVIDUAL,
    ),
)


@dataclass(frozen=True, slots=True)
class Policy:
    """The host app's declarations, the rolling window and the retention period.

    ``window``: how many interactions per user are kept (the oldest are evicted);
    ``retention_days``: after how long interactions, counters and derived state are
    deleted; ``events``: the event types an interaction may carry;
    ``max_future_seconds``: how far ahead of the engine's clock a timestamp may be.
    """

    signals: tuple[Signal, ...] = ()
    context: tuple[ContextField, ...] = ()
    events: tuple[str, ...] = DEFAULT_EVENTS
    window: int = 100
    retention_days: float = 90.0
    max_future_seconds: float = 600.0

    def __post_init__(self) -> None:
        # Accept lists from callers while keeping the dataclass hashable and frozen.
        object.__setattr__(self, "signals", tuple(self.signals))
        object.__setattr__(self, "context", tuple(self.context))
        object.__setattr__(self, "events", tuple(self.events))
        for kind, items in (("signal", self.signals), ("context field", self.context)):
            expected = Signal if kind == "signal" else ContextField
            names = [s.name for s in items]
            if not all(isinstance(s, expected) for s in items):
                raise InvalidInputError(f"every {kind} must be a {expected.__name__}")
            if len(set(names)) != len(names):
                raise InvalidInputError(f"duplicate {kind} names in the policy: {names}")
        if not self.events or not all(isinstance(e, str) and e.isidentifier() for e in self.events):
            raise InvalidInputError("events must be non-empty identifiers")
        if len(set(self.events)) != len(self.events):
            raise InvalidInputError("duplicate event names in the policy")
        if isinstance(self.window, bool) or not isinstance(self.window, int) or self.window < 1:
            raise InvalidInputError("window must be a positive int")
        _check_retention("policy", "retention", self.retention_days)
        if not math.isfinite(self.max_future_seconds) or self.max_future_seconds < 0:
            raise InvalidInputError("max_future_seconds must be >= 0")

    @property
    def retention_seconds(self) -> float:
        """The retention period in seconds."""
        return self.retention_days * 86400.0

    def signal(self, name: str) -> Signal:
        """The declaration of signal ``name``, or PolicyViolationError."""
        for s in self.signals:
            if s.name == name:
                return s
        raise PolicyViolationError(
            f"signal {name!r} is not declared; declare it with a purpose in Policy(signals=...)"
        )

    def context_field(self, name: str) -> ContextField:
        """The declaration of context field ``name``, or PolicyViolationError."""
        for c in self.context:
            if c.name == name:
                return c
        raise PolicyViolationError(
            f"context field {name!r} is not declared; declare it with a purpose in "
            "Policy(context=...)"
        )

    def validate_signals(self, signals: Mapping[str, object]) -> dict[str, SignalValue]:
        """Validate a mapping of signal values; return a clean copy."""
        if not isinstance(signals, Mapping):
            raise InvalidInputError("signals must be a mapping of declared names to values")
        if not signals:
            raise InvalidInputError("no signals given")
        out: dict[str, SignalValue] = {}
        for name, value in signals.items():
            if not isinstance(name, str):
                raise InvalidInputError("signal names must be str")
            out[name] = self.signal(name).validate(value, kind="signal")
        return out

    def validate_context(self, context: object) -> dict[str, SignalValue]:
        """Validate an interaction's context mapping; return a clean copy."""
        if context is None:
            return {}
        if not isinstance(context, Mapping):
            raise InvalidInputError("context must be a mapping of declared fields to values")
        out: dict[str, SignalValue] = {}
        for name, value in context.items():
            if not isinstance(name, str):
                raise InvalidInputError("context field names must be str")
            out[name] = self.context_field(name).validate(value, kind="context field")
        return out

    def validate_interaction(self, interaction: object, now: float) -> Interaction:
        """Check an interaction (an :class:`Interaction` or a mapping with its fields)
        and return a normalized :class:`Interaction` with a float timestamp.

        Raises PolicyViolationError for an undeclared field, context field or event,
        and InvalidInputError for anything malformed.
        """
        if isinstance(interaction, Interaction):
            raw: Mapping[str, Any] = {
                "item_id": interaction.item_id,
                "event": interaction.event,
                "timestamp": interaction.timestamp,
                "value": interaction.value,
                "context": interaction.context,
            }
        elif isinstance(interaction, Mapping):
            raw = interaction
            extra = [k for k in raw if k not in _INTERACTION_KEYS]
            if extra:
                raise PolicyViolationError(
                    f"undeclared interaction field(s) {sorted(map(str, extra))}; an "
                    f"interaction has {sorted(_INTERACTION_KEYS)} (put declared context "
                    "under 'context')"
                )
            if "item_id" not in raw:
                raise InvalidInputError("interaction needs an 'item_id'")
        else:
            raise InvalidInputError(
                f"interaction must be an Interaction or a mapping; got {type(interaction).__name__}"
            )
        item_id = check_id(raw["item_id"], "item_id")
        event = raw.get("event", "view")
        if not isinstance(event, str):
            raise InvalidInputError(f"event must be a str; got {type(event).__name__}")
        if event not in self.events:
            raise PolicyViolationError(
                f"the interaction's event is not declared; declared events: {list(self.events)}"
            )
        ts = self._timestamp(raw.get("timestamp"), now)
        value = raw.get("value")
        if value is not None:
            if isinstance(value, bool) or not isinstance(value, int | float):
                raise InvalidInputError(f"value must be a number; got {type(value).__name__}")
            value = _finite(float(value), "value")
        context = self.validate_context(raw.get("context"))
        return Interaction(item_id, event, ts, value, context)

    def _timestamp(self, ts: object, now: float) -> float:
        if ts is None:
            return float(now)
        if isinstance(ts, _dt.datetime):
            if ts.tzinfo is None:
                raise InvalidInputError("timestamp datetime must be timezone-aware")
            ts = ts.timestamp()
        if isinstance(ts, bool) or not isinstance(ts, int | float):
            raise InvalidInputError(
                f"timestamp must be Unix seconds or an aware datetime; got {type(ts).__name__}"
            )
        value = float(ts)
        if not math.isfinite(value):
            raise InvalidInputError(f"timestamp must be finite; got {value!r}")
        if value < MIN_TIMESTAMP:
            raise InvalidInputError("timestamp is before 2000-01-01; expected Unix seconds")
        if value > now + self.max_future_seconds:
            raise InvalidInputError(
                f"timestamp is {value - now:.0f} s in the future "
                f"(at most {self.max_future_seconds:.0f} s allowed)"
            )
        return value

    def purposes(self) -> list[FieldPurpose]:
        """Every field this policy lets the profile store, with its purpose."""
        out: list[FieldPurpose] = []
        for f in BUILTIN_FIELDS:
            days = (
                self.retention_days if f.retention_days == PROFILE_RETENTION else f.retention_days
            )
            out.append(FieldPurpose(f.name, f.purpose, days, f.min_level, f.max_level))
        out.extend(s.describe(PrivacyLevel.SEGMENT) for s in self.signals)
        out.extend(c.describe(PrivacyLevel.CONTEXTUAL) for c in self.context)
        return out

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form, stored in the profile and written in exports."""
        return {
            "signals": [s.to_dict() for s in self.signals],
            "context": [c.to_dict() for c in self.context],
            "events": list(self.events),
            "window": self.window,
            "retention_days": self.retention_days,
            "max_future_seconds": self.max_future_seconds,
        }

    def to_json(self) -> str:
        """Canonical JSON of :meth:`to_dict`."""
        return json.dumps(self.to_dict(), sort_keys=True, separators=(",", ":"))

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Policy:
        """Rebuild a policy from :meth:`to_dict` output; InvalidInputError if malformed."""
        try:
            return cls(
                signals=tuple(_declared(Signal, d) for d in data.get("signals", ())),
                context=tuple(_declared(ContextField, d) for d in data.get("context", ())),
                events=tuple(data.get("events", DEFAULT_EVENTS)),
                window=data.get("window", 100),
                retention_days=data.get("retention_days", 90.0),
                max_future_seconds=data.get("max_future_seconds", 600.0),
            )
        except (TypeError, AttributeError, KeyError) as exc:
            raise InvalidInputError(f"malformed policy: {exc}") from exc


def _declared(cls: type[Signal] | type[ContextField], d: Mapping[str, Any]) -> Any:
    choices: Sequence[str] | None = d.get("choices")
    return cls(
        name=d["name"],
        type=d["type"],
        purpose=d["purpose"],
        retention_days=d["retention_days"],
        choices=tuple(choices) if choices is not None else None,
        max_length=d.get("max_length", 64),
    )
