"""Oblivious HTTP building blocks: HPKE vectors, the RFC 9458 example, binary HTTP, key
configurations and pins, key files, encapsulation, tampering, and the gateway in-process.

The loopback end-to-end tests (device -> relay -> gateway over real sockets) are in
``test_ohttp_e2e.py``; the rate limiter's in ``test_ohttp_ratelimit.py``.
"""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import json
import os
import stat
import struct
import subprocess
import sys
import tracemalloc
from collections.abc import Iterator, Mapping
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from hypothesis import given, settings
from hypothesis import strategies as st

from ondevice_sync import gateway as gateway_module
from ondevice_sync import ohttp
from ondevice_sync.client import InProcessTransport, Response, SyncClient
from ondevice_sync.errors import (
    BinaryHttpError,
    ConfigurationError,
    DecapsulationError,
    KeyConfigError,
    KeyConfigPinError,
    OhttpError,
    OhttpRejectedError,
    ResponseDecryptionError,
    ServerUnavailableError,
    SyncError,
    TransportError,
    UnknownKeyIdError,
)
from ondevice_sync.gateway import OhttpGateway
from ondevice_sync.ohttp import (
    BinaryRequest,
    BinaryResponse,
    GatewayKey,
    KeyConfig,
    OhttpTransport,
)
from ondevice_sync.protocol import (
    CONTENT_TABLE_VERSION,
    MESSAGE_SIZE,
    REPORT_CONTENT_TYPE,
    REPORT_PATH,
    REQUEST_HEADERS,
    Report,
    encode_report,
)
from ondevice_sync.server import CountStore, ReportHandler, ServerConfig

from .conftest import EPOCH, NOW, stored_counts

# --------------------------------------------------------------------------- fixtures

#: RFC 9180 Appendix A.1.1: DHKEM(X25519, HKDF-SHA256), HKDF-SHA256, AES-128-GCM, base.
HPKE_A11 = {
    "info": "4f6465206f6e2061204772656369616e2055726e",
    "ikmE": "7268600d403fce431561aef583ee1613527cff655c1343f29812e66706df3234",
    "pkEm": "37fda3567bdbd628e88668c3c8d7e97d1d1253b6d4ea6d44c150f741f1bf4431",
    "skEm": "52c4a758a802cd8b936eceea314432798d5baf2d7e9235dc084ab1b9cfa2f736",
    "ikmR": "6db9df30aa07dd42ee5e8181afdb977e538f5e1fec8a06223f33f7013e525037",
    "pkRm": "3948cfe0ad1ddb695d780e59077195da6c56506b027329794ab02bca80815c4d",
    "skRm": "4612c550263fc8ad58375df3f557aac531d26850903e55a9f23f21d8534e8ac8",
    "enc": "37fda3567bdbd628e88668c3c8d7e97d1d1253b6d4ea6d44c150f741f1bf4431",
    "shared_secret": "fe0e18c9f024ce43799ae393c7e8fe8fce9d218875e8227b0187c04e7d2ea1fc",
    "key_schedule_context": "00725611c9d98c07c03f60095cd32d400d8347d45ed67097bbad50fc56da742d0"
    "7cb6cffde367bb0565ba28bb02c90744a20f5ef37f30523526106f637abb05449",
    "secret": "12fff91991e93b48de37e7daddb52981084bd8aa64289c3788471d9a9712f397",
    "key": "4531685d41d65f03dc48f6b8302c05b0",
    "base_nonce": "56d890e5accaaf011cff4b7d",
    "exporter_secret": "45ff1c2e220db587171952c0592d5f5ebe103f1561a2614e38f2ffd47e99e3f8",
}
HPKE_A11_PT = "4265617574792069732074727574682c20747275746820626561757479"
#: (sequence number, aad, nonce, ct)
HPKE_A11_ENCRYPTIONS = [
    (0, "436f756e742d30", "56d890e5accaaf011cff4b7d",
     "f938558b5d72f1a23810b4be2ab4f84331acc02fc97babc53a52ae8218a355a96d8770ac83d07bea87e13c512a"),
    (1, "436f756e742d31", "56d890e5accaaf011cff4b7c",
     "af2d7e9ac9ae7e270f46ba1f975be53c09f8d875bdc8535458c2494e8a6eab251c03d0c22a56b8ca42c2063b84"),
    (2, "436f756e742d32", "56d890e5accaaf011cff4b7f",
     "498dfcabd92e8acedc281e85af1cb4e3e31c7dc394a1ca20e173cb72516491588d96a19ad4a683518973dcc180"),
    (4, "436f756e742d34", "56d890e5accaaf011cff4b79",
     "583bd32bc67a5994bb8ceaca813d369bca7b2a42408cddef5e22f880b631215a09fc0012bc69fccaa251c0246d"),
]
#: (exporter_context, L, exported_value)
HPKE_A11_EXPORTS = [
    ("", 32, "3853fe2b4035195a573ffc53856e77058e15d9ea064de3e59f4961d0095250ee"),
    ("00", 32, "2e8f0b54673c7029649d4eb9d5e33bf1872cf76d623ff164ac185da9e88c21a5"),
    ("54657374436f6e74657874", 32,
     "e9e43065102c3836401bed8c3c3c75ae46be1639869391d62c61f1ec7af54931"),
]

