"""A per-address, per-epoch request limit that keeps nothing linkable.

:class:`AddressLimiter` lets each client address make at most ``per_epoch`` requests per
epoch (an ISO week, UTC, as everywhere in ``sync``), for the OHTTP relay
(``ondevice_sync.relay``) and for any plain server that wants the same limit.

What it keeps
-------------
Only counters in memory, keyed by ``HMAC-SHA256(epoch key, address)`` truncated to 16
bytes, where the epoch key is 32 random bytes drawn when the epoch starts. When the
clock enters a new epoch, the counters *and* the key are dropped together and a new key
is drawn, so nothing that survives an epoch can be tied to an address, and a memory
dump taken mid-epoch holds no address in the clear (recovering one means trying
candidate addresses against a key that lives only in this process).

Addresses
---------
An IPv4 address counts as itself. An IPv6 address counts as its /64 network (one
subscriber usually holds a whole /64, so per-address counting would be free to evade);
an IPv4-mapped IPv6 address counts as the IPv4 address. Anything that does not parse as
an IP address (a Unix socket path, a test name) counts as the exact string.

Memory bound
------------
At most ``max_tracked`` distinct addresses are counted per epoch (about 150 bytes each,
so the default 100,000 is roughly 15 MB). Once that many are tracked, a request from an
address *not yet tracked* is refused (``allow`` returns ``False``) until the epoch
ends, while tracked addresses keep their own counts; a warning is logged once per
epoch. Failing closed keeps the limit a limit: failing open would let anyone who first
fills the table send without bound. The price is that a flood from more than
``max_tracked`` distinct addresses (IPv6 counted per /64) locks out new clients for the
rest of the epoch, so size ``max_tracked`` to the population the relay serves.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import logging
import secrets
import threading
import time
from collections.abc import Callable
from typing import Final

from ondevice_sync.errors import ConfigurationError
from ondevice_sync.protocol import WEEK_SECONDS, epoch_of, epoch_start

__all__ = ["DEFAULT_MAX_TRACKED", "DEFAULT_PER_EPOCH", "AddressLimiter", "address_bucket"]

_log = logging.getLogger(__name__)

DEFAULT_PER_EPOCH: Final = 16
"""Default requests allowed per address per epoch."""

DEFAULT_MAX_TRACKED: Final = 100_000
"""Default cap on distinct addresses counted in one epoch."""

_TAG_SIZE: Final = 16


def address_bucket(address: str) -> str:
    """The unit an address is counted as: IPv4 itself, IPv6 its /64, else the string."""
    try:
        ip = ipaddress.ip_address(address.split("%", 1)[0])
    except ValueError:
        return address
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.ipv4_mapped is not None:
            return str(ip.ipv4_mapped)
        return str(ipaddress.IPv6Network((int(ip) >> 64 << 64, 64)))
    return str(ip)


class AddressLimiter:
    """At most ``per_epoch`` allowed requests per address per ISO week (UTC).

    ``clock`` returns unix seconds (injectable for tests). Thread-safe. See the module
    docstring for what is kept and for the ``max_tracked`` bound.
    """

    def __init__(
        self,
        per_epoch: int = DEFAULT_PER_EPOCH,
        clock: Callable[[], float] = time.time,
        *,
        max_tracked: int = DEFAULT_MAX_TRACKED,
    ) -> None:
        if isinstance(per_epoch, bool) or not isinstance(per_epoch, int) or per_epoch < 1:
            raise ConfigurationError("per_epoch must be an integer >= 1")
        if isinstance(max_tracked, bool) or not isinstance(max_tracked, int) or max_tracked < 1:
            raise ConfigurationError("max_tracked must be an integer >= 1")
        self._per_epoch = per_epoch
        self._max_tracked = max_tracked
        self._clock = clock
        self._lock = threading.Lock()
        self._epoch = ""
        self._epoch_end = float("-inf")
        self._epoch_begin = float("inf")
        self._key = b""
        self._counts: dict[bytes, int] = {}
        self._warned = False

    @property
    def per_epoch(self) -> int:
        """Requests allowed per address per epoch."""
        return self._per_epoch

    @property
    def max_tracked(self) -> int:
        """The cap on distinct addresses counted in one epoch."""
        return self._max_tracked

    def _roll(self, now: float) -> None:
        """Start a new epoch (new key, no counters) if ``now`` left the current one."""
        if self._epoch_begin <= now < self._epoch_end:
            return
        epoch = epoch_of(now)
        self._epoch = epoch
        self._epoch_begin = epoch_start(epoch)
        self._epoch_end = self._epoch_begin + WEEK_SECONDS
        self._key = secrets.token_bytes(32)
        self._counts = {}
        self._warned = False

    def allow(self, address: str) -> bool:
        """Count one request from ``address``; ``False`` once it is over the limit.

        A refused request is not counted again. Also ``False`` for a new address once
        ``max_tracked`` addresses are tracked this epoch (see the module docstring).
        """
        bucket = address_bucket(address).encode("utf-8", "surrogatepass")
        with self._lock:
            self._roll(self._clock())
            tag = hmac.digest(self._key, bucket, hashlib.sha256)[:_TAG_SIZE]
            count = self._counts.get(tag)
            if count is None:
                if len(self._counts) >= self._max_tracked:
                    if not self._warned:
                        self._warned = True
                        _log.warning(
                            "rate limiter tracks %d addresses, its cap: new addresses are "
                            "refused until the epoch ends", self._max_tracked,
                        )
                    return False
                count = 0
            if count >= self._per_epoch:
                return False
            self._counts[tag] = count + 1
            return True

    def tracked(self) -> int:
        """How many distinct addresses are counted in the current epoch."""
        with self._lock:
            self._roll(self._clock())
            return len(self._counts)

    def seconds_until_reset(self) -> float:
        """Seconds until the current epoch ends and every count starts over."""
        with self._lock:
            now = self._clock()
            self._roll(now)
            return max(0.0, self._epoch_end - now)
