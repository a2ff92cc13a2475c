"""The engine reports through Oblivious HTTP, end to end on loopback, with real parts:

    engine (OhttpTransport) -> proxy A -> relay (ondevice_sync.relay) -> proxy B
        -> ondevice_sync.server (its /v1/ohttp gateway)

Proxy A connects to the relay from 127.0.0.3, "the device's address"; each proxy records
every byte. The server is the real stub with its gateway mounted (``ohttp_keys_path``).
"""

from __future__ import annotations

import socket
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from sync_tests.test_ohttp_e2e import RecordingProxy, split_http

from ondevice import SyncError, SyncSettings
from ondevice_sync import ohttp
from ondevice_sync import server as server_module
from ondevice_sync.ohttp import GatewayKey, OhttpTransport, fetch_key_config, save_gateway_keys
from ondevice_sync.protocol import REPORT_PATH, decode_report, epoch_of
from ondevice_sync.relay import OhttpRelay, RelayConfig
from ondevice_sync.server import ServerConfig, SyncServer

from planted import HISTORY

K = 3
DEVICE_ADDRESS = "127.0.0.3"
USERS = ("alice@example.com", "bob-7781", "carol-local-42")


@dataclass
class Path_:
    server: SyncServer
    relay: OhttpRelay
    proxy_a: RecordingProxy
    proxy_b: RecordingProxy
    key: GatewayKey
    pin: str


def _can_bind(address: str) -> bool:
    try:
        with socket.socket() as probe:
            probe.bind((address, 0))
    except OSError:
        return False
    return True


@pytest.fixture
def path(tmp_path: Path, clock) -> Iterator[Path_]:
    if not _can_bind(DEVICE_ADDRESS):
        pytest.skip(f"cannot bind {DEVICE_ADDRESS} on this machine")
    key = GatewayKey.generate(key_id=7)
    keys_file = tmp_path / "gateway.keys"
    save_gateway_keys(keys_file, (key,))
    server = SyncServer(
        config=ServerConfig(
            k=K,
            db_path=tmp_path / "counts.db",
            port=0,
            k_threshold=1,
            ohttp_keys_path=keys_file,
            ohttp_relays=("127.0.0.1",),  # the relay's own address (via proxy B)
            rate_limit=1,  # per address: through the relay it must not apply
            capture_raw=True,
        ),
        clock=clock,
    ).start()
    proxy_b = RecordingProxy(server.address)
    relay = OhttpRelay(
        RelayConfig(gateway_url=proxy_b.url(ohttp.OHTTP_PATH), port=0, per_epoch=8),
        clock=clock,
    ).start()
    proxy_a = RecordingProxy(relay.address, source=DEVICE_ADDRESS)
    yield Path_(server, relay, proxy_a, proxy_b, key, key.config.digest())
    proxy_a.close()
    relay.close()
    proxy_b.close()
    server.close()


def _settings(p: Path_, config: bytes, pin: str) -> SyncSettings:
    transport = OhttpTransport(
        relay_url=p.proxy_a.url(ohttp.OHTTP_PATH), key_config=config, key_config_pin=pin
    )
    # The server URL names the gateway's origin inside the encrypted request only.
    return SyncSettings(
        server_url="https://sync.example", transport=transport, schedule=False, min_gap=0.0
    )


def _record(engine, user: str) -> None:
    for n, item in enumerate(HISTORY):
        engine.update_profile(
            user, {"item_id": item, "event": "purchase", "timestamp": engine.now() - 60 + n}
        )
    engine.set_signals(user, {"plan": "pro"})