#: RFC 9458 Appendix A: the complete example.
OHTTP_A = {
    "skR": "3c168975674b2fa8e465970b79c8dcf09f1c741626480bd4c6162fc5b6a98e1a",
    "key_config": "01002031e1f05a740102115220e9af918f738674aec95f54db6e04eb705aae8e"
    "79815500080001000100010003",
    "request": "00034745540568747470730b6578616d706c652e636f6d012f",
    "skE": "bc51d5e930bda26589890ac7032f70ad12e4ecb37abb1b65b1256c9c48999c73",
    "pkE": "4b28f881333e7c164ffc499ad9796f877f4e1051ee6d31bad19dec96c208b472",
    "info": "6d6573736167652f626874747020726571756573740001002000010001",
    "enc_request": "010020000100014b28f881333e7c164ffc499ad9796f877f4e1051ee6d31bad1"
    "9dec96c208b4726374e469135906992e1268c594d2a10c695d858c40a026e796"
    "5e7d86b83dd440b2c0185204b4d63525",
    "response": "0140c8",
    "secret": "62d87a6ba569ee81014c2641f52bea36",
    "salt": "4b28f881333e7c164ffc499ad9796f877f4e1051ee6d31bad19dec96c208b472"
    "c789e7151fcba46158ca84b04464910d",
    "prk": "979aaeae066cf211ab407b31ae49767f344e1501e475c84e8aff547cc5a683db",
    "aead_key": "5d0172a080e428b16d298c4ea0db620d",
    "aead_nonce": "f6bf1aeb88d6df87007fa263",
    "response_nonce": "c789e7151fcba46158ca84b04464910d",
    "enc_response": "c789e7151fcba46158ca84b04464910d86f9013e404feea014e7be4a441f234f857fbd",
}

#: RFC 9292 section 5.1: the known-length request example; 5.2: known-length response.
BHTTP_REQUEST = (
    "0003474554056874747073000a2f68656c6c6f2e747874406c0a757365722d61"
    "67656e74346375726c2f372e31362e33206c69626375726c2f372e31362e3320"
    "4f70656e53534c2f302e392e376c207a6c69622f312e322e3304686f73740f77"
    "77772e6578616d706c652e636f6d0f6163636570742d6c616e67756167650665"
    "6e2c206d690000"
)
BHTTP_RESPONSE = (
    "0140c8001d5468697320636f6e74656e7420636f6e7461696e732043524c462e"
    "0d0a0d07747261696c65720474657874"
)


def h(text: str) -> bytes:
    return bytes.fromhex(text)


# --------------------------------------------------------------------------- HPKE, RFC 9180


def _labeled_extract(salt: bytes, label: bytes, ikm: bytes, suite_id: bytes) -> bytes:
    return hmac.digest(salt, b"HPKE-v1" + suite_id + label + ikm, "sha256")


def _labeled_expand(prk: bytes, label: bytes, info: bytes, length: int, suite_id: bytes) -> bytes:
    labeled = struct.pack(">H", length) + b"HPKE-v1" + suite_id + label + info
    out, block, counter = b"", b"", 1
    while len(out) < length:
        block = hmac.digest(prk, block + labeled + bytes((counter,)), "sha256")
        out += block
        counter += 1
    return out[:length]


def test_hpke_derives_the_published_key_pairs() -> None:
    suite = ohttp._SUITE
    for ikm, sk, pk in (("ikmE", "skEm", "pkEm"), ("ikmR", "skRm", "pkRm")):
        pair = suite.kem.derive_key_pair(h(HPKE_A11[ikm]))
        assert pair.private_key.to_private_bytes().hex() == HPKE_A11[sk]
        assert pair.public_key.to_public_bytes().hex() == HPKE_A11[pk]


def test_hpke_encap_gives_the_published_enc_and_shared_secret() -> None:
    suite = ohttp._SUITE
    ephemeral = suite.kem.derive_key_pair(h(HPKE_A11["ikmE"]))
    receiver = suite.kem.derive_key_pair(h(HPKE_A11["ikmR"]))
    shared_secret, enc = suite.kem.encap(receiver.public_key, eks=ephemeral)
    assert enc.hex() == HPKE_A11["enc"]
    assert shared_secret.hex() == HPKE_A11["shared_secret"]
    assert suite.kem.decap(enc, receiver.private_key).hex() == HPKE_A11["shared_secret"]


def test_the_published_key_schedule_follows_from_the_shared_secret() -> None:
    # RFC 9180 section 5.1, computed here independently of pyhpke from the vector's
    # shared secret: the key, base nonce and exporter secret the sealing below relies on.
    suite_id = b"HPKE" + struct.pack(">HHH", 0x20, 1, 1)
    psk_id_hash = _labeled_extract(b"", b"psk_id_hash", b"", suite_id)
    info_hash = _labeled_extract(b"", b"info_hash", h(HPKE_A11["info"]), suite_id)
    context = b"\x00" + psk_id_hash + info_hash
    assert context.hex() == HPKE_A11["key_schedule_context"]
    secret = _labeled_extract(h(HPKE_A11["shared_secret"]), b"secret", b"", suite_id)
    assert secret.hex() == HPKE_A11["secret"]
    assert _labeled_expand(secret, b"key", context, 16, suite_id).hex() == HPKE_A11["key"]
    base_nonce = _labeled_expand(secret, b"base_nonce", context, 12, suite_id)
    assert base_nonce.hex() == HPKE_A11["base_nonce"]
    exporter = _labeled_expand(secret, b"exp", context, 32, suite_id)
    assert exporter.hex() == HPKE_A11["exporter_secret"]


def test_hpke_seals_opens_and_exports_the_published_values() -> None:
    suite = ohttp._SUITE
    ephemeral = suite.kem.derive_key_pair(h(HPKE_A11["ikmE"]))
    receiver = suite.kem.derive_key_pair(h(HPKE_A11["ikmR"]))
    info = h(HPKE_A11["info"])
    enc, sender = suite.create_sender_context(receiver.public_key, info, eks=ephemeral)
    recipient = suite.create_recipient_context(enc, receiver.private_key, info)
    key, pt = h(HPKE_A11["key"]), h(HPKE_A11_PT)
    sequence = 0
    for number, aad, nonce, ct in HPKE_A11_ENCRYPTIONS:
        while sequence < number:  # skip sequence 3, as the vectors do
            recipient.open(sender.seal(pt, b"skip"), b"skip")
            sequence += 1
        assert sender.seal(pt, h(aad)).hex() == ct
        assert AESGCM(key).encrypt(h(nonce), pt, h(aad)).hex() == ct  # key and nonce
        assert recipient.open(h(ct), h(aad)) == pt
        sequence += 1
    for exporter_context, length, value in HPKE_A11_EXPORTS:
        assert sender.export(h(exporter_context), length).hex() == value
        assert recipient.export(h(exporter_context), length).hex() == value


