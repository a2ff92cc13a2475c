"""``PersonalizationEngine``: the one front door.

Opens (or creates) an encrypted profile directory, validates every write against the
declared policy and the privacy level, enforces the rolling window and the retention
period inside the write transaction, and answers "what do you know about me?",
"give me my data" and "forget me".
"""

from __future__ import annotations

import base64
import contextlib
import dataclasses
import logging
import math
import os
import re
import time
import uuid
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Any, Final

from . import _db, rotation
from .errors import (
    BundleError,
    ExportError,
    InvalidInputError,
    KeyProviderError,
    OndeviceError,
    PolicyViolationError,
    ProfileClosedError,
    ProfileGoneError,
    ProfileNotFoundError,
    ProfileUnreadableError,
    StorageError,
    SyncError,
)
from .export import (
    EXPORT_FORMAT,
    EXPORT_VERSION,
    day_to_iso,
    decode_export,
    encode_export,
    iso_to_day,
    read_export_file,
)
from .keys import (
    KEY_FILE,
    LOCK_FILE,
    UNREADABLE,
    Argon2Params,
    Keychain,
    KeyProvider,
    Passphrase,
    fsync_dir,
    key_files,
    key_lock,
    write_atomic,
)
from .policy import (
    FieldPurpose,
    Interaction,
    Policy,
    PrivacyLevel,
    SignalValue,
    check_id,
)
from .reporting import SEND_LOCK_FILE, Reporter, budget_summary, segment_count
from .results import Recommendations
from .store import SCHEMA_VERSION, Store
from .sync_settings import SyncOutcome, SyncSettings

if TYPE_CHECKING:  # numpy-heavy modules load on first use: `import ondevice` stays light
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

    from .bundle import BundleInfo
    from .catalog import Catalog
    from .levels import CatalogRuntime

__all__ = ["PersonalizationEngine", "ProfileReport", "UserReport"]

log = logging.getLogger(__name__)

DB_FILE: Final = "profile.db"
_SIDE_FILES: Final = ("-wal", "-shm", "-journal")
_PAGE_SIZE: Final = 4096
_META_KEYS: Final = ("privacy_level", "policy", "profile_id", "last_purge")
#: The full retention pass over every user runs at open when the last one is older than
#: this (seconds); every write also applies retention to its own user, and
#: :meth:`PersonalizationEngine.purge_expired` runs it on demand.
FULL_PURGE_INTERVAL: Final = 3600.0
#: A write applies retention to its user's rows when this engine last did so longer ago
#: than this (seconds): retention holds to the minute without four extra statements in
#: every write transaction.
_USER_PURGE_INTERVAL: Final = 60.0


