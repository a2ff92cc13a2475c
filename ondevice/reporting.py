"""The segment report on the device, end to end: assignment, memo, budget, schedule,
egress log and send. :class:`Reporter` is what ``PersonalizationEngine.sync`` and
``sync_due`` delegate to; this module can be read on its own.

What one ``sync(user_id)`` does, in one write transaction and then one request:

1. **Clock.** The reporting clock is ``max(clock, report_clock)``, where ``report_clock``
   (in the encrypted profile) is the largest time any sync has seen. Setting the clock
   back therefore never reopens a week already reported, and the ledger expires on a
   clock that never goes back. An *open* under a wrong clock moves nothing here.
2. **One report per week.** A week with a row in the budget ledger (keyed tag of the
   user, no user id; kept through ``wipe_profile`` and level changes) or in the egress
   log is never reported again; a failed send is retried with the *same* logged bytes.
3. **Schedule.** The week's report is due at an independent random moment between the
   first sync of the week and the week's end, drawn once and stored; ``sync`` before
   then returns ``scheduled``. A report that did not leave within its week (its
   moment was pushed past the end, or the app was closed) leaves at the next sync,
   labelled with its week (the server accepts the previous week), before the new
   week's. Two reports of this profile (several local users) are at least
   ``min_gap`` apart: one due sooner after the last send is pushed back to a random
   moment ``min_gap`` to ``2 * min_gap`` after that send. Each report is one request on
   its own connection (``Connection: close``).
4. **Memo.** The true segment (chosen locally from the catalog's segment definitions)
   selects its memo; a segment without one draws it now at ``epsilon_inf`` if the
   lifetime budget (``lifetime_cap`` over 365 days of the reporting clock) allows, and
   the ledger records the spend. Otherwise the device repeats its last memo or sends
   nothing (``when_spent``), and the outcome says which.
5. **Report.** A fresh randomization of the memo at ``epsilon_1`` becomes the one
   allowed 47-byte message, which is written to the egress log before it is sent.

Memos and the egress log are a user's data (declared purposes, exported, deleted by
``wipe_profile`` and at level ``none``). The schedule, the ledger and the reporting clock
are the profile's (keyed tags, no user id): kept through ``wipe_profile``, level changes
and imports, expired on the reporting clock, destroyed by ``wipe()``.

What a restored backup can still do
-----------------------------------
Copying the profile's files back from a backup restores their ledger, memos and
reporting clock as they were. Weeks reported after the backup can then be reported once
more, and memos drawn after the backup are drawn again (spending budget the restored
ledger does not remember). Repeated reports of a segment whose memo was in the backup
still reveal nothing beyond ``epsilon_inf`` about it; only segments first held after the
backup can leak up to ``epsilon_inf`` once more per restore. No software on the device
can tell a restored file from the original.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import random
import secrets
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final

from . import _db
from .errors import SyncError
from .policy import PrivacyLevel, check_id
from .store import Store
from .sync_settings import SyncOutcome, SyncSettings

if TYPE_CHECKING:
    from .levels import CatalogRuntime

__all__ = [
    "LIFETIME_PERIOD_DAYS",
    "SEND_LOCK_FILE",
    "Reporter",
    "budget_summary",
    "segment_count",
]

log = logging.getLogger(__name__)

LIFETIME_PERIOD_DAYS: Final = 365.0
"""The rolling period of the lifetime budget, in days of the reporting clock."""

SEND_LOCK_FILE: Final = "sync.lock"
"""The file in the profile directory an engine holds an OS lock on while it sends: a
second engine (thread or process) never takes over a report that is still in flight,
however long the send takes or however the clock moves. The OS drops the lock of a
killed process, and the report is then resent (the same bytes) after its lease."""

_LEASE_MARGIN: Final = 30.0
_SYSTEM_RANDOM: Final = secrets.SystemRandom()


@dataclass(frozen=True, slots=True)
class _Send:
    """A report taken for sending: the bytes and what the outcome reports."""

    epoch: str
    body: bytes
    attempts: int
    spent: float
    epsilon_1: float | None
    reason: str | None


class Reporter:
    """Reports one local user's segment per epoch, as the module docstring describes.

    ``store`` is the engine's profile store, ``settings`` its :class:`SyncSettings`,
    ``clock`` its clock. The level, the loaded catalog and the retention are passed per
    call, since the engine may change them between calls.
    """

    def __init__(
        self,
        store: Store,
        settings: SyncSettings,
        clock: Callable[[], float],
        *,
        directory: Path | None = None,
    ) -> None:
        self._store = store
        self._settings = settings
        self._clock = clock
        self._lock_path = None if directory is None else directory / SEND_LOCK_FILE

    @property
    def _rng(self) -> random.Random:
        return self._settings.rng if self._settings.rng is not None else _SYSTEM_RANDOM

    # -- the budget, for report() and the export ---------------------------------------

    def budget(self, conn: _db.Connection, user_id: str, now: float) -> dict[str, Any]:
        """The lifetime budget of ``user_id`` as of ``now`` (read-only)."""
        return budget_summary(conn, user_id, now, self._settings)

    # -- sync ----------------------------------------------------------------------------

    def sync(
        self,
        user_id: str,
        *,
        level: PrivacyLevel,
        level_in: Callable[[_db.Connection], PrivacyLevel] | None = None,
        runtime: CatalogRuntime | None,
        retention_days: float,
    ) -> SyncOutcome:
        """Report ``user_id``'s segment for the current epoch if it is due (see the
        module docstring). ``level_in(conn)``, when given, returns the level in force
        inside the write transaction (following a level lowered by another engine).
        Network failures are not raised: the outcome says ``failed``. Raises SyncError
        when no catalog is loaded or the report cannot be built."""
        check_id(user_id, "user_id")
        if level is PrivacyLevel.NONE:
            return SyncOutcome(
                user_id, "skipped", reason="privacy level none: nothing to report"
            )
        if runtime is None:
            raise SyncError("load a catalog bundle first: the segments come from it")
        k = segment_count(runtime)
        if k == 0:
            return SyncOutcome(user_id, "skipped", reason="the catalog defines no segments")
        with _send_lock(self._lock_path) as held:
            if not held:
                return SyncOutcome(
                    user_id, "waiting", reason="another engine on this profile is sending"
                )
            return self._sync_locked(user_id, level, level_in, runtime, retention_days, k)

    def _sync_locked(
        self,
        user_id: str,
        level: PrivacyLevel,
        level_in: Callable[[_db.Connection], PrivacyLevel] | None,
        runtime: CatalogRuntime,
        retention_days: float,
        k: int,
    ) -> SyncOutcome:
        from ondevice_sync import client as sync_client
        from ondevice_sync import errors as sync_errors

        settings = self._settings
        try:
            client = sync_client.SyncClient(
                base_url=settings.server_url,
                transport=settings.transport,
                timeout=settings.timeout,
                k=k,
            )
            with self._store.write() as conn:
                if level_in is not None:  # another engine may have lowered the level
                    level = level_in(conn)
                if level is PrivacyLevel.NONE:
                    return SyncOutcome(
                        user_id, "skipped", reason="privacy level none: nothing to report"
                    )
                now = Store.advance_report_clock(conn, float(self._clock()))
                taken = self._take(conn, user_id, now, k, client, level, runtime, retention_days)
            if isinstance(taken, SyncOutcome):
                return taken
            status, answer, retry = "sent", "", None
            # The log keeps a status code or an error class, never text the server chose.
            try:
                answer = f"{client.send_report_bytes(taken.body).status} counted"
            except sync_errors.ServerRejectedError as exc:
                status, answer = "refused", f"{exc.status} refused"
            except (sync_errors.TransportError, sync_errors.ServerError) as exc:
                status, answer = "failed", type(exc).__name__
                retry = sync_client.Backoff().next_attempt_at(now, taken.attempts)
            except sync_errors.SyncError:
                raise  # a local refusal (a pinned key that no longer fits...): say so
            except Exception as exc:  # a host app's transport may raise anything
                name = type(exc).__name__
                log.warning("the transport raised %s; the report will be retried", name)
                status, answer = "failed", type(exc).__name__
                retry = sync_client.Backoff().next_attempt_at(now, taken.attempts)
            with self._store.write() as conn:
                Store.settle_egress(
                    conn,
                    user_id,
                    taken.epoch,
                    status=status,
                    now=max(now, float(self._clock())),
                    answer=answer,
                    next_attempt=retry,
                )
        except sync_errors.SyncError as exc:
            raise SyncError(f"cannot report the segment: {exc}") from exc
        if status == "failed":
            log.info("report for epoch %s not delivered; retry after %s", taken.epoch, retry)
        return SyncOutcome(
            user_id,
            status,
            taken.epoch,
            taken.body.decode("ascii"),
            settings.epsilon_inf,
            taken.epsilon_1,
            taken.spent,
            answer,
            retry,
            taken.reason,
        )

    def _take(
        self,
        conn: _db.Connection,
        user_id: str,
        now: float,
        k: int,
        client: Any,
        level: PrivacyLevel,
        runtime: CatalogRuntime,
        retention_days: float,
    ) -> SyncOutcome | _Send:
        """Decide, inside the write transaction, whether a report leaves now; if so log
        it (and spend) and return what to send."""
        from ondevice_sync import protocol

        settings = self._settings
        epoch = protocol.epoch_of(now)
        lease = now + settings.timeout + _LEASE_MARGIN
        entry = Store.egress_entry(conn, user_id, epoch)
        if entry is not None:
            return self._retry(conn, user_id, entry, now, lease)
        tag = Store.ledger_tag(conn, user_id)
        # Epochs "YYYY-Www" sort as they follow each other: the latest reported week.
        latest = Store.latest_reported_epoch(conn, tag)
        scheduled = Store.schedule(conn, tag)
        if (
            scheduled is not None
            and scheduled[0] == protocol.shift_epoch(epoch, -1)
            and (latest is None or latest < scheduled[0])
        ):
            # Last week's report never left (its moment fell at the week's end, pushed
            # past it by another user's report, or the app was closed): it goes now,
            # labelled with its own week, which the server still accepts.
            epoch = scheduled[0]
        if latest is not None and latest >= epoch:
            return SyncOutcome(
                user_id,
                "already_sent",
                epoch,
                reason="one report per epoch"
                if latest == epoch
                else "a later week was already reported (the clock went back)",
            )
        deferred = self._due(conn, tag, epoch, now)
        if deferred is not None:
            return SyncOutcome(
                user_id, "scheduled", epoch, retry_at=deferred, reason="not due yet"
            )
        chosen = self._true_segment(conn, user_id, level, runtime, now, retention_days)
        if chosen is None:
            return SyncOutcome(
                user_id, "skipped", epoch, reason="no segment yet (no declared signals or taste)"
            )
        picked = self._memo_for(conn, user_id, tag, k, chosen, now)
        if isinstance(picked, str):
            return SyncOutcome(user_id, "skipped", epoch, reason=picked)
        memo, spent, reason = picked
        from ondevice_sync.privacy import report_from_memo

        reported = report_from_memo(memo, k=k, epsilon_1=settings.epsilon_1, rng=self._rng)
        body = client.build_report(reported, epoch)
        Store.log_egress(
            conn,
            user_id,
            epoch,
            body,
            spent,
            now,
            epsilon_1=settings.epsilon_1,
            lease_until=lease,
        )
        Store.spend(conn, tag, epoch, spent, now)
        Store.set_meta(conn, "last_report_at", repr(now))
        return _Send(epoch, body, 0, spent, settings.epsilon_1, reason)

    def _retry(
        self,
        conn: _db.Connection,
        user_id: str,
        entry: dict[str, Any],
        now: float,
        lease: float,
    ) -> SyncOutcome | _Send:
        epoch = entry["epoch"]
        if entry["status"] in ("sent", "refused", "unsent"):
            return SyncOutcome(
                user_id,
                "already_sent",
                epoch,
                entry["body"],
                self._settings.epsilon_inf,
                entry["epsilon_1"],
                entry["epsilon"],
                entry["answer"],
                reason="one report per epoch"
                if entry["status"] != "unsent"
                else "this week's report was logged before an import or an upgrade and is "
                "never sent again",
            )
        retry_at = entry["next_attempt"]
        gap_end = self._gap_end(conn, now)
        if gap_end is not None and (retry_at is None or retry_at <= now):
            retry_at = gap_end
            conn.execute(
                "UPDATE egress SET next_attempt = ? WHERE user_id = ? AND epoch = ?",
                (retry_at, user_id, epoch),
            )
        if retry_at is not None and retry_at > now:
            return SyncOutcome(
                user_id,
                "waiting",
                epoch,
                entry["body"],
                self._settings.epsilon_inf,
                entry["epsilon_1"],
                entry["epsilon"],
                entry["answer"],
                retry_at=retry_at,
            )
        Store.lease_egress(conn, user_id, epoch, lease)
        Store.set_meta(conn, "last_report_at", repr(now))
        return _Send(
            epoch,
            entry["body"].encode("ascii"),
            int(entry["attempts"]),
            float(entry["epsilon"]),
            entry["epsilon_1"],
            None,
        )

    def _gap_end(self, conn: _db.Connection, now: float) -> float | None:
        """When the next report of this profile may leave, if another left less than
        ``min_gap`` ago (a random moment in ``[last + gap, last + 2 gap]``); else None."""
        gap = self._settings.min_gap
        last = Store.get_meta(conn, "last_report_at")
        if gap <= 0 or last is None:
            return None
        last_at = float(last)
        if not 0 <= now - last_at < gap:
            return None
        return last_at + gap * (1.0 + self._rng.random())

    def _due(self, conn: _db.Connection, tag: bytes, epoch: str, now: float) -> float | None:
        """None if the user's report for ``epoch`` may leave now, else when it is due
        (drawing and storing the week's random moment on first use)."""
        from ondevice_sync import protocol

        due: float | None = None
        if self._settings.schedule:
            scheduled = Store.schedule(conn, tag)
            if scheduled is None or scheduled[0] != epoch:
                end = protocol.epoch_start(epoch) + protocol.WEEK_SECONDS
                due = now + (end - now) * self._rng.random()
                Store.set_schedule(conn, tag, epoch, due)
            else:
                due = scheduled[1]
        if due is not None and due > now:
            return due
        gap_end = self._gap_end(conn, now)
        if gap_end is not None:
            Store.set_schedule(conn, tag, epoch, gap_end)
            return gap_end
        return None

    @staticmethod
    def _true_segment(
        conn: _db.Connection,
        user_id: str,
        level: PrivacyLevel,
        runtime: CatalogRuntime,
        now: float,
        retention_days: float,
    ) -> int | None:
        from . import _personalize
        from .levels.segment import choose_segment

        state, _ = _personalize.load_state(
            conn,
            user_id,
            level,
            runtime,
            exclude_seen=False,
            now=now,
            retention_days=retention_days,
        )
        chosen = choose_segment(runtime, state)
        return None if chosen is None else int(chosen[0].id)

    def _memo_for(
        self,
        conn: _db.Connection,
        user_id: str,
        tag: bytes,
        k: int,
        segment: int,
        now: float,
    ) -> tuple[int, float, str | None] | str:
        """``(memo, lifetime epsilon spent, reason)`` for true ``segment``, or the reason
        nothing can be sent."""
        from ondevice_sync import errors as sync_errors
        from ondevice_sync.privacy import BudgetAccountant, draw_memo

        settings = self._settings
        eps_inf = settings.epsilon_inf
        memo = Store.memo(conn, user_id, k, eps_inf, segment)
        if memo is not None:
            Store.touch_memo(conn, user_id, k, eps_inf, segment, now)
            return memo, 0.0, None
        accountant = BudgetAccountant(
            spends=tuple((t, eps) for _, eps, t in Store.ledger(conn, tag) if eps > 0),
            cap=settings.lifetime_cap,
            period=LIFETIME_PERIOD_DAYS * 86400.0,
        )
        try:
            accountant.check(now, eps_inf)
        except sync_errors.BudgetExhausted:
            last = Store.last_used_memo(conn, user_id, k, eps_inf)
            if settings.when_spent == "repeat" and last is not None:
                return (
                    last,
                    0.0,
                    "lifetime budget spent: a fresh randomization of the last memo "
                    "(nothing new about the segment)",
                )
            return "lifetime budget spent: nothing sent until a new memo fits the budget"
        memo = draw_memo(segment, k=k, epsilon_inf=eps_inf, rng=self._rng)
        Store.save_memo(
            conn,
            user_id,
            k=k,
            epsilon_inf=eps_inf,
            segment=segment,
            memo=memo,
            created_at=now,
            used_at=now,
        )
        return memo, eps_inf, "new segment: drew its memo"


@contextlib.contextmanager
def _send_lock(path: Path | None) -> Iterator[bool]:
    """Try to hold the OS lock on ``path`` for the block, without waiting: yields
    whether it is held (True when there is no lock file to take: a bare Reporter)."""
    if path is None:
        yield True
        return
    from .keys import _try_lock, _unlock

    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    except OSError as exc:
        raise SyncError(f"cannot open the send lock: {exc.strerror}") from exc
    try:
        try:
            _try_lock(fd)
        except OSError:
            yield False
            return
        try:
            yield True
        finally:
            with contextlib.suppress(OSError):
                _unlock(fd)
    finally:
        os.close(fd)


def segment_count(runtime: CatalogRuntime) -> int:
    """K for randomized response: segment ids run from 0 to K - 1."""
    ids = [seg.id for seg in runtime.catalog.segments]
    return max(ids) + 1 if ids else 0


def budget_summary(
    conn: _db.Connection, user_id: str, now: float, settings: SyncSettings
) -> dict[str, Any]:
    """The lifetime budget of ``user_id`` as ``report()`` and the export show it."""
    clock = Store.report_clock(conn)
    at = now if clock is None else max(now, clock)
    period = LIFETIME_PERIOD_DAYS * 86400.0
    ledger = Store.ledger(conn, Store.ledger_tag_if_any(conn, user_id))
    spent = math.fsum(eps for _, eps, t in ledger if t > at - period)
    return {
        "epsilon_inf": settings.epsilon_inf,
        "epsilon_1": settings.epsilon_1,
        "lifetime_cap": settings.lifetime_cap,
        "lifetime_spent": spent,
        "lifetime_remaining": max(settings.lifetime_cap - spent, 0.0),
        "period_days": LIFETIME_PERIOD_DAYS,
        "memos": len(Store.memos(conn, user_id)),
        "when_spent": settings.when_spent,
        "reports_in_period": sum(1 for _, _, t in ledger if t > at - period),
    }