# --------------------------------------------------------------------------- RFC 9458 example


@pytest.fixture
def rfc_key() -> GatewayKey:
    return GatewayKey.from_private_bytes(1, h(OHTTP_A["skR"]))


def test_the_rfc_key_config_decodes_and_matches_the_secret_key(rfc_key: GatewayKey) -> None:
    config = KeyConfig.decode(h(OHTTP_A["key_config"]))
    assert config.key_id == 1 and config.kem_id == 0x20
    assert config.suites == ((1, 1), (1, 3))
    assert config.public_key == rfc_key.config.public_key
    assert config.encode().hex() == OHTTP_A["key_config"]
    assert ohttp.key_config_digest(config) == hashlib.sha256(h(OHTTP_A["key_config"])).hexdigest()
    assert ohttp.key_config_digest(h(OHTTP_A["key_config"])) == config.digest()


def test_the_rfc_request_encapsulates_to_the_published_bytes(rfc_key: GatewayKey) -> None:
    config = KeyConfig.decode(h(OHTTP_A["key_config"]))
    hdr = h(OHTTP_A["enc_request"])[:7]
    assert (b"message/bhttp request\x00" + hdr).hex() == OHTTP_A["info"]
    enc_request, _ = ohttp.encapsulate_request(
        config, h(OHTTP_A["request"]), _test_ephemeral_key=h(OHTTP_A["skE"])
    )
    assert enc_request.hex() == OHTTP_A["enc_request"]
    assert enc_request[7:39].hex() == OHTTP_A["pkE"]
    plaintext, _ = ohttp.decapsulate_request({1: rfc_key}, enc_request)
    assert plaintext.hex() == OHTTP_A["request"]
    request = ohttp.decode_bhttp_request(plaintext)
    assert (request.method, request.scheme, request.authority, request.path) == (
        "GET", "https", "example.com", "/",
    )


def test_the_rfc_response_encapsulates_to_the_published_bytes(rfc_key: GatewayKey) -> None:
    config = KeyConfig.decode(h(OHTTP_A["key_config"]))
    enc_request, client = ohttp.encapsulate_request(
        config, h(OHTTP_A["request"]), _test_ephemeral_key=h(OHTTP_A["skE"])
    )
    _, context = ohttp.decapsulate_request({1: rfc_key}, enc_request)
    sealed = context.seal_response(
        h(OHTTP_A["response"]), _test_response_nonce=h(OHTTP_A["response_nonce"])
    )
    assert sealed.hex() == OHTTP_A["enc_response"]
    assert client.open_response(sealed).hex() == OHTTP_A["response"]
    assert ohttp.decode_bhttp_response(h(OHTTP_A["response"])) == BinaryResponse(200)
    # The intermediate values: Extract(salt, secret), Expand "key" / "nonce".
    assert h(OHTTP_A["salt"]) == h(OHTTP_A["pkE"]) + h(OHTTP_A["response_nonce"])
    assert hmac.digest(h(OHTTP_A["salt"]), h(OHTTP_A["secret"]), "sha256").hex() == OHTTP_A["prk"]
    key, nonce = ohttp._response_key_nonce(
        h(OHTTP_A["secret"]), h(OHTTP_A["pkE"]), h(OHTTP_A["response_nonce"])
    )
    assert (key.hex(), nonce.hex()) == (OHTTP_A["aead_key"], OHTTP_A["aead_nonce"])


# --------------------------------------------------------------------------- binary HTTP


def test_the_rfc_9292_request_example_decodes_and_reencodes() -> None:
    data = h(BHTTP_REQUEST)
    request = ohttp.decode_bhttp_request(data)
    assert request == BinaryRequest(
        "GET", "https", "", "/hello.txt",
        (
            ("user-agent", "curl/7.16.3 libcurl/7.16.3 OpenSSL/0.9.7l zlib/1.2.3"),
            ("host", "www.example.com"),
            ("accept-language", "en, mi"),
        ),
    )
    assert ohttp.encode_bhttp_request(request) == data
    # Truncating the empty content and trailer sections changes nothing (RFC 9292 3.1).
    assert ohttp.decode_bhttp_request(data[:-1]) == request
    assert ohttp.decode_bhttp_request(data[:-2]) == request


def test_the_rfc_9292_response_example_decodes_and_reencodes() -> None:
    data = h(BHTTP_RESPONSE)
    response = ohttp.decode_bhttp_response(data)
    assert response == BinaryResponse(
        200, (), b"This content contains CRLF.\r\n", (("trailer", "text"),)
    )
    assert ohttp.encode_bhttp_response(response) == data


def test_informational_responses_are_parsed_and_dropped() -> None:
    data = bytes.fromhex("01") + b"".join(
        ohttp._encode_varint(103) + ohttp._encode_fields((("link", "</a.css>"),))
        for _ in range(3)
    ) + ohttp._encode_varint(204)
    assert ohttp.decode_bhttp_response(data) == BinaryResponse(204)
    too_many = bytes.fromhex("01") + (ohttp._encode_varint(100) + b"\x00") * 9 + b"\x40\xc8"
    with pytest.raises(BinaryHttpError, match="informational"):
        ohttp.decode_bhttp_response(too_many)


def test_padding_pads_to_the_bucket_and_decodes_back() -> None:
    request = BinaryRequest("POST", "https", "a.example", "/v1/report",
                            (("content-type", "x/y"),), b"hello")
    padded = ohttp.encode_bhttp_request(request, pad_to=512)
    assert len(padded) == 512 and padded.endswith(b"\x00" * 400)
    assert ohttp.decode_bhttp_request(padded) == request
    longer = BinaryRequest("POST", "https", "a" * 200 + ".example", "/v1/report",
                           (("content-type", "x/y"),), b"hello")
    assert len(ohttp.encode_bhttp_request(longer, pad_to=512)) == 512
    assert len(ohttp.encode_bhttp_request(request, pad_to=64)) % 64 == 0
    with pytest.raises(BinaryHttpError, match="padding"):
        ohttp.decode_bhttp_request(padded[:-1] + b"\x01")