@dataclass(frozen=True, slots=True)
class UserReport:
    """What the profile holds about one user, and why.

    ``user_id``; ``created_at``: when the user's profile was created (Unix seconds);
    ``signals``: the declared signal values stored; ``interactions``: how many
    interactions the rolling window holds, ``oldest_interaction`` and
    ``newest_interaction`` their times (None without any); ``context_values``: how
    many declared context values are stored with them; ``active_days``: on how many
    distinct days (UTC) the stored counters and window show activity; ``derived``: the
    names of state computed on the device (for example ``user_vector``);
    ``blocked_items``: how many items the user blocked; ``reports_sent``: how many
    reports the egress log shows as sent; ``privacy_budget``: the reporting privacy
    budget (``epsilon_inf``, ``epsilon_1``, ``lifetime_cap``, ``lifetime_spent``,
    ``lifetime_remaining``, ``period_days``, ``memos``, ``when_spent``,
    ``reports_in_period``; see :class:`~ondevice.SyncSettings`).
    """

    user_id: str
    created_at: float
    signals: Mapping[str, SignalValue]
    interactions: int
    oldest_interaction: float | None
    newest_interaction: float | None
    context_values: int
    active_days: int
    derived: tuple[str, ...]
    blocked_items: int
    reports_sent: int = 0
    privacy_budget: Mapping[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form."""
        return {
            "reports_sent": self.reports_sent,
            "privacy_budget": dict(self.privacy_budget),
            "user_id": self.user_id,
            "created_at": self.created_at,
            "signals": dict(self.signals),
            "interactions": self.interactions,
            "oldest_interaction": self.oldest_interaction,
            "newest_interaction": self.newest_interaction,
            "context_values": self.context_values,
            "active_days": self.active_days,
            "derived": list(self.derived),
            "blocked_items": self.blocked_items,
        }


@dataclass(frozen=True, slots=True)
class ProfileReport:
    """The answer to "what do you know about me, and why?".

    ``privacy_level`` is the profile's level, ``window`` and ``retention_days`` the
    policy's rolling window (interactions kept per user) and retention period.
    ``fields`` lists every field the profile may store (:class:`~ondevice.FieldPurpose`),
    with its purpose, retention and the level from which it is collected; in
    :meth:`to_dict` each carries ``collected``, True for the fields the current level
    collects. ``users`` holds one :class:`UserReport` per user asked about.
    ``encryption`` describes how the profile is encrypted at rest; ``extra`` holds
    additional top-level keys for :meth:`to_dict`.
    """

    privacy_level: PrivacyLevel
    window: int
    retention_days: float
    fields: tuple[FieldPurpose, ...]
    users: tuple[UserReport, ...]
    encryption: str = "SQLCipher 4 (AES-256-CBC + HMAC-SHA512 per page), raw 256-bit key"
    extra: Mapping[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form."""
        return {
            "privacy_level": self.privacy_level.value,
            "window": self.window,
            "retention_days": self.retention_days,
            "encryption": self.encryption,
            "fields": [
                {**f.to_dict(), "collected": f.collected_at(self.privacy_level)}
                for f in self.fields
            ],
            "users": [u.to_dict() for u in self.users],
            **dict(self.extra),
        }


class PersonalizationEngine:
    """Personalization on the user's machine, from one encrypted profile directory.

    ::

        with PersonalizationEngine("~/.myapp/profile", key=Passphrase("...")) as engine:
            engine.update_profile("alice", {"item_id": "sku-1", "event": "view"})
            report = engine.report("alice")  # what is stored, and why

    Parameters (all keyword-only except ``path``):

    ``path``
        The profile directory (created with mode 0700 if missing). It holds
        ``profile.db`` (SQLCipher; plus ``-wal``/``-shm`` while open) and ``key.json``.
    ``privacy_level``
        One of ``none``, ``segment``, ``behavioral``, ``contextual``, ``individual``.
        ``None`` keeps the stored level (``behavioral`` for a new profile). A level lower
        than the stored one *purges* what it does not collect, at open.
    ``key``
        A :class:`~ondevice.keys.KeyProvider`: :class:`~ondevice.keys.RawKey`,
        :class:`~ondevice.keys.Passphrase` or :class:`~ondevice.keys.Keychain`. ``None``
        means the OS keychain, and fails with KeychainUnavailableError if there is no
        secure one.
    ``policy``
        The declared signals, context fields, events, window and retention. ``None``
        keeps the stored policy (the defaults for a new profile). Fields no longer
        declared are purged at open.
    ``create``
        Create the profile if the directory holds none (else ProfileNotFoundError).
    ``clock``
        Returns Unix seconds; injectable for tests of retention.
    ``busy_timeout``
        Seconds to wait for another process's write lock.
    ``bundle``, ``bundle_public_key``
        A signed catalog bundle to load, and the operator's pinned Ed25519 public key
        (32 raw bytes) that every bundle must be signed with. The bundle is refused
        (BundleError) exactly when :meth:`load_bundle` would refuse it, an older one
        than this profile already accepted included.
    ``exclude_seen``
        Never recommend items already in the user's window (blocked and dismissed
        items are always excluded).
    ``sync``
        :class:`~ondevice.SyncSettings` to report the randomized segment with
        :meth:`sync`; None (the default) means the engine never uses the network.
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        privacy_level: PrivacyLevel | str | None = None,
        key: KeyProvider | None = None,
        policy: Policy | None = None,
        create: bool = True,
        clock: Callable[[], float] = time.time,
        busy_timeout: float = 10.0,
        bundle: str | os.PathLike[str] | None = None,
        bundle_public_key: bytes | Ed25519PublicKey | None = None,
        exclude_seen: bool = True,
        sync: SyncSettings | None = None,
    ) -> None:
        self._dir = Path(path).expanduser()
        if sync is not None and not isinstance(sync, SyncSettings):
            raise InvalidInputError("sync must be an ondevice.SyncSettings")
        self._sync_settings = sync
        self._bundle_key = bundle_public_key
        self._runtime: CatalogRuntime | None = None
        self._exclude_seen = bool(exclude_seen)
        # Verified before the profile is opened; recorded (downgrade check) once it is.
        verified = self._read_bundle(bundle) if bundle is not None else None
        self._clock = clock
        self._provider: KeyProvider = key if key is not None else Keychain()
        if not isinstance(self._provider, KeyProvider):
            raise InvalidInputError("key must be a RawKey, Passphrase or Keychain")
        if policy is not None and not isinstance(policy, Policy):
            raise InvalidInputError("policy must be an ondevice.Policy")
        wanted = PrivacyLevel.parse(privacy_level) if privacy_level is not None else None
        if not (isinstance(busy_timeout, int | float) and 0 < busy_timeout <= 3600):
            raise InvalidInputError("busy_timeout must be between 0 and 3600 seconds")
        self._busy_timeout = float(busy_timeout)
        self._purged_at: dict[str, float] = {}
        self._key = b""  # the data key this engine opened the database with
        self._store = self._open(create)
        try:
            if verified is not None:
                self._store.migrate()  # a newer profile is refused before anything is written
                self._use_bundle(*verified, allow_downgrade=False)
            self._level, self._policy = self._settle(wanted, policy)
        except BaseException:
            self._store.close()
            raise

    # -- opening ----------------------------------------------------------------------

    @property
    def _db_path(self) -> Path:
        return self._dir / DB_FILE

    def _open(self, create: bool) -> Store:
        if self._db_path.exists():
            return Store(self._connect_existing(), self._db_path)
        if not create:
            raise ProfileNotFoundError(f"no ondevice profile in {self._dir}")
        self._provider.check_available()
        try:
            self._dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        except OSError as exc:
            raise StorageError(f"cannot create {self._dir}: {exc.strerror}") from exc
        with key_lock(self._dir, self._busy_timeout):
            if self._db_path.exists():  # another process created it meanwhile
                return Store(self._connect_existing(locked=True), self._db_path)
            return self._create()

    def _create(self) -> Store:
        """Create the profile; the caller holds the key lock."""
        if key_files(self._dir):
            # Key material without a database: a creation interrupted before the
            # database was written. Nothing can be encrypted under it; start afresh.
            log.warning("removing key material left by an interrupted profile creation")
            rotation.destroy(self._dir, self._provider, strict=False)
        key = self._provider.create(self._dir)
        # Build the database under a temporary name and rename it into place, so an
        # existing profile.db always holds a complete schema: a crash mid-creation
        # leaves no half-made profile, and an empty profile.db can only be tampering.
        staging = self._dir / (DB_FILE + ".new")
        for suffix in ("", *_SIDE_FILES):
            Path(str(staging) + suffix).unlink(missing_ok=True)
        fd = os.open(staging, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        os.close(fd)
        store = Store(_db.connect(staging, key, busy_timeout=self._busy_timeout))
        try:
            store.migrate()
        finally:
            store.close()
        os.replace(staging, self._db_path)
        fsync_dir(self._dir)
        self._key = key
        return Store(
            _db.connect(self._db_path, key, busy_timeout=self._busy_timeout), self._db_path
        )

    def _connect_existing(self, *, locked: bool = False) -> _db.Connection:
        try:
            size = self._db_path.stat().st_size
        except OSError as exc:
            raise StorageError(f"cannot read {self._db_path}: {exc.strerror}") from exc
        if size == 0 or size % _PAGE_SIZE:
            # SQLite would take an empty file for a new database; a partial page is a
            # truncation. Either way the file is not the profile that was written.
            raise ProfileUnreadableError(UNREADABLE)

        def connect(key: bytes) -> _db.Connection:
            return _db.connect(self._db_path, key, busy_timeout=self._busy_timeout)

        if not locked and not rotation.unsettled(self._dir):
            before = _file_bytes(self._dir / KEY_FILE)
            try:
                conn, self._key = rotation.open_database(
                    self._dir, self._provider, connect, settle=False
                )
                return conn
            except (ProfileUnreadableError, KeyProviderError):
                changed = _file_bytes(self._dir / KEY_FILE) != before
                if not (changed or rotation.unsettled(self._dir)):
                    raise
                # A rotation ran meanwhile (pending now, or key.json switched): settle
                # it under the lock.
        # A rotation is pending (interrupted, or running in another process right
        # now): decide what to keep only while holding the key lock.
        with contextlib.nullcontext() if locked else key_lock(self._dir, self._busy_timeout):
            conn, self._key = rotation.open_database(
                self._dir, self._provider, connect, settle=True
            )
            return conn

    def _settle(
        self, wanted: PrivacyLevel | None, policy: Policy | None
    ) -> tuple[PrivacyLevel, Policy]:
        """Migrate the schema, reconcile level and policy with what is stored, and apply
        retention: the open-time minimization pass. It writes only when something is to
        be done, and runs the full retention pass when the last one is older than
        :data:`FULL_PURGE_INTERVAL` (each write also purges its own user's rows)."""
        self._store.migrate()
        now = self._clock()
        with self._store.read() as conn:
            meta = {k: Store.get_meta(conn, k) for k in _META_KEYS}
        stored_level = meta["privacy_level"]
        stored_policy = meta["policy"]
        level = wanted or (PrivacyLevel(stored_level) if stored_level else PrivacyLevel.BEHAVIORAL)
        old_policy = Policy.from_dict(_json(stored_policy)) if stored_policy else None
        new_policy = policy or old_policy or Policy()
        lowered = stored_level is not None and not level.allows(PrivacyLevel(stored_level))
        policy_changed = new_policy.to_json() != stored_policy
        last_purge = float(meta["last_purge"]) if meta["last_purge"] else None
        purge_due = last_purge is None or not 0 <= now - last_purge < FULL_PURGE_INTERVAL
        if not (
            lowered
            or policy_changed
            or purge_due
            or meta["profile_id"] is None
            or stored_level != level.value
        ):
            return level, new_policy
        purged = 0
        with self._store.write() as conn:
            if meta["profile_id"] is None:
                Store.set_meta(conn, "profile_id", str(uuid.uuid4()))
                Store.set_meta(conn, "created_at", repr(now))
            if stored_level is not None and stored_level != level.value:
                # Any change of level, up or down, purges what the new level does not
                # keep (moving up drops the segment level's stand-ins for the window).
                self._keep_taste_before_purge(
                    conn, PrivacyLevel(stored_level), level, now, new_policy.retention_days
                )
                purged += Store.purge_for_level(conn, level)
                log.info("privacy level changed from %s to %s", stored_level, level.value)
            if policy_changed:
                if old_policy is not None and policy is not None:
                    purged += _purge_changed_declarations(conn, old_policy, new_policy)
                purged += Store.purge_undeclared(conn, new_policy)
                if old_policy is None or new_policy.window < old_policy.window:
                    for user_id in Store.user_ids(conn):
                        purged += Store.enforce_window(conn, user_id, new_policy.window)
                Store.set_meta(conn, "policy", new_policy.to_json())
            if purge_due:
                purged += Store.purge_expired(conn, new_policy, now)
                Store.set_meta(conn, "last_purge", repr(now))
            if stored_level != level.value:
                Store.set_meta(conn, "privacy_level", level.value)
        if purged:
            self._store.checkpoint()
        return level, new_policy

    # -- properties ---------------------------------------------------------------------

    @property
    def path(self) -> Path:
        """The profile directory."""
        return self._dir

    @property
    def privacy_level(self) -> PrivacyLevel:
        """The current privacy level."""
        return self._level

    @property
    def policy(self) -> Policy:
        """The current policy (declarations, window, retention)."""
        return self._policy

    @property
    def closed(self) -> bool:
        """True after :meth:`close` or :meth:`wipe`."""
        return self._store.closed

    def now(self) -> float:
        """The engine's clock, in Unix seconds."""
        return float(self._clock())

    # -- writes -------------------------------------------------------------------------

    def update_profile(self, user_id: str, interaction: Interaction | Mapping[str, Any]) -> bool:
        """Record one interaction of ``user_id``, in one transaction.

        ``interaction`` is an :class:`~ondevice.Interaction` or a mapping with its fields
        (``item_id``, ``event``, ``timestamp``, ``value``, ``context``). It is validated
        against the policy first: an undeclared field raises PolicyViolationError,
        malformed input InvalidInputError, and nothing is written.

        What is stored depends on the privacy level (``none`` stores nothing). The
        rolling window and the retention period are enforced in the same transaction.
        Returns True if anything was stored (False at level ``none`` or when the
        interaction is already older than the retention period).
        """
        now = self.now()
        check_id(user_id, "user_id")
        it = self._policy.validate_interaction(interaction, now)
        return self._record({user_id: [it]}, now) > 0

    def update_profile_many(
        self, records: Iterable[tuple[str, Interaction | Mapping[str, Any]]]
    ) -> int:
        """Record many ``(user_id, interaction)`` pairs in one transaction.

        ``records`` is any iterable of pairs: a user id (``str``) and an interaction,
        given as for :meth:`update_profile` (an :class:`~ondevice.Interaction` or a
        mapping with its fields), for example ``[("alice", {"item_id": "sku-1",
        "event": "view"}), ("bob", Interaction("sku-2", "like"))]``. Users may be mixed
        and repeated. All records are validated before anything is written: one bad
        record (or a record that is not a pair) refuses the whole batch.

        Returns how many interactions were recorded: at ``segment`` in the counters and
        taste sums; from ``behavioral`` up as window rows (only the newest ``window``
        per user survive the call); 0 at ``none``.
        """
        now = self.now()
        policy = self._policy
        grouped: dict[str, list[Interaction]] = {}
        for n, record in enumerate(records):
            try:
                user_id, interaction = record
            except (TypeError, ValueError):
                raise InvalidInputError(
                    f"record {n} must be a (user_id, interaction) pair"
                ) from None
            bucket = grouped.get(user_id) if type(user_id) is str else None
            if bucket is None:
                check_id(user_id, "user_id")  # once per distinct user
                bucket = grouped[user_id] = []
            bucket.append(policy.validate_interaction(interaction, now))
        return self._record(grouped, now)

    def _record(self, grouped: dict[str, list[Interaction]], now: float) -> int:
        """Store validated interactions, grouped by user, in one transaction; how many
        were recorded (see :meth:`update_profile_many`)."""
        if self._level is PrivacyLevel.NONE or not grouped:
            return 0
        policy = self._policy
        cutoff = now - policy.retention_seconds
        stored = 0
        store = self._store
        # The hot path: _write() spelled out (no generator per call).
        with store.write(cached=True) as conn:
            if store.changed_elsewhere:
                self._follow_lowered_level(conn)
            # Read under the store lock: set_privacy_level changes it under the same lock.
            level: PrivacyLevel = self._level
            if level is PrivacyLevel.NONE:
                return 0
            keep_items = level.allows(PrivacyLevel.BEHAVIORAL)
            keep_context = level.allows(PrivacyLevel.CONTEXTUAL)
            for user_id, items in grouped.items():
                fresh = [it for it in items if it.timestamp is not None and it.timestamp >= cutoff]
                if not fresh:
                    continue
                stored += len(fresh)
                store.ensure_user_cached(conn, user_id, now)
                if level is PrivacyLevel.SEGMENT:
                    # Counters and taste sums stand in for the window the segment level
                    # does not keep; from behavioral up the window itself tells.
                    Store.count_activity(conn, user_id, fresh)
                if level is PrivacyLevel.SEGMENT and self._runtime is not None:
                    from . import _personalize

                    _personalize.add_to_aggregates(
                        conn,
                        user_id,
                        self._runtime,
                        fresh,
                        now,
                        retention_days=policy.retention_days,
                    )
                if keep_items:
                    if len(fresh) > policy.window:
                        # Only the newest `window` can survive: do not write the rest.
                        order = sorted(range(len(fresh)), key=lambda i: (fresh[i].timestamp, i))
                        fresh = [fresh[i] for i in sorted(order[-policy.window :])]
                    if keep_context:
                        fresh = [_live_context(it, policy, now) for it in fresh]
                    if len(fresh) == 1:
                        if not store.add_to_window(
                            conn, user_id, fresh[0], policy.window, keep_context=keep_context
                        ):
                            stored -= 1  # older than all of a full window: not kept
                    else:
                        store.forget_window(user_id)
                        Store.insert_interactions(conn, user_id, fresh, keep_context=keep_context)
                        Store.enforce_window(conn, user_id, policy.window)
                last = self._purged_at.get(user_id)
                if last is None or not 0 <= now - last < _USER_PURGE_INTERVAL:
                    if Store.purge_expired(conn, policy, now, user_id):
                        store.forget_window(user_id)
                    self._purged_at[user_id] = now
        return stored

    def set_signals(self, user_id: str, signals: Mapping[str, SignalValue]) -> bool:
        """Set declared profile signals of ``user_id`` (e.g. ``{"plan": "pro"}``).

        Every name must be declared in the policy and every value must fit its
        declaration, or nothing is written. Signals are stored from the ``segment``
        level up; at ``none`` they are validated and dropped (returns False).
        """
        check_id(user_id, "user_id")
        clean = self._policy.validate_signals(signals)
        now = self.now()
        with self._write() as conn:
            if self._level is PrivacyLevel.NONE:  # under the lock, as set_privacy_level
                return False
            Store.ensure_user(conn, user_id, now)
            Store.set_signals(conn, user_id, clean, now)
        return True

    @contextlib.contextmanager
    def _write(self, *, cached: bool = False) -> Iterator[_db.Connection]:
        """Every write of the engine goes through here: a write transaction that first
        follows a privacy level lowered by another engine (so no path stores what the
        lower level forbids), then hands the connection over. Code inside reads
        ``self._level`` for the level in force."""
        with self._store.write(cached=cached) as conn:
            if not cached or self._store.changed_elsewhere:
                self._follow_lowered_level(conn)
            yield conn

    def _level_in(self, conn: _db.Connection) -> PrivacyLevel:
        """The level in force inside a write transaction (a lowered one followed)."""
        self._follow_lowered_level(conn)
        return self._level

    def _follow_lowered_level(self, conn: _db.Connection) -> None:
        """Inside a write: if another engine on this profile lowered the stored level
        below this engine's, collect no more than that from now on (that engine has
        purged what the lower level does not keep). A raised stored level is not
        followed: this engine's host asked for less."""
        stored = Store.get_meta(conn, "privacy_level")
        if stored is None:
            return
        lowered = PrivacyLevel(stored)
        if not lowered.allows(self._level):
            log.info(
                "privacy level lowered to %s by another engine on this profile", lowered.value
            )
            self._level = lowered

    def set_privacy_level(self, level: PrivacyLevel | str) -> None:
        """Change the privacy level. Everything the new level does not keep is purged at
        once (and the purged rows are overwritten in the file): lowering drops what the
        lower level does not collect; raising past ``segment`` drops its per-day
        counters and taste sums, which the window replaces. Other engines open on the
        same profile follow a lowered level at their next write."""
        new = PrivacyLevel.parse(level)
        # The store lock spans the purge's commit and the switch: a write in another
        # thread sees the old level with the old data or the new level after the purge.
        with self._store.lock:
            with self._store.write() as conn:
                purged = 0
                if new is not self._level:
                    self._keep_taste_before_purge(
                        conn, self._level, new, self.now(), self._policy.retention_days
                    )
                    purged = Store.purge_for_level(conn, new)
                Store.set_meta(conn, "privacy_level", new.value)
            self._level = new
        if purged:
            self._store.checkpoint()

    def purge_expired(self) -> int:
        """Apply the retention rules now (they also run at open and on every write).
        Returns how many rows were deleted."""
        now = self.now()
        with self._store.write() as conn:
            purged = Store.purge_expired(conn, self._policy, now)
            Store.set_meta(conn, "last_purge", repr(now))
        if purged:
            self._store.checkpoint()
        return purged

    def _keep_taste_before_purge(
        self,
        conn: _db.Connection,
        old: PrivacyLevel,
        new: PrivacyLevel,
        now: float,
        retention_days: float,
    ) -> None:
        """Moving from a level with a window down to ``segment``: keep the window's
        taste as factor-space sums (no item ids) before the window is purged."""
        if new is not PrivacyLevel.SEGMENT or not old.allows(PrivacyLevel.BEHAVIORAL):
            return
        for user_id in Store.user_ids(conn):
            Store.count_activity(conn, user_id, Store.interactions(conn, user_id))
        if self._runtime is not None:
            from . import _personalize

            for user_id in Store.user_ids(conn):
                _personalize.aggregates_from_window(
                    conn,
                    user_id,
                    self._runtime,
                    now,
                    retention_days=retention_days,
                )

    # -- recommendations ----------------------------------------------------------------

    def _bundle_fallback(self) -> str:
        """What stays in use after a refused bundle, in words for the log."""
        runtime = getattr(self, "_runtime", None)
        return "keeping the previous one" if runtime is not None else "no catalog is loaded"

    def load_bundle(
        self, path: str | os.PathLike[str], *, allow_downgrade: bool = False
    ) -> BundleInfo:
        """Verify a catalog bundle against the pinned public key and start using it.

        A tampered, unsigned, wrongly signed, truncated or non-finite bundle raises
        BundleError and the previous bundle (if any) stays in use. So does a
        *downgrade*: the profile keeps the version (the signed ``created_at``) of the
        newest bundle it accepted, and a bundle created earlier, or a different one with
        the same ``created_at``, is refused (see :func:`ondevice.bundle.check_version`).
        ``allow_downgrade=True`` is the operator's escape hatch for rolling back a broken
        bundle on purpose: any validly signed bundle is accepted and becomes the newest
        (re-issuing the old catalog with a fresh ``created_at`` needs no escape hatch).

        The bundle is read into private memory and verified there: replacing,
        truncating or overwriting the file afterwards changes nothing. Returns the
        bundle's description.
        """
        runtime, info = self._read_bundle(path)
        self._use_bundle(runtime, info, allow_downgrade=allow_downgrade)
        return info

    def _read_bundle(self, path: str | os.PathLike[str]) -> tuple[CatalogRuntime, BundleInfo]:
        """Read and verify a bundle (no profile access)."""
        from .bundle import load_bundle_with_info
        from .levels import CatalogRuntime

        if self._bundle_key is None:
            raise InvalidInputError(
                "pin the operator's bundle signing key first: "
                "PersonalizationEngine(..., bundle_public_key=<32 bytes>)"
            )
        try:
            catalog, info = load_bundle_with_info(path, public_key=self._bundle_key)
        except BundleError as exc:
            log.warning("catalog bundle refused, %s: %s", self._bundle_fallback(), exc)
            raise
        return CatalogRuntime(catalog, info.sha256), info

    def _use_bundle(
        self, runtime: CatalogRuntime, info: BundleInfo, *, allow_downgrade: bool
    ) -> None:
        """Refuse a downgrade, record the bundle as the newest and start using it, in
        one step under the store's lock (and one write transaction across processes)."""
        from .bundle import VERSION_META_KEY, check_version, version_record

        where = f"catalog bundle {info.name!r}"
        record = version_record(info)
        with self._store.lock:
            try:
                with self._store.write() as conn:
                    newest = Store.get_meta(conn, VERSION_META_KEY)
                    try:
                        check_version(info, newest, where=where)
                    except BundleError as exc:
                        if not allow_downgrade:
                            raise
                        log.warning("accepted with allow_downgrade=True: %s", exc)
                    if newest != record:
                        Store.set_meta(conn, VERSION_META_KEY, record)
            except BundleError as exc:
                log.warning("catalog bundle refused, %s: %s", self._bundle_fallback(), exc)
                raise
            self._runtime = runtime
        log.info("catalog bundle %r loaded: %d items", info.name, info.n_items)

    @property
    def catalog(self) -> Catalog | None:
        """The catalog of the loaded bundle, or None."""
        return None if self._runtime is None else self._runtime.catalog

    def get_recommendations(
        self,
        user_id: str,
        context: Mapping[str, SignalValue] | None = None,
        k: int = 10,
        *,
        current_item: str | None = None,
        exclude: Iterable[str] = (),
    ) -> Recommendations:
        """Rank ``k`` items (1 to 10,000) for ``user_id``, on the device, with an
        explanation each.

        The engine's privacy level picks the method and what it may read; when that
        level lacks data (cold start, unknown user, empty window, a bundle without item
        vectors) the answer falls back down the chain individual, contextual,
        behavioral, segment, none, and says which level answered and why the others
        did not. ``context`` holds declared context fields (an undeclared one raises
        PolicyViolationError); ``current_item`` is what the user is looking at now (used,
        never stored). Items already in the window are excluded (see ``exclude_seen``),
        blocked items always, dismissed items while the dismissal is in the window, and
        ``exclude`` adds item ids the app knows the user has (used for this call, never
        stored: at levels ``none`` and ``segment`` the profile keeps no item ids to
        exclude by itself). Never touches the network.
        """
        import numpy as np

        from . import _personalize, levels
        from .levels import Request, individual

        check_id(user_id, "user_id")
        if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= 10_000:
            raise InvalidInputError(f"k must be an int between 1 and 10000; got {k!r}")
        ctx = self._policy.validate_context(context)
        if current_item is not None:
            check_id(current_item, "current_item")
        rt = self._runtime
        if rt is None:
            return Recommendations(
                (), PrivacyLevel.NONE, self._level, ("no catalog bundle is loaded",)
            )
        now = self.now()
        with self._store.read() as conn:
            state, window = _personalize.load_state(
                conn,
                user_id,
                self._level,
                rt,
                exclude_seen=self._exclude_seen,
                now=now,
                retention_days=self._policy.retention_days,
            )
        if (
            self._level is PrivacyLevel.INDIVIDUAL
            and state.user_vector is None
            and state.window.size
            and rt.has_factors
        ):
            state.user_vector = individual.fold_in(rt, state)
            digest = _personalize.window_digest(rt, window)
            blob = _personalize.encode_vector(state.user_vector, digest)
            with self._write() as conn:
                # Cache it only if the level still keeps it (another engine may have
                # lowered it) and the window it was computed from is still the window:
                # a wipe_profile (or a write) in between must not be undone by a stale
                # vector of a user who asked to be forgotten.
                now_window = Store.interactions(conn, user_id, with_context=False)
                if (
                    self._level is PrivacyLevel.INDIVIDUAL
                    and now_window
                    and _personalize.window_digest(rt, now_window) == digest
                ):
                    Store.set_derived(conn, user_id, _personalize.USER_VECTOR, blob, now)
        extra = [
            rt.index[i] for i in (check_id(x, "exclude item") for x in exclude) if i in rt.index
        ]
        if extra:
            state.excluded = np.union1d(state.excluded, np.asarray(extra, dtype=np.int64))
        current = rt.index.get(current_item) if current_item is not None else None
        return levels.recommend(self._level, rt, state, Request(k, now, ctx, current))

    # -- sync: the only thing that leaves the device -------------------------------------

    def sync(self, user_id: str) -> SyncOutcome:
        """Report ``user_id``'s segment for the current epoch (ISO week) when it is due,
        at most once per epoch.

        The first call of a week draws the report's random moment in the week and
        returns ``scheduled``; a call at or after that moment sends it (see
        :meth:`sync_due` to serve every local user from one timer). The segment is
        assigned locally; its memo (drawn once per true segment at
        ``SyncSettings.epsilon_inf``, spending the lifetime budget) is randomized afresh
        at ``epsilon_1``, built into the one allowed message, written to the encrypted
        egress log, and only then sent on its own connection. A failed send is retried
        by a later call with backoff, resending the same logged bytes. Recommendations
        never depend on this: they use the true segment, locally. The full procedure
        is in :mod:`ondevice.reporting`.

        Raises SyncError when sync is not configured or no catalog is loaded. Network
        failures are not raised: the outcome says ``failed``.
        """
        return self._reporter().sync(
            user_id,
            level=self._level,
            level_in=self._level_in,
            runtime=self._runtime,
            retention_days=self._policy.retention_days,
        )

    def sync_due(self) -> list[SyncOutcome]:
        """Run :meth:`sync` for every local user: schedules this week's reports and
        sends those that are due, never two of them back to back (a report due less
        than ``SyncSettings.min_gap`` after another is pushed back). Call it from a
        timer (every few minutes) while the app runs. Returns one outcome per user; a
        user whose report raised an OndeviceError gets status ``error`` with the
        reason, and the others are still served."""
        with self._store.read() as conn:
            users = Store.user_ids(conn)
        outcomes = []
        for user_id in users:
            try:
                outcomes.append(self.sync(user_id))
            except (ProfileClosedError, ProfileGoneError):
                raise  # the whole profile is gone: nobody can be served
            except OndeviceError as exc:  # one user's trouble never blocks the others
                outcomes.append(SyncOutcome(user_id, "error", reason=str(exc)))
        return outcomes

    def _reporter(self) -> Reporter:
        settings = self._sync_settings
        if settings is None:
            raise SyncError("sync is not configured: pass sync=SyncSettings(server_url=...)")
        return Reporter(self._store, settings, self._clock, directory=self._dir)

    def fetch_featured(self) -> int:
        """Fetch the server's featured items for *all* segments (the same bytes for every
        device, so fetching reveals nothing about this one) and blend this device's own
        segment row into the ``segment`` level, chosen locally. Returns how many
        segments have featured items. Raises SyncError on failure; recommendations keep
        working without it."""
        from ondevice_sync import client as sync_client
        from ondevice_sync import errors as sync_errors

        settings = self._sync_settings
        if settings is None:
            raise SyncError("sync is not configured: pass sync=SyncSettings(server_url=...)")
        rt = self._runtime
        if rt is None:
            raise SyncError("load a catalog bundle first: the segments come from it")
        try:
            client = sync_client.SyncClient(
                base_url=settings.server_url,
                transport=settings.transport,
                timeout=settings.timeout,
            )
            table = client.fetch_content()
        except sync_errors.SyncError as exc:
            raise SyncError(f"cannot fetch the featured items: {exc}") from exc
        k = segment_count(rt)
        if table.k != k:
            raise SyncError(
                f"the server's content table has {table.k} segments, the catalog {k}: "
                "they belong to different bundles"
            )
        ours = (settings.epsilon_inf, settings.epsilon_1)
        theirs = (table.epsilon_inf, table.epsilon_1)
        if not all(math.isclose(a, b, rel_tol=1e-9) for a, b in zip(ours, theirs, strict=True)):
            # Reports under another channel would bias the operator's estimates.
            raise SyncError(
                "the server estimates with epsilon_inf={:.4f}, epsilon_1={:.4f}; this "
                "device reports with {:.4f}, {:.4f}: align SyncSettings with the "
                "operator's".format(*theirs, *ours)
            )
        rt.featured = {
            seg: [rt.index[i] for i in row if i in rt.index] for seg, row in enumerate(table.rows)
        }
        return sum(1 for row in rt.featured.values() if row)

    def block_item(self, user_id: str, item_id: str) -> None:
        """Never recommend ``item_id`` to ``user_id`` again (kept until unblocked).

        The block list holds item ids, so it is kept from the ``behavioral`` level up;
        at lower levels this raises PolicyViolationError.
        """
        check_id(user_id, "user_id")
        check_id(item_id, "item_id")
        self._require(PrivacyLevel.BEHAVIORAL, "blocking items")
        now = self.now()
        with self._write() as conn:
            self._require(PrivacyLevel.BEHAVIORAL, "blocking items")  # a level lowered since
            Store.ensure_user(conn, user_id, now)
            Store.restore_blocks(conn, user_id, [(item_id, now)])

    def unblock_item(self, user_id: str, item_id: str) -> bool:
        """Lift a block; returns False if the item was not blocked."""
        check_id(user_id, "user_id")
        check_id(item_id, "item_id")
        with self._write() as conn:
            removed = Store.delete_block(conn, user_id, item_id)
        return removed

    def _require(self, level: PrivacyLevel, what: str) -> None:
        if not self._level.allows(level):
            raise PolicyViolationError(
                f"{what} needs privacy level {level.value!r} or higher (now {self._level.value!r})"
            )

    # -- transparency -------------------------------------------------------------------

    def users(self) -> list[str]:
        """The user ids that have a profile, sorted."""
        with self._store.read() as conn:
            return Store.user_ids(conn)

    def verify(self) -> int:
        """Check the authentication code of every page of the database and its
        structure; return the number of pages checked.

        Ordinary reads check only the pages they touch, so a damaged page that no read
        reaches (an empty table's root, say) goes unnoticed until something reads it.
        ``verify()`` reads them all: any page that fails its HMAC, or a damaged B-tree,
        raises ProfileUnreadableError (the same error as a wrong key or a tampered
        file). Nothing is written. It takes about as long as reading the whole file.
        """
        from .keys import UNREADABLE

        with self._store.read() as conn:
            failures = conn.execute("PRAGMA cipher_integrity_check").fetchall()
            structure = conn.execute("PRAGMA integrity_check(1)").fetchone()
            pages = int(conn.execute("PRAGMA page_count").fetchone()[0])
        if failures or structure is None or structure[0] != "ok":
            log.warning(
                "profile verification failed: %d page(s) did not authenticate", len(failures)
            )
            raise ProfileUnreadableError(UNREADABLE)
        return pages

    def report(self, user_id: str | None = None) -> ProfileReport:
        """What is stored (about ``user_id``, or everyone) and why: every field with its
        purpose and retention, and per user what the profile holds."""
        if user_id is not None:
            check_id(user_id, "user_id")
        users: list[UserReport] = []
        with self._store.read() as conn:
            ids = [user_id] if user_id is not None else Store.user_ids(conn)
            for uid in ids:
                row = Store.user_row(conn, uid)
                if row is None:
                    continue
                window = Store.interactions(conn, uid)
                users.append(
                    UserReport(
                        user_id=uid,
                        created_at=row[1],
                        signals={n: v for n, v, _ in Store.signals(conn, uid)},
                        interactions=len(window),
                        oldest_interaction=window[0].timestamp if window else None,
                        newest_interaction=window[-1].timestamp if window else None,
                        context_values=sum(len(i.context) for i in window),
                        active_days=len(
                            {d for d, _, _ in Store.activity(conn, uid)}
                            | {int((i.timestamp or 0) // 86400) for i in window}
                        ),
                        derived=tuple(n for n, _, _ in Store.derived(conn, uid)),
                        blocked_items=len(Store.blocks(conn, uid)),
                        reports_sent=sum(
                            1 for e in Store.egress(conn, uid) if e["status"] == "sent"
                        ),
                        privacy_budget=self._budget(conn, uid),
                    )
                )
        return ProfileReport(
            privacy_level=self._level,
            window=self._policy.window,
            retention_days=self._policy.retention_days,
            fields=tuple(self._policy.purposes()),
            users=tuple(users),
        )

    def _budget(self, conn: _db.Connection, user_id: str) -> dict[str, Any]:
        """The lifetime privacy budget: both epsilons, the cap, what is spent and left."""
        settings = self._sync_settings or SyncSettings(server_url="http://unset.invalid")
        return budget_summary(conn, user_id, self.now(), settings)

    def export_profile(self, user_id: str | None = None) -> dict[str, Any]:
        """Everything stored about ``user_id`` (or about every user), with each field's
        purpose, as a JSON-ready dict in the documented export format
        (:mod:`ondevice.export`). Nothing is written to disk."""
        if user_id is not None:
            check_id(user_id, "user_id")
        with self._store.read() as conn:
            ids = [user_id] if user_id is not None else Store.user_ids(conn)
            users = [_export_user(conn, uid) for uid in ids if Store.user_row(conn, uid)]
            for user in users:
                user["privacy_budget"] = self._budget(conn, user["user_id"])
        return {
            "format": EXPORT_FORMAT,
            "version": EXPORT_VERSION,
            "exported_at": self.now(),
            "schema_version": SCHEMA_VERSION,
            "privacy_level": self._level.value,
            "policy": self._policy.to_dict(),
            "purposes": [p.to_dict() for p in self._policy.purposes()],
            "users": users,
        }

    def export_profile_to(
        self,
        path: str | os.PathLike[str],
        *,
        user_id: str | None = None,
        passphrase: str | bytes | None = None,
        allow_plaintext: bool = False,
    ) -> Path:
        """Write an export file atomically (mode 0600) and return its path.

        The file holds what :meth:`export_profile` returns: everything stored about
        ``user_id``, or about every user when ``user_id`` is None. With ``passphrase``
        the file is encrypted (AES-256-GCM, Argon2id). Writing a readable, plaintext
        export needs ``allow_plaintext=True``: nothing readable reaches the disk unless
        the caller asks for it explicitly. :meth:`import_profile` reads it back.
        """
        if passphrase is None and not allow_plaintext:
            raise InvalidInputError(
                "an export file is encrypted unless you ask otherwise: pass passphrase=... "
                "or allow_plaintext=True"
            )
        data = encode_export(self.export_profile(user_id), passphrase=passphrase)
        target = Path(path).expanduser()
        try:
            write_atomic(target, data)
        except OSError as exc:
            raise StorageError(f"cannot write {target}: {exc.strerror}") from exc
        return target

    def import_profile(
        self,
        source: Mapping[str, Any] | str | os.PathLike[str] | bytes,
        *,
        passphrase: str | bytes | None = None,
    ) -> list[str]:
        """Restore users from an export (a dict, a file path, or the file's bytes).

        Each user in the export replaces that user's profile, all in one transaction:
        an invalid export (undeclared signals, malformed interactions, wrong passphrase)
        raises and writes nothing. What the current privacy level does not collect is
        dropped, and retention and the window apply. Returns the imported user ids.
        """
        doc = self._read_export(source, passphrase)
        now = self.now()
        policy = self._policy
        plans = [_plan_user(u, policy, now) for u in doc["users"]]
        if self._level is PrivacyLevel.NONE:
            return []
        with self._write() as conn:
            # A level lowered elsewhere is followed by _write.
            level: PrivacyLevel = self._level
            if level is PrivacyLevel.NONE:
                return []
            for plan in plans:
                Store.delete_user(conn, plan.user_id)
                Store.ensure_user(conn, plan.user_id, plan.created_at)
                if plan.signals:
                    for name, (value, updated) in plan.signals.items():
                        Store.set_signals(conn, plan.user_id, {name: value}, updated)
                if level is PrivacyLevel.SEGMENT:
                    # Only the segment level keeps counters (the window tells the rest).
                    Store.restore_activity(conn, plan.user_id, plan.activity)
                    if plan.interactions:
                        Store.count_activity(conn, plan.user_id, plan.interactions)
                kept = {
                    f.name.removeprefix("derived.")
                    for f in policy.purposes()
                    if f.name.startswith("derived.") and f.collected_at(level)
                }
                for name, blob, updated in plan.derived:
                    if name in kept:
                        Store.set_derived(conn, plan.user_id, name, blob, updated)
                if level.allows(PrivacyLevel.BEHAVIORAL):
                    Store.insert_interactions(
                        conn,
                        plan.user_id,
                        plan.interactions,
                        keep_context=level.allows(PrivacyLevel.CONTEXTUAL),
                    )
                    Store.enforce_window(conn, plan.user_id, policy.window)
                    Store.restore_blocks(conn, plan.user_id, plan.blocks)
                Store.restore_egress(conn, plan.user_id, plan.egress)
                if plan.egress:
                    tag = Store.ledger_tag(conn, plan.user_id)
                    for e in plan.egress:
                        Store.spend(conn, tag, e["epoch"], e["epsilon"], e["created_at"])
                Store.purge_expired(conn, policy, now, plan.user_id)
        return [p.user_id for p in plans]

    def _read_export(
        self, source: Mapping[str, Any] | str | os.PathLike[str] | bytes, passphrase: Any
    ) -> dict[str, Any]:
        if isinstance(source, Mapping):
            if source.get("format") != EXPORT_FORMAT:
                raise ExportError("not an ondevice export (unknown format)")
            return decode_export(_dumps(source), passphrase=None)
        if isinstance(source, bytes):
            return decode_export(source, passphrase=passphrase)
        if not isinstance(source, str | os.PathLike):
            raise InvalidInputError("import a dict, the file's bytes, or a path to the file")
        raw = read_export_file(Path(source).expanduser())
        return decode_export(raw, passphrase=passphrase)

    # -- forgetting ---------------------------------------------------------------------

    def wipe_profile(self, user_id: str) -> bool:
        """Delete everything stored about ``user_id``. The rows are overwritten in the
        database pages (``secure_delete``) and the WAL is checkpointed and truncated.
        Returns False if there was no such user."""
        check_id(user_id, "user_id")
        with self._store.write() as conn:
            deleted = Store.delete_user(conn, user_id)
        self._store.checkpoint()
        return deleted > 0

    def wipe(self) -> None:
        """Forget everything: crypto-shred the profile.

        Destroys the key material this SDK keeps (every key file is overwritten in
        place and deleted, every keychain entry they name deleted), then deletes the
        database, WAL and SHM files. A copy of the database taken before cannot be
        opened with anything left behind. A :class:`~ondevice.keys.RawKey` lives in the
        host app: forget it there. What no software can promise: a *backup* of the key
        file plus the passphrase reopens a *backup* of the database, and SSDs,
        copy-on-write file systems and snapshots may keep old blocks of an overwritten
        key file (see :mod:`ondevice.keys`). The engine is closed afterwards.
        """
        self._store.close()
        with key_lock(self._dir, self._busy_timeout):
            rotation.destroy(self._dir, self._provider)
        (self._dir / LOCK_FILE).unlink(missing_ok=True)
        (self._dir / SEND_LOCK_FILE).unlink(missing_ok=True)
        for suffix in ("", *_SIDE_FILES):
            try:
                (self._dir / (DB_FILE + suffix)).unlink(missing_ok=True)
            except OSError as exc:
                raise StorageError(
                    f"the key was destroyed but {DB_FILE}{suffix} could not be deleted: "
                    f"{exc.strerror}"
                ) from exc
        fsync_dir(self._dir)
        with contextlib.suppress(OSError):
            self._dir.rmdir()  # only if empty: never delete the host app's own files

    # -- keys ---------------------------------------------------------------------------

    def change_passphrase(
        self, new_passphrase: str | bytes, *, kdf: Argon2Params | None = None
    ) -> None:
        """Re-wrap the data key under a new passphrase (the database is not
        re-encrypted), with ``kdf`` (the default Argon2id parameters if None). Only for
        profiles protected by a passphrase.

        Crash-safe like :meth:`rekey`: the re-wrapped key is written as *pending* first,
        and a profile interrupted mid-change opens with the old or the new passphrase.
        The old ``key.json`` (the data key wrapped under the old passphrase) is
        overwritten in place before the new one replaces it, so its blocks do not keep
        a key the old passphrase unwraps (as far as the file system rewrites in place:
        see :mod:`ondevice.keys`)."""
        if not isinstance(self._provider, Passphrase):
            raise KeyProviderError("this profile is not protected by a passphrase")
        new = Passphrase(new_passphrase, kdf=kdf)

        def switched() -> None:
            self._provider = new

        with key_lock(self._dir, self._busy_timeout):
            self._check_key_is_current()
            rotation.rotate(
                self._dir,
                old=self._provider,
                new=new,
                new_key=self._key,
                reencrypt=None,
                opens_with_old_key=lambda: True,
                switched=switched,
            )

    def rekey(self, key: KeyProvider | None = None) -> None:
        """Rotate the data key: re-encrypt the whole database under a new random key
        (or the given :class:`~ondevice.keys.RawKey`), optionally moving to another key
        provider. Crash-safe (see :mod:`ondevice.rotation`): the new key is stored as
        *pending* before the database is re-encrypted, the old key material is destroyed
        only after, and a profile interrupted at any step opens with the old or the new
        key, the next open finishing or undoing the rotation. Other engines (threads or
        processes) that had the profile open keep the old key and fail with
        ProfileUnreadableError at their next read: reopen them."""
        new = key if key is not None else self._provider
        if not isinstance(new, KeyProvider):
            raise InvalidInputError("key must be a RawKey, Passphrase or Keychain")
        new_key = new._initial_key()
        old_key = self._key

        def reencrypt(data_key: bytes) -> None:
            with self._store.lock, _db.translating():
                conn = self._store.conn
                # Synced at commit: the re-encryption is on disk before the old key goes.
                conn.execute("PRAGMA synchronous = FULL")
                try:
                    conn.execute(f"PRAGMA rekey = \"x'{data_key.hex()}'\"")
                finally:
                    conn.execute("PRAGMA synchronous = NORMAL")
            # Frames written under the old key must not outlive the rotation in the WAL:
            # truncate it now (or as soon as another connection's read lets it).
            self._store.checkpoint()

        def opens_with_old_key() -> bool:
            try:
                _db.connect(self._db_path, old_key, busy_timeout=self._busy_timeout).close()
            except OndeviceError:
                return False
            return True

        def switched() -> None:
            self._provider, self._key = new, new_key

        with key_lock(self._dir, self._busy_timeout):
            self._check_key_is_current()
            rotation.rotate(
                self._dir,
                old=self._provider,
                new=new,
                new_key=new_key,
                reencrypt=reencrypt,
                opens_with_old_key=opens_with_old_key,
                switched=switched,
            )
        log.info("profile data key rotated")

    def _check_key_is_current(self) -> None:
        """Refuse a key change from an engine whose key is no longer the profile's: a
        rotation elsewhere finished or was interrupted since this engine opened. The
        caller holds the key lock."""
        if rotation.unsettled(self._dir):
            raise KeyProviderError(
                "a key rotation is unfinished: reopen the profile to finish it first"
            )
        try:
            loaded = self._provider.load_candidates(self._dir)
        except ProfileUnreadableError:  # key.json no longer opens with this secret
            loaded = []
        current = [k for k, pending in loaded if not pending]
        if current != [self._key]:
            raise KeyProviderError(
                "the profile was re-keyed since this engine opened it: reopen it first"
            )
        with self._store.lock, _db.translating():
            self._store.conn.execute("SELECT count(*) FROM sqlite_master").fetchone()

    # -- lifecycle ----------------------------------------------------------------------

    def close(self) -> None:
        """Close the profile (idempotent). Committed data is already on disk."""
        self._store.close()

    def __enter__(self) -> PersonalizationEngine:
        if self._store.closed:
            raise ProfileClosedError("the engine is closed")
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def __repr__(self) -> str:
        state = "closed" if self.closed else self._level.value
        return f"PersonalizationEngine({str(self._dir)!r}, {state})"


# -- helpers --------------------------------------------------------------------------


def _json(text: str) -> Any:
    import json

    return json.loads(text)


def _dumps(data: Mapping[str, Any]) -> bytes:
    import json

    try:
        return json.dumps(data).encode("utf-8")
    except (TypeError, ValueError) as exc:
        raise ExportError(f"malformed export: {exc}") from exc


def _live_context(it: Interaction, policy: Policy, now: float) -> Interaction:
    """The interaction without the context fields whose retention has already run out
    at its timestamp (they would be purged at once: never write them)."""
    if not it.context or it.timestamp is None:
        return it
    keep = {
        name: value
        for name, value in it.context.items()
        if it.timestamp >= now - policy.context_field(name).retention_days * 86400.0
    }
    return it if len(keep) == len(it.context) else dataclasses.replace(it, context=keep)


def _file_bytes(path: Path) -> bytes | None:
    try:
        return path.read_bytes()
    except OSError:
        return None


def _purge_changed_declarations(conn: _db.Connection, old: Policy, new: Policy) -> int:
    """Delete stored values whose declaration changed shape (type, choices, length):
    they were validated against rules that no longer hold."""
    total = 0
    for kind, table, old_fields, new_fields in (
        ("signal", "signals", old.signals, new.signals),
        ("context", "context", old.context, new.context),
    ):
        before = {f.name: f for f in old_fields}
        for f in new_fields:
            prev = before.get(f.name)
            if prev is not None and (prev.type, prev.choices, prev.max_length) != (
                f.type,
                f.choices,
                f.max_length,
            ):
                log.info("%s %r changed its declaration: purging its stored values", kind, f.name)
                total += conn.execute(f"DELETE FROM {table} WHERE name = ?", (f.name,)).rowcount
    return total


def _export_user(conn: _db.Connection, user_id: str) -> dict[str, Any]:
    row = Store.user_row(conn, user_id)
    assert row is not None
    return {
        "user_id": user_id,
        "created_at": row[1],
        "signals": [
            {"name": n, "value": v, "updated_at": t} for n, v, t in Store.signals(conn, user_id)
        ],
        "interactions": [i.to_dict() for i in Store.interactions(conn, user_id)],
        "activity": [
            {"day": day_to_iso(d), "event": e, "count": c}
            for d, e, c in Store.activity(conn, user_id)
        ],
        "derived": [
            {"name": n, "value_b64": base64.b64encode(v).decode("ascii"), "updated_at": t}
            for n, v, t in Store.derived(conn, user_id)
        ],
        "blocked_items": [{"item_id": i, "created_at": t} for i, t in Store.blocks(conn, user_id)],
        "egress": Store.egress(conn, user_id),
        "report_memos": Store.memos(conn, user_id),
        "report_schedule": _schedule_entry(
            Store.schedule(conn, Store.ledger_tag_if_any(conn, user_id))
        ),
    }


def _schedule_entry(scheduled: tuple[str, float] | None) -> dict[str, Any] | None:
    """The export's form of a user's report schedule (None when nothing is scheduled)."""
    return None if scheduled is None else {"epoch": scheduled[0], "due_at": scheduled[1]}


@dataclass(slots=True)
class _UserPlan:
    user_id: str
    created_at: float
    signals: dict[str, tuple[SignalValue, float]]
    interactions: list[Interaction]
    activity: list[tuple[int, str, int]]
    derived: list[tuple[str, bytes, float]]
    blocks: list[tuple[str, float]]
    egress: list[dict[str, Any]]


def _num(value: Any, what: str) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ExportError(f"malformed export: {what} must be a number")
    return float(value)


def _time(value: Any, what: str, now: float, policy: Policy) -> float:
    """An exported timestamp: finite, not before 1970 and not in this device's future
    (a time far ahead would outlive retention forever)."""
    when = _num(value, what)
    if not 0.0 <= when <= now + policy.max_future_seconds:  # NaN fails too
        raise ExportError(f"malformed export: {what} is not a time up to now")
    return when


#: The largest per-day activity count an import accepts (SQLite integers are 64-bit).
_MAX_ACTIVITY_COUNT: Final = 2**31 - 1


def _plan_user(data: Any, policy: Policy, now: float) -> _UserPlan:
    """Validate one exported user completely, before any write."""
    from ondevice_sync.protocol import epoch_of, shift_epoch

    if not isinstance(data, Mapping):
        raise ExportError("malformed export: each user must be an object")
    try:
        user_id = check_id(data.get("user_id"), "user_id")
        created = _time(data.get("created_at"), "created_at", now, policy)
        signals: dict[str, tuple[SignalValue, float]] = {}
        for s in data.get("signals", []):
            clean = policy.validate_signals({s["name"]: s["value"]})
            updated = _time(s["updated_at"], "updated_at", now, policy)
            signals[s["name"]] = (clean[s["name"]], updated)
        # Imported history may be older than the window of "now"-relative checks, but
        # never in the future of this device's clock.
        interactions = [policy.validate_interaction(i, now) for i in data.get("interactions", [])]
        activity = []
        today = int((now + policy.max_future_seconds) // 86400)
        for a in data.get("activity", []):
            event = a["event"]
            if event not in policy.events:
                raise PolicyViolationError("an exported activity event is not declared")
            count = a["count"]
            if (
                isinstance(count, bool)
                or not isinstance(count, int)
                or not 1 <= count <= _MAX_ACTIVITY_COUNT
            ):
                raise ExportError("malformed export: activity count must be a positive int")
            day = iso_to_day(a["day"])
            if day > today:
                raise ExportError("malformed export: an activity day is in the future")
            activity.append((day, event, count))
        derived = []
        for d in data.get("derived", []):
            name = d["name"]
            if name not in _DERIVED_NAMES:
                raise PolicyViolationError(f"derived state {name!r} is not declared")
            blob = base64.b64decode(d["value_b64"], validate=True)
            derived.append((name, blob, _time(d["updated_at"], "updated_at", now, policy)))
        blocks = [
            (check_id(b["item_id"], "item_id"), _time(b["created_at"], "created_at", now, policy))
            for b in data.get("blocked_items", [])
        ]
        egress = [_egress_entry(e) for e in data.get("egress", [])]
        for e in egress:
            # A report "made" in the future would hold this week's slot, or a later one.
            _time(e["created_at"], "an egress entry's time", now, policy)
            # Logged in its week, or (sent late) in the week after.
            logged_in = epoch_of(e["created_at"])
            if e["epoch"] not in (logged_in, shift_epoch(logged_in, -1)):
                raise ExportError("malformed export: an egress entry's week and time differ")
    except (KeyError, TypeError, ValueError, AttributeError, OverflowError) as exc:
        if isinstance(exc, OndeviceError):
            raise
        # Name the kind of problem, never the exported value (messages reach logs).
        raise ExportError(
            f"malformed export: a user entry is invalid ({type(exc).__name__})"
        ) from None
    return _UserPlan(user_id, created, signals, interactions, activity, derived, blocks, egress)


_LOGGED_ANSWER: Final = re.compile(r"\A(?:[0-9]{3}(?: counted| refused)?|[A-Za-z]{1,64})\Z")
"""What the egress log keeps of an answer: a status code or an error class name."""

_LOGGED_REPORT: Final = re.compile(
    r'\A\{"version":[12],"epoch":"([0-9]{4}-W[0-9]{2})","segment":"[0-9]{2}"\}\Z'
)
"""A logged report: the canonical message of protocol version 1 (single-layer, 0.1) or
2 (two-layer). Logs keep what left, whichever version it was."""


def _egress_entry(e: Mapping[str, Any]) -> dict[str, Any]:
    """Validate one exported egress-log entry (raises KeyError/TypeError/ValueError)."""
    from ondevice_sync.protocol import parse_epoch

    body = e["body"]
    if not isinstance(body, str):
        raise TypeError("egress body must be text")
    logged = _LOGGED_REPORT.match(body)
    if logged is None:
        raise ValueError("egress body is not a report")
    epoch = logged.group(1)
    parse_epoch(epoch)  # a real ISO week
    status = e["status"]
    if status not in ("pending", "sent", "failed", "refused", "unsent"):
        raise ValueError(f"unknown egress status {status!r}")
    if status in ("pending", "failed"):
        # Never resent from here: the report was logged (and maybe delivered) by the
        # profile that exported it, and the ledger counts its week.
        status = "unsent"
    attempts = e.get("attempts", 0)
    if isinstance(attempts, bool) or not isinstance(attempts, int) or attempts < 0:
        raise ValueError("egress attempts must be a non-negative int")
    optional: dict[str, float | None] = {}
    for name in ("sent_at", "next_attempt", "epsilon_1"):
        value = e.get(name)
        optional[name] = None if value is None else _num(value, name)
    if optional["epsilon_1"] is not None and not 0.0 < optional["epsilon_1"] <= 20.0:
        raise ValueError("egress epsilon_1 out of range")
    answer = e.get("answer")
    if answer is not None and not isinstance(answer, str):
        raise TypeError("egress answer must be text")
    if answer is not None and not _LOGGED_ANSWER.match(answer):
        answer = None  # only a status code or an error class name is ever kept
    epsilon = _num(e["epsilon"], "epsilon")
    if not 0.0 <= epsilon <= 20.0:  # finite, and within what ondevice_sync.privacy accepts
        raise ValueError("egress epsilon out of range")
    if e["epoch"] != epoch:
        raise ValueError("egress epoch does not match its report")
    created = _num(e["created_at"], "created_at")
    if not math.isfinite(created):
        raise ValueError("egress time must be finite")
    return {
        "epoch": epoch,
        "body": body,
        "epsilon": epsilon,
        "created_at": created,
        "status": status,
        "answer": answer,
        "attempts": attempts,
        **optional,
    }


_DERIVED_NAMES: Final = frozenset({"user_vector", "taste_aggregates"})