def test_reports_go_through_the_relay_and_neither_side_sees_who_and_what(
    open_engine, path, clock
):
    config = fetch_key_config(path.server.url + ohttp.OHTTP_KEYS_PATH, path.pin)
    engine = open_engine("segment", sync=_settings(path, config.encode(), path.pin))
    for user in USERS:
        _record(engine, user)
    outcomes = [engine.sync(user) for user in USERS]
    assert [o.status for o in outcomes] == ["sent"] * len(USERS)

    # The server counted them all (its per-address limit of 1 saw no device address)...
    counts = path.server.store.counts(epoch_of(clock.now), k=K)
    assert sum(counts) == len(USERS)
    assert sorted(counts) == sorted(
        [sum(1 for o in outcomes if decode_report(o.body.encode(), k=K).segment == s)
         for s in range(K)]
    )
    # ...through the gateway only: no plain report ever reached it.
    raw = path.server.captured_requests()
    ohttp_requests = [r for r in raw if r.startswith(b"POST " + ohttp.OHTTP_PATH.encode())]
    assert len(ohttp_requests) == len(USERS)
    assert not any(r.startswith(b"POST " + REPORT_PATH.encode()) for r in raw)

    path.proxy_a.settle()
    path.proxy_b.settle()
    device_side = [f for f in path.proxy_a.flows if f.to_upstream]
    gateway_side = [f for f in path.proxy_b.flows if f.to_upstream]
    bodies = [o.body.encode() for o in outcomes]
    # The relay never sees a report: not on its way in, not on its way out.
    for flow in [*device_side, *gateway_side]:
        for body in bodies:
            assert body not in flow.to_upstream and body not in flow.to_client
        for word in (*USERS, "pro", "purchase", *HISTORY):
            assert word.encode() not in flow.to_upstream
    # The gateway side never sees the device's address (the relay reached proxy A's
    # upstream from 127.0.0.3): the relay's hop comes from the relay's own socket and
    # names no client.
    assert DEVICE_ADDRESS not in {f.peer for f in gateway_side}
    for flow in gateway_side:
        assert DEVICE_ADDRESS.encode() not in flow.to_upstream
        _, headers, _ = split_http(bytes(flow.to_upstream))
        assert set(headers) == {"host", "content-type", "content-length"}
    for raw_request in ohttp_requests:
        assert DEVICE_ADDRESS.encode() not in raw_request
    # Every encapsulated report has the same size on the device's hop.
    sizes = {len(split_http(bytes(f.to_upstream))[2]) for f in device_side}
    assert sizes == {ohttp.REPORT_ENCAPSULATED_SIZE}
    # And the device's egress log holds exactly the plaintext reports that were counted.
    logged = [e["body"] for u in USERS for e in engine.export_profile(u)["users"][0]["egress"]]
    assert sorted(logged) == sorted(o.body for o in outcomes)


def test_a_wrong_pin_or_a_rotated_gateway_key_is_refused_clearly(open_engine, path, clock):
    from ondevice_sync.errors import KeyConfigPinError

    config = path.key.config.encode()
    with pytest.raises(KeyConfigPinError):
        _settings(path, config, "0" * 64)
    with pytest.raises(KeyConfigPinError):
        fetch_key_config(path.server.url + ohttp.OHTTP_KEYS_PATH, "0" * 64)
    # A device pinned to a key the gateway no longer holds (a stale config).
    stale = GatewayKey.generate(key_id=9).config
    engine = open_engine("segment", sync=_settings(path, stale.encode(), stale.digest()))
    _record(engine, "u")
    with pytest.raises(SyncError, match="key"):
        engine.sync("u")
    assert sum(path.server.store.counts(epoch_of(clock.now), k=K)) == 0
    # The report stays logged (pending) and is never redrawn.
    (entry,) = engine.export_profile("u")["users"][0]["egress"]
    assert entry["status"] == "pending"


def test_the_server_spells_the_ohttp_constants_as_sync_ohttp_does():
    assert server_module._OHTTP_PATH == ohttp.OHTTP_PATH
    assert server_module._OHTTP_KEYS_PATH == ohttp.OHTTP_KEYS_PATH
    assert server_module._OHTTP_REQUEST_SIZE == ohttp.REPORT_ENCAPSULATED_SIZE


def test_the_key_document_is_served_with_its_media_type(path):
    import urllib.request

    with urllib.request.urlopen(path.server.url + ohttp.OHTTP_KEYS_PATH, timeout=5) as answer:
        assert answer.headers["Content-Type"] == ohttp.KEYS_CONTENT_TYPE
        configs = ohttp.decode_key_configs(answer.read())
    assert [c.digest() for c in configs] == [path.pin]


def test_only_a_named_relay_may_post_encapsulated_reports_to_the_server(path, clock):
    from ondevice_sync.client import SyncClient
    from ondevice_sync.errors import OhttpRejectedError

    # A client that skips the relay and posts straight to the gateway from its own
    # address would go around the relay's per-address limit: refused, nothing counted.
    direct = RecordingProxy(path.server.address, source=DEVICE_ADDRESS)
    try:
        transport = OhttpTransport(
            relay_url=direct.url(ohttp.OHTTP_PATH),
            key_config=path.key.config.encode(),
            key_config_pin=path.pin,
        )
        client = SyncClient(base_url="https://sync.example", transport=transport, k=K)
        with pytest.raises(OhttpRejectedError) as refused:
            client.send_report(1, epoch_of(clock.now))
        assert refused.value.status == 403 and refused.value.code == "not_a_relay"
    finally:
        direct.close()
    assert sum(path.server.store.counts(epoch_of(clock.now), k=K)) == 0
