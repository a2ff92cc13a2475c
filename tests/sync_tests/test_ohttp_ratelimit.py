"""ondevice_sync.ratelimit.AddressLimiter: per address, per ISO week, bounded, nothing linkable."""

from __future__ import annotations

import logging
import threading

import pytest

from ondevice_sync.errors import ConfigurationError
from ondevice_sync.protocol import WEEK_SECONDS, epoch_of, epoch_start
from ondevice_sync.ratelimit import AddressLimiter, address_bucket

from .conftest import NOW


class Clock:
    def __init__(self, now: float = NOW) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def test_each_address_gets_its_own_allowance() -> None:
    limiter = AddressLimiter(3, Clock())
    assert [limiter.allow("192.0.2.1") for _ in range(5)] == [True, True, True, False, False]
    assert [limiter.allow("192.0.2.2") for _ in range(4)] == [True, True, True, False]
    assert limiter.tracked() == 2


def test_the_allowance_starts_over_at_the_next_epoch_and_not_before() -> None:
    clock = Clock()
    limiter = AddressLimiter(2, clock)
    assert limiter.allow("a") and limiter.allow("a") and not limiter.allow("a")
    key = limiter._key
    end = epoch_start(epoch_of(NOW)) + WEEK_SECONDS
    clock.now = end - 0.001
    assert not limiter.allow("a")
    assert limiter.seconds_until_reset() == pytest.approx(0.001, abs=1e-6)
    clock.now = end
    assert limiter.allow("a") and limiter.allow("a") and not limiter.allow("a")
    assert limiter._key != key  # a fresh HMAC key every epoch
    assert limiter.tracked() == 1
    assert limiter.seconds_until_reset() == pytest.approx(WEEK_SECONDS)


def test_a_clock_going_back_into_an_earlier_week_also_starts_over() -> None:
    clock = Clock()
    limiter = AddressLimiter(1, clock)
    assert limiter.allow("a") and not limiter.allow("a")
    clock.now = NOW - WEEK_SECONDS
    assert limiter.allow("a")


def test_no_address_is_kept_in_the_clear() -> None:
    limiter = AddressLimiter(5, Clock())
    addresses = [f"198.51.100.{n}" for n in range(50)]
    for address in addresses:
        limiter.allow(address)
    stored = b"".join(limiter._counts)
    assert len(limiter._counts) == 50 and all(len(tag) == 16 for tag in limiter._counts)
    for address in addresses:
        assert address.encode() not in stored


def test_ipv6_counts_per_64_and_mapped_ipv4_as_ipv4() -> None:
    assert address_bucket("2001:db8:1:2:aaaa::1") == "2001:db8:1:2::/64"
    assert address_bucket("2001:db8:1:2::ffff") == "2001:db8:1:2::/64"
    assert address_bucket("fe80::1%eth0") == "fe80::/64"
    assert address_bucket("::ffff:192.0.2.7") == "192.0.2.7"
    assert address_bucket("192.0.2.7") == "192.0.2.7"
    assert address_bucket("not an address") == "not an address"
    limiter = AddressLimiter(2, Clock())
    assert limiter.allow("2001:db8::1") and limiter.allow("2001:db8::2")
    assert not limiter.allow("2001:db8::3")  # same /64
    assert limiter.allow("2001:db8:0:1::1")  # another /64
    assert limiter.allow("::ffff:192.0.2.7") and limiter.allow("192.0.2.7")
    assert not limiter.allow("192.0.2.7")


def test_beyond_the_cap_new_addresses_are_refused_and_known_ones_keep_counting(
    caplog: pytest.LogCaptureFixture,
) -> None:
    clock = Clock()
    limiter = AddressLimiter(2, clock, max_tracked=3)
    for address in ("a", "b", "c"):
        assert limiter.allow(address)
    with caplog.at_level(logging.WARNING, logger="ondevice_sync.ratelimit"):
        assert not limiter.allow("d") and not limiter.allow("e")
    assert [r.getMessage() for r in caplog.records].count(
        "rate limiter tracks 3 addresses, its cap: new addresses are refused until the "
        "epoch ends"
    ) == 1
    assert limiter.tracked() == 3
    assert limiter.allow("a") and not limiter.allow("a")
    clock.now += WEEK_SECONDS
    assert limiter.allow("d")


def test_concurrent_requests_never_exceed_the_allowance() -> None:
    limiter = AddressLimiter(5000, Clock())
    allowed = [0] * 8

    def hammer(index: int) -> None:
        for _ in range(1000):
            if limiter.allow("203.0.113.9"):
                allowed[index] += 1

    threads = [threading.Thread(target=hammer, args=(i,)) for i in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sum(allowed) == 5000


def test_bad_settings_are_refused() -> None:
    for per_epoch in (0, -1, True, 1.5):
        with pytest.raises(ConfigurationError):
            AddressLimiter(per_epoch)  # type: ignore[arg-type]
    with pytest.raises(ConfigurationError):
        AddressLimiter(1, max_tracked=0)