def test_varints_round_trip_at_every_width() -> None:
    for value in (0, 63, 64, 16383, 16384, 2**30 - 1, 2**30, 2**62 - 1):
        encoded = ohttp._encode_varint(value)
        assert len(encoded) == {0: 1, 63: 1, 64: 2, 16383: 2, 16384: 4}.get(
            value, 4 if value < 2**30 else 8
        )
        assert ohttp._Reader(encoded).varint("x") == value
    with pytest.raises(BinaryHttpError):
        ohttp._encode_varint(2**62)


def _request_prefix() -> bytes:
    return bytes.fromhex("0004504f535405687474707300022f78")  # POST https "" /x


@pytest.mark.parametrize(
    ("data", "match"),
    [
        (b"", "empty"),
        (b"\x02\x03GET", "indeterminate"),
        (b"\x01\x40\xc8", "framing indicator 1"),
        (b"\x00\xff\xff\xff\xff\xff\xff\xff\xff", "claims"),  # method length 2^62-1
        (b"\x00\xbf\xff\xff\xff", "claims"),  # a 4-byte varint length
        (b"\x00\x03GE", "claims"),
        (b"\x00\x40", "truncated inside"),
        (_request_prefix() + b"\xff\xff\xff\xff\xff\xff\xff\xff", "claims"),  # header section
        (_request_prefix() + b"\x00\xff\xff\xff\xff\xff\xff\xff\xff", "exceeds"),  # content
        (_request_prefix() + b"\x04\x01A\x01b", "lower-case"),
        (_request_prefix() + b"\x06\x04:foo\x00", "pseudo-field"),
        (_request_prefix() + b"\x05\x01a\x02\r\n", "CR"),
        (_request_prefix() + b"\x05\x01a\x02 b", "whitespace"),
        (_request_prefix() + b"\x03\x00\x01b", "empty"),
        (_request_prefix() + b"\x03\x01a\x05", "claims"),
        (_request_prefix() + b"\x00\x00\x00\x00\x07", "padding"),
        (bytes.fromhex("0003474554056874747073") + b"\x00\x01x", "'/'"),
        (bytes.fromhex("0003474554056874747073") + b"\x00\x01\x80", "ASCII"),
        (b"\x00\x03G T\x05https\x00\x01/", "method"),
        (b"\x00\x03GET\x05ht:ps\x00\x01/", "scheme"),
        (b"\x00\x03GET\x05https\x00\x02/ ", "visible ASCII"),
    ],
)
def test_hostile_binary_http_requests_are_refused(data: bytes, match: str) -> None:
    with pytest.raises(BinaryHttpError, match=match):
        ohttp.decode_bhttp_request(data)


def test_too_many_fields_and_oversize_messages_are_refused() -> None:
    lines = b"\x01a\x01b" * 65
    data = _request_prefix() + ohttp._encode_varint(len(lines)) + lines
    with pytest.raises(BinaryHttpError, match="more than 64"):
        ohttp.decode_bhttp_request(data)
    with pytest.raises(BinaryHttpError, match="exceeds"):
        ohttp.decode_bhttp_request(_request_prefix() + bytes(2000))
    with pytest.raises(BinaryHttpError, match="exceeds"):
        ohttp.decode_bhttp_response(b"\x01\x40\xc8" + bytes(100), max_size=64)
    for status in (b"\x40\x63", b"\x42\x58"):  # 99 and 600
        with pytest.raises(BinaryHttpError, match="final status"):
            ohttp.decode_bhttp_response(b"\x01" + status)


def test_huge_length_prefixes_do_not_allocate() -> None:
    hostile = [
        b"\x00\xff\xff\xff\xff\xff\xff\xff\xff",
        _request_prefix() + b"\xff\xff\xff\xff\xff\xff\xff\xff",
        _request_prefix() + b"\x00\xbf\xff\xff\xff" + bytes(8),
        b"\x01\x40\xc8\x00\xff\xff\xff\xff\xff\xff\xff\xfe",
    ]
    tracemalloc.start()
    try:
        for data in hostile:
            with pytest.raises(BinaryHttpError):
                if data[0] == 0:
                    ohttp.decode_bhttp_request(data)
                else:
                    ohttp.decode_bhttp_response(data)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 64 * 1024


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=300))
def test_random_bytes_only_ever_raise_binary_http_errors(data: bytes) -> None:
    for decode in (ohttp.decode_bhttp_request, ohttp.decode_bhttp_response):
        with contextlib.suppress(BinaryHttpError):
            decode(data)


_names = st.from_regex(r"\A[a-z][a-z0-9\-]{0,15}\Z")
_values = st.from_regex(r"\A([!-~]([ -~]{0,20}[!-~])?)?\Z")


@settings(max_examples=150, deadline=None)
@given(
    method=st.sampled_from(["GET", "POST", "PUT"]),
    authority=st.from_regex(r"\A[a-z0-9.:]{0,30}\Z"),
    path=st.from_regex(r"\A/[!-~]{0,40}\Z"),
    headers=st.lists(st.tuples(_names, _values), max_size=6),
    content=st.binary(max_size=200),
    trailers=st.lists(st.tuples(_names, _values), max_size=2),
    pad_to=st.sampled_from([0, 64, 512]),
)
def test_requests_round_trip_through_binary_http(
    method: str, authority: str, path: str, headers: list[tuple[str, str]], content: bytes,
    trailers: list[tuple[str, str]], pad_to: int,
) -> None:
    request = BinaryRequest(method, "https", authority, path, tuple(headers), content,
                            tuple(trailers))
    encoded = ohttp.encode_bhttp_request(request, pad_to=pad_to)
    assert ohttp.decode_bhttp_request(encoded, max_size=4096) == request


# --------------------------------------------------------------------------- key configs, pins


def test_key_config_decoding_is_strict() -> None:
    good = h(OHTTP_A["key_config"])
    for cut in range(len(good)):
        with pytest.raises(KeyConfigError):
            KeyConfig.decode(good[:cut])
    with pytest.raises(KeyConfigError, match="follow"):
        KeyConfig.decode(good + b"\x00")
    with pytest.raises(KeyConfigError, match="KEM 0x0010"):
        KeyConfig.decode(b"\x01\x00\x10" + good[3:])
    with pytest.raises(KeyConfigError, match="multiple of 4"):
        KeyConfig.decode(good[:35] + b"\x00\x06" + good[37:] + b"\x00\x01")
    with pytest.raises(KeyConfigError, match="multiple of 4"):
        KeyConfig.decode(good[:35] + b"\x00\x00")
    with pytest.raises(KeyConfigError):
        KeyConfig(1, 0x20, b"\x01" * 31, ((1, 1),))
    with pytest.raises(KeyConfigError):
        KeyConfig(256, 0x20, b"\x01" * 32, ((1, 1),))


def test_the_ohttp_keys_list_round_trips_and_is_all_or_nothing() -> None:
    first, second = GatewayKey.generate(1).config, GatewayKey.generate(2).config
    document = ohttp.encode_key_configs([first, second])
    assert ohttp.decode_key_configs(document) == (first, second)
    assert struct.unpack(">H", document[:2])[0] == len(first.encode())
    for cut in range(1, len(document)):
        if cut == 2 + len(first.encode()):
            assert ohttp.decode_key_configs(document[:cut]) == (first,)
            continue
        with pytest.raises(KeyConfigError):
            ohttp.decode_key_configs(document[:cut])
    with pytest.raises(KeyConfigError):
        ohttp.decode_key_configs(document + b"\x00")
    with pytest.raises(KeyConfigError):
        ohttp.decode_key_configs(b"")
    with pytest.raises(KeyConfigError, match="more than 16"):
        ohttp.decode_key_configs(ohttp.encode_key_configs([first] * 17))
    with pytest.raises(KeyConfigError):
        ohttp.encode_key_configs([])


def test_a_config_that_does_not_match_the_pin_is_refused_with_a_clear_error() -> None:
    real, other = GatewayKey.generate(1), GatewayKey.generate(1)
    pin = real.config.digest()
    assert ohttp.check_key_config_pin(real.config.encode(), pin.upper()) == real.config
    with pytest.raises(KeyConfigPinError, match="does not match the pinned digest") as caught:
        ohttp.check_key_config_pin(other.config, pin)
    assert isinstance(caught.value, KeyConfigError) and isinstance(caught.value, OhttpError)
    with pytest.raises(KeyConfigPinError):
        OhttpTransport(relay_url="https://relay.example/v1/ohttp", key_config=other.config,
                       key_config_pin=pin)
    for bad_pin in ("", "abc", pin[:-1], pin + "0", "g" * 64):
        with pytest.raises(ConfigurationError, match="64 hex digits"):
            ohttp.check_key_config_pin(real.config, bad_pin)


def test_a_config_without_the_suite_is_refused() -> None:
    key = GatewayKey.generate(3)
    chacha_only = KeyConfig(3, 0x20, key.config.public_key, ((1, 3),))
    with pytest.raises(KeyConfigError, match="AES-128-GCM"):
        OhttpTransport(relay_url="https://r.example/x", key_config=chacha_only,
                       key_config_pin=chacha_only.digest())
    with pytest.raises(KeyConfigError, match="AES-128-GCM"):
        ohttp.encapsulate_request(chacha_only, b"\x00")


def test_a_low_order_public_key_is_refused_when_encrypting() -> None:
    zero = KeyConfig(1, 0x20, bytes(32), ((1, 1),))
    with pytest.raises(KeyConfigError, match="cannot encrypt"):
        ohttp.encapsulate_request(zero, b"\x00")


# --------------------------------------------------------------------------- key files


def test_key_files_are_private_never_overwritten_and_load_back(tmp_path: Path) -> None:
    path = tmp_path / "keys.json"
    keys = [GatewayKey.generate(1), GatewayKey.generate(7)]
    ohttp.save_gateway_keys(path, keys)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    loaded = ohttp.load_gateway_keys(path)
    assert [k.config for k in loaded] == [k.config for k in keys]
    assert [k.private_bytes() for k in loaded] == [k.private_bytes() for k in keys]
    before = path.read_bytes()
    with pytest.raises(ConfigurationError, match="refusing to overwrite"):
        ohttp.save_gateway_keys(path, [GatewayKey.generate(2)])
    assert path.read_bytes() == before
    assert keys[0].private_bytes().hex() not in repr(keys[0])


def test_key_files_readable_by_others_or_malformed_are_refused(tmp_path: Path) -> None:
    path = tmp_path / "keys.json"
    ohttp.save_gateway_keys(path, [GatewayKey.generate(1)])
    path.chmod(0o640)
    with pytest.raises(ConfigurationError, match="chmod 600"):
        ohttp.load_gateway_keys(path)
    for text in ("not json", '{"format": "x"}', json.dumps({
        "format": "ondevice-ohttp-gateway-keys", "version": 1,
        "keys": [{"key_id": 1, "kem_id": 32, "private_key": "00"}],
    }), json.dumps({
        "format": "ondevice-ohttp-gateway-keys", "version": 1, "keys": [],
    })):
        bad = tmp_path / f"bad{len(text)}.json"
        fd = os.open(bad, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        os.write(fd, text.encode())
        os.close(fd)
        with pytest.raises(KeyConfigError):
            ohttp.load_gateway_keys(bad)
    with pytest.raises(ConfigurationError, match="cannot open"):
        ohttp.load_gateway_keys(tmp_path / "missing.json")
    with pytest.raises(KeyConfigError, match="distinct"):
        ohttp.save_gateway_keys(tmp_path / "dup.json", [GatewayKey.generate(1)] * 2)
    assert not (tmp_path / "dup.json").exists()


def test_the_gateway_command_line_generates_and_shows_keys(tmp_path: Path) -> None:
    path = tmp_path / "gw.json"
    run = [sys.executable, "-m", "ondevice_sync.gateway"]
    made = subprocess.run([*run, "generate-key", str(path), "--key-id", "5"],
                          capture_output=True, text=True, timeout=60)
    assert made.returncode == 0, made.stderr
    key = ohttp.load_gateway_keys(path)[0]
    assert key.key_id == 5 and key.config.digest() in made.stdout
    assert key.config.encode().hex() in made.stdout
    again = subprocess.run([*run, "generate-key", str(path)], capture_output=True, text=True,
                           timeout=60)
    assert again.returncode == 2 and "refusing to overwrite" in again.stderr
    shown = subprocess.run([*run, "show-config", str(path)], capture_output=True, text=True,
                           timeout=60)
    assert shown.returncode == 0 and key.config.digest() in shown.stdout


# --------------------------------------------------------------------------- encapsulation


@pytest.fixture
def key() -> GatewayKey:
    return GatewayKey.generate(1)


def test_requests_round_trip_and_every_request_uses_a_fresh_key(key: GatewayKey) -> None:
    keys = {1: key}
    seen = set()
    for n in range(5):
        message = ohttp.encode_bhttp_request(
            BinaryRequest("POST", "https", "x", "/v1/report", (), b"n%d" % n), pad_to=512
        )
        enc_request, client = ohttp.encapsulate_request(key.config, message)
        assert len(enc_request) == ohttp.REPORT_ENCAPSULATED_SIZE
        seen.add(enc_request[7:39])
        plaintext, context = ohttp.decapsulate_request(keys, enc_request)
        assert plaintext == message
        answer = ohttp.encode_bhttp_response(BinaryResponse(200, (), b"ok %d" % n))
        assert client.open_response(context.seal_response(answer)) == answer
    assert len(seen) == 5


def test_every_flipped_byte_of_a_request_is_refused(key: GatewayKey) -> None:
    enc_request, _ = ohttp.encapsulate_request(key.config, b"\x00" * 100)
    for index in range(len(enc_request)):
        tampered = bytearray(enc_request)
        tampered[index] ^= 0x01
        expected = UnknownKeyIdError if index < 7 else DecapsulationError
        with pytest.raises(expected):
            ohttp.decapsulate_request({1: key}, bytes(tampered))


def test_every_truncation_of_a_request_is_refused(key: GatewayKey) -> None:
    enc_request, _ = ohttp.encapsulate_request(key.config, b"\x00" * 40)
    for cut in range(len(enc_request)):
        with pytest.raises(DecapsulationError):
            ohttp.decapsulate_request({1: key}, enc_request[:cut])


def test_every_flipped_or_truncated_byte_of_a_response_is_refused(key: GatewayKey) -> None:
    enc_request, client = ohttp.encapsulate_request(key.config, b"\x00" * 10)
    _, context = ohttp.decapsulate_request({1: key}, enc_request)
    sealed = context.seal_response(ohttp.encode_bhttp_response(BinaryResponse(200), pad_to=64))
    for index in range(len(sealed)):
        tampered = bytearray(sealed)
        tampered[index] ^= 0x80
        with pytest.raises(ResponseDecryptionError):
            client.open_response(bytes(tampered))
    for cut in range(len(sealed)):
        with pytest.raises(ResponseDecryptionError):
            client.open_response(sealed[:cut])
    # The answer to another request does not open either.
    other_request, other_client = ohttp.encapsulate_request(key.config, b"\x00" * 10)
    with pytest.raises(ResponseDecryptionError):
        other_client.open_response(sealed)
    assert other_request != enc_request


def test_a_request_for_another_key_id_is_an_unknown_key(key: GatewayKey) -> None:
    stranger = GatewayKey.generate(2)
    enc_request, _ = ohttp.encapsulate_request(stranger.config, b"\x00")
    with pytest.raises(UnknownKeyIdError, match="unknown key id 2"):
        ohttp.decapsulate_request({1: key}, enc_request)
    # Same id, another key (the gateway rotated without changing the id): cannot decrypt.
    same_id = GatewayKey.generate(1)
    enc_request, _ = ohttp.encapsulate_request(same_id.config, b"\x00")
    with pytest.raises(DecapsulationError, match="does not decrypt"):
        ohttp.decapsulate_request({1: key}, enc_request)


# --------------------------------------------------------------------------- gateway in-process


@pytest.fixture
def handler(tmp_path: Path) -> Iterator[ReportHandler]:
    content = tmp_path / "content.json"
    # k and the epsilons are filled in from the server's configuration.
    content.write_text(json.dumps(
        {"version": CONTENT_TABLE_VERSION, "segments": [[f"i{s}"] for s in range(8)]}
    ))
    config = ServerConfig(k=8, db_path=tmp_path / "counts.db", port=0, content_path=content)
    store = CountStore(path=config.db_path, synchronous="NORMAL")
    yield ReportHandler(config=config, store=store, clock=lambda: NOW)
    store.close()


def _client(gateway: OhttpGateway, key: GatewayKey, **kwargs: object) -> SyncClient:
    transport = OhttpTransport(
        relay_url="https://relay.example/v1/ohttp",
        key_config=key.config.encode(),
        key_config_pin=key.config.digest(),
        inner_transport=InProcessTransport(gateway.handle),
    )
    return SyncClient(base_url="https://ondevice.example", transport=transport, k=8)


def test_a_report_through_the_gateway_is_counted(
    handler: ReportHandler, key: GatewayKey
) -> None:
    gateway = OhttpGateway(key, handler.handle)
    client = _client(gateway, key)
    answer = client.send_report(3, EPOCH)
    assert answer.summary == "200 counted"
    assert stored_counts(handler.config.db_path) == {(EPOCH, 3): 1}
    table = client.fetch_content()
    assert table.items_for(5) == ("i5",)


def test_refusals_from_the_server_come_back_encapsulated_and_the_same_size(
    handler: ReportHandler, key: GatewayKey
) -> None:
    gateway = OhttpGateway(key, handler.handle)
    transport = OhttpTransport(relay_url="https://relay.example/v1/ohttp",
                               key_config=key.config, key_config_pin=key.config.digest())
    headers = dict(REQUEST_HEADERS[REPORT_PATH])
    sizes = []
    for body in (encode_report(Report(epoch=EPOCH, segment=1)),
                 encode_report(Report(epoch="2020-W01", segment=1))):
        enc_request, context = transport.encapsulate(
            "POST", "https://ondevice.example" + REPORT_PATH, headers, body
        )
        status, answer_headers, sealed = gateway.handle_encapsulated(
            ohttp.REQUEST_CONTENT_TYPE, enc_request
        )
        assert status == 200 and dict(answer_headers)["Content-Type"] == "message/ohttp-res"
        sizes.append(len(sealed))
        inner = ohttp.decode_bhttp_response(context.open_response(sealed))
        assert inner.header("content-type") == "application/json"
        if body.startswith(b'{"version":1,"epoch":"2020'):
            assert inner.status == 400
            assert json.loads(inner.content)["error"] == "epoch_out_of_window"
    assert sizes[0] == sizes[1] == 512 + 32


def test_the_gateway_answers_bad_outer_requests_with_clear_json_errors(
    handler: ReportHandler, key: GatewayKey
) -> None:
    gateway = OhttpGateway(key, handler.handle)

    def call(content_type: str, body: bytes) -> tuple[int, dict[str, str], dict[str, str]]:
        status, headers, answer = gateway.handle_encapsulated(content_type, body)
        return status, dict(headers), json.loads(answer)

    status, _, document = call("application/json", b"x")
    assert (status, document["error"]) == (415, "unsupported_media_type")
    status, _, document = call(ohttp.REQUEST_CONTENT_TYPE, b"")
    assert (status, document["error"]) == (400, "empty_body")
    status, _, document = call(ohttp.REQUEST_CONTENT_TYPE, bytes(2000))
    assert (status, document["error"]) == (413, "too_large")
    status, _, document = call(ohttp.REQUEST_CONTENT_TYPE, b"\x01\x00\x20" + bytes(100))
    assert (status, document["error"]) == (400, "unknown_key_id")  # suite 0/0
    status, _, document = call(ohttp.REQUEST_CONTENT_TYPE, _header(1) + bytes(100))
    assert (status, document["error"]) == (400, "decapsulation_failed")
    stranger, _ = ohttp.encapsulate_request(GatewayKey.generate(9).config, b"\x00")
    status, headers, document = call("message/ohttp-req; x=y", stranger)
    assert status == 400 and headers["Content-Type"] == "application/problem+json"
    assert document["type"] == ohttp.KEY_PROBLEM_TYPE and document["error"] == "unknown_key_id"
    status, headers, document = gateway.handle("GET", ohttp.OHTTP_PATH, {}, b"")[0], {}, {}
    assert status == 405
    assert gateway.handle("GET", "/elsewhere", {}, b"")[0] == 404


def _header(key_id: int) -> bytes:
    return struct.pack(">BHHH", key_id, 0x20, 1, 1)


def test_the_gateway_serves_its_key_configurations(key: GatewayKey) -> None:
    later = GatewayKey.generate(2)
    gateway = OhttpGateway([key, later], lambda *args: (200, [], b""))
    status, headers, body = gateway.handle("GET", ohttp.OHTTP_KEYS_PATH, {}, b"")
    assert status == 200 and dict(headers)["Content-Type"] == "application/ohttp-keys"
    assert ohttp.decode_key_configs(body) == (key.config, later.config)
    with pytest.raises(KeyConfigError, match="distinct"):
        OhttpGateway([key, key], lambda *args: (200, [], b""))


def _sealed_inner(gateway: OhttpGateway, key: GatewayKey, message: bytes) -> BinaryResponse:
    enc_request, context = ohttp.encapsulate_request(key.config, message)
    status, _, sealed = gateway.handle_encapsulated(ohttp.REQUEST_CONTENT_TYPE, enc_request)
    assert status == 200
    return ohttp.decode_bhttp_response(context.open_response(sealed))


def test_problems_after_decryption_are_answered_encapsulated(key: GatewayKey) -> None:
    def failing(method: str, path: str, headers: Mapping[str, str], body: bytes) -> tuple[
        int, list[tuple[str, str]], bytes
    ]:
        raise RuntimeError("boom")

    gateway = OhttpGateway(key, failing)
    inner = _sealed_inner(gateway, key, b"\x00\x03GET")
    assert inner.status == 400 and json.loads(inner.content)["error"] == "bad_bhttp"
    nested = ohttp.encode_bhttp_request(BinaryRequest("POST", "https", "x", ohttp.OHTTP_PATH))
    inner = _sealed_inner(gateway, key, nested)
    assert inner.status == 400 and json.loads(inner.content)["error"] == "nested_ohttp"
    plain = ohttp.encode_bhttp_request(BinaryRequest("GET", "https", "x", "/v1/content"))
    inner = _sealed_inner(gateway, key, plain)
    assert inner.status == 500 and json.loads(inner.content)["error"] == "internal"


def test_the_handler_sees_method_path_host_headers_and_body(key: GatewayKey) -> None:
    seen: list[tuple[str, str, dict[str, str], bytes]] = []

    def record(method: str, path: str, headers: Mapping[str, str], body: bytes) -> tuple[
        int, list[tuple[str, str]], bytes
    ]:
        seen.append((method, path, dict(headers), body))
        return 201, [("Content-Type", "text/plain"), ("Connection", "close")], b"made"

    gateway = OhttpGateway(key, record)
    transport = OhttpTransport(relay_url="http://relay.example/v1/ohttp",
                               key_config=key.config, key_config_pin=key.config.digest(),
                               inner_transport=InProcessTransport(gateway.handle))
    body = encode_report(Report(epoch=EPOCH, segment=2))
    answer = transport.request("POST", "https://ondevice.example:8443/v1/report?x=1",
                               dict(REQUEST_HEADERS[REPORT_PATH]), body, 5.0)
    assert answer == Response(201, {"content-type": "text/plain"}, b"made")
    assert seen == [(
        "POST", "/v1/report?x=1",
        {"host": "ondevice.example:8443", "content-type": REPORT_CONTENT_TYPE,
         "accept": "application/json"},
        body,
    )]
    assert len(body) == MESSAGE_SIZE


# --------------------------------------------------------------------------- transport errors


class ScriptedRelay:
    """A relay stand-in that answers with given bytes, or tampers with a real gateway's."""

    def __init__(self, answer: Response | None = None, gateway: OhttpGateway | None = None,
                 flip: int | None = None) -> None:
        self.answer, self.gateway, self.flip = answer, gateway, flip
        self.sent: list[tuple[str, str, dict[str, str], bytes]] = []

    def request(self, method: str, url: str, headers: Mapping[str, str], body: bytes,
                timeout: float) -> Response:
        self.sent.append((method, url, dict(headers), body))
        if self.gateway is not None:
            status, answer_headers, answer = self.gateway.handle_encapsulated(
                headers["Content-Type"], body
            )
            if self.flip is not None:
                answer = bytes(b ^ (0x01 if i == self.flip else 0) for i, b in enumerate(answer))
            return Response(status, {k.lower(): v for k, v in answer_headers}, answer)
        assert self.answer is not None
        return self.answer


def _transport(key: GatewayKey, relay: ScriptedRelay, **kwargs: int) -> OhttpTransport:
    return OhttpTransport(relay_url="https://relay.example/v1/ohttp", key_config=key.config,
                          key_config_pin=key.config.digest(), inner_transport=relay,
                          **kwargs)


def _send(transport: OhttpTransport) -> Response:
    body = encode_report(Report(epoch=EPOCH, segment=0))
    return transport.request("POST", "https://ondevice.example/v1/report",
                             dict(REQUEST_HEADERS[REPORT_PATH]), body, 5.0)


def test_the_outer_request_carries_only_the_fixed_headers(
    handler: ReportHandler, key: GatewayKey
) -> None:
    relay = ScriptedRelay(gateway=OhttpGateway(key, handler.handle))
    assert _send(_transport(key, relay)).status == 200
    (method, url, headers, body), = relay.sent
    assert (method, url) == ("POST", "https://relay.example/v1/ohttp")
    assert headers == {"Content-Type": "message/ohttp-req", "Content-Length": "567",
                       "Accept": "message/ohttp-res", "Connection": "close"}
    assert len(body) == ohttp.REPORT_ENCAPSULATED_SIZE


def test_a_tampered_answer_is_a_clear_retryable_error(
    handler: ReportHandler, key: GatewayKey
) -> None:
    for flip in (0, 20, 100, 543):
        relay = ScriptedRelay(gateway=OhttpGateway(key, handler.handle), flip=flip)
        with pytest.raises(ResponseDecryptionError, match="does not decrypt") as caught:
            _send(_transport(key, relay))
        assert isinstance(caught.value, TransportError) and caught.value.retryable
        assert caught.value.maybe_delivered


@pytest.mark.parametrize(
    ("answer", "error", "match"),
    [
        (Response(200, {"content-type": "application/json"}, b"{}"), ResponseDecryptionError,
         "without a message/ohttp-res"),
        (Response(200, {"content-type": "message/ohttp-res"}, b"short"),
         ResponseDecryptionError, "too short"),
        (Response(200, {"content-type": "message/ohttp-res"}, bytes(5000)),
         ResponseDecryptionError, "exceeds"),
        (Response(400, {"content-type": "application/problem+json"},
                  json.dumps({"type": ohttp.KEY_PROBLEM_TYPE, "title": "unknown"}).encode()),
         UnknownKeyIdError, "stale"),
        (Response(400, {}, b'{"error":"decapsulation_failed","message":"no"}'),
         DecapsulationError, "could not decrypt"),
        (Response(415, {}, b'{"error":"unsupported_media_type"}'), OhttpRejectedError,
         "415 \\(unsupported_media_type\\)"),
        (Response(404, {}, b"<html>"), OhttpRejectedError, "404 \\(unknown\\)"),
    ],
)
def test_failed_answers_become_clear_errors(
    key: GatewayKey, answer: Response, error: type[Exception], match: str
) -> None:
    with pytest.raises(error, match=match) as caught:
        _send(_transport(key, ScriptedRelay(answer), max_response_bytes=4096))
    assert isinstance(caught.value, OhttpError)


def test_rate_limits_and_outages_are_retryable_through_the_client(key: GatewayKey) -> None:
    for status in (429, 502, 503):
        relay = ScriptedRelay(Response(status, {"content-type": "application/json"},
                                       b'{"error":"rate_limited","message":"later"}'))
        client = SyncClient(base_url="https://ondevice.example",
                            transport=_transport(key, relay))
        with pytest.raises(ServerUnavailableError) as caught:
            client.send_report(1, EPOCH)
        assert caught.value.retryable and caught.value.status == status


def test_every_error_is_a_sync_error_in_the_ohttp_branch() -> None:
    for cls in (KeyConfigError, KeyConfigPinError, BinaryHttpError, DecapsulationError,
                UnknownKeyIdError, ResponseDecryptionError, OhttpRejectedError):
        assert issubclass(cls, OhttpError) and issubclass(cls, SyncError)
        assert cls.code and cls.__doc__
    assert not UnknownKeyIdError.retryable and ResponseDecryptionError.retryable


def test_the_ohttp_modules_never_import_ondevice_or_numpy() -> None:
    code = (
        "import sys, ondevice_sync.ohttp, ondevice_sync.gateway, ondevice_sync.relay, "
        "ondevice_sync.ratelimit; "
        "print(sorted(m for m in sys.modules if m.split('.')[0] in ('ondevice', 'numpy')))"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            check=True, timeout=60)
    assert result.stdout.strip() == "[]"


def test_gateway_module_exports_its_public_names() -> None:
    assert set(gateway_module.__all__) == {
        "DEFAULT_REPLAY_CAPACITY", "DEFAULT_REPLAY_RETENTION", "REPLAYED_CODE",
        "HandlerFunction", "HandlerResult", "OhttpGateway", "ReplayCache", "main",
    }
    for name in ohttp.__all__:
        assert hasattr(ohttp, name)
