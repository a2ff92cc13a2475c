"""The Oblivious HTTP gateway (RFC 9458): opens encapsulated requests for the server.

:class:`OhttpGateway` sits in front of a plain handler function with the signature of
``sync.server.ReportHandler.handle`` (``(method, path, headers, body) -> (status,
headers, body)``). For each ``POST /v1/ohttp`` it decrypts the ``message/ohttp-req``
body with its private key, decodes the binary HTTP request inside, calls the handler
with it, and returns the handler's answer encoded as binary HTTP, zero-padded to a
multiple of :data:`~sync.ohttp.RESPONSE_PAD_SIZE` and encrypted to the device
(``200``, ``message/ohttp-res``). ``GET /v1/ohttp-keys`` serves the public key
configurations (``application/ohttp-keys``).

The gateway sees the relay's address, never the device's: it is the relay that
connects to it, and nothing in the encapsulated request names the device.

Errors (RFC 9458 section 5.2)
-----------------------------
Problems found *before* the request is decrypted are answered in the clear with a
``4xx`` and a JSON body ``{"error": code, "message": ...}``: wrong content type (415),
empty or oversize body (400 / 413), unknown key id or suite (400, code
``unknown_key_id``, content type ``application/problem+json`` with the RFC's
``ohttp-key`` problem type, so a device knows its configuration is stale), a request
that does not decrypt (400, ``decapsulation_failed``). Problems found *after* it is
decrypted (malformed binary HTTP, a nested OHTTP request, the handler failing) are
answered inside an encapsulated response, like any answer of the handler. Nothing is
ever answered with a traceback.

Key management
--------------
``python -m sync.gateway generate-key keys.json --key-id 1`` writes a new private key
file (mode 0600, never overwritten) and prints the configuration and its pin;
``python -m sync.gateway show-config keys.json`` prints them again. To rotate keys,
add a key with a new id, publish its configuration and pin in a new app release, and
drop the old key once devices have moved: a device still using the old configuration
then gets :class:`~sync.errors.UnknownKeyIdError`.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import urllib.parse
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any, Final

from sync.errors import (
    BinaryHttpError,
    ConfigurationError,
    DecapsulationError,
    KeyConfigError,
    SyncError,
    UnknownKeyIdError,
)
from sync.ohttp import (
    KEY_PROBLEM_TYPE,
    KEYS_CONTENT_TYPE,
    MAX_BHTTP_REQUEST_SIZE,
    MAX_ENCAPSULATED_REQUEST_SIZE,
    OHTTP_KEYS_PATH,
    OHTTP_PATH,
    REQUEST_CONTENT_TYPE,
    RESPONSE_CONTENT_TYPE,
    RESPONSE_PAD_SIZE,
    BinaryResponse,
    GatewayContext,
    GatewayKey,
    decapsulate_request,
    decode_bhttp_request,
    encode_bhttp_response,
    encode_key_configs,
    load_gateway_keys,
    save_gateway_keys,
)

__all__ = ["HandlerFunction", "HandlerResult", "OhttpGateway", "main"]

_log = logging.getLogger(__name__)

HandlerResult = tuple[int, list[tuple[str, str]], bytes]
"""``(status, headers, body)``, as ``sync.server.ReportHandler.handle`` returns."""

HandlerFunction = Callable[[str, str, Mapping[str, str], bytes], tuple[int, Any, bytes]]
"""``(method, path_and_query, headers, body) -> (status, headers, body)``."""

_ERROR_CONTENT_TYPE: Final = "application/json"
_PROBLEM_CONTENT_TYPE: Final = "application/problem+json"
_DROPPED_ANSWER_HEADERS: Final = frozenset(
    {"connection", "content-length", "keep-alive", "transfer-encoding", "upgrade"}
)


def _document(document: Mapping[str, Any]) -> bytes:
    return json.dumps(document, separators=(",", ":"), sort_keys=True).encode()


def _plain_error(status: int, code: str, message: str) -> HandlerResult:
    body = _document({"error": code, "message": message})
    return status, [("Content-Type", _ERROR_CONTENT_TYPE), ("Cache-Control", "no-store")], body


class OhttpGateway:
    """Decapsulates requests for ``inner`` and encapsulates its answers.

    ``keys`` is one :class:`~sync.ohttp.GatewayKey` or several (distinct key ids, e.g.
    during a rotation); ``inner`` is the handler function the decrypted requests go to.
    ``pad_to`` is the multiple answers are padded to. Thread-safe (holds no per-request
    state).
    """

    def __init__(
        self,
        keys: GatewayKey | Iterable[GatewayKey],
        inner: HandlerFunction,
        *,
        pad_to: int = RESPONSE_PAD_SIZE,
    ) -> None:
        key_list: Sequence[GatewayKey] = (
            (keys,) if isinstance(keys, GatewayKey) else tuple(keys)
        )
        if not key_list:
            raise KeyConfigError("the gateway needs at least one key")
        ids = [key.key_id for key in key_list]
        if len(set(ids)) != len(ids):
            raise KeyConfigError("gateway key ids must be distinct")
        if isinstance(pad_to, bool) or not isinstance(pad_to, int) or pad_to < 0:
            raise ConfigurationError("pad_to must be an integer >= 0")
        self._keys = {key.key_id: key for key in key_list}
        self._inner = inner
        self._pad_to = pad_to
        self._key_document = encode_key_configs(key.config for key in key_list)

    @classmethod
    def from_key_file(cls, path: Path, inner: HandlerFunction) -> OhttpGateway:
        """A gateway with the keys of a file written by ``save_gateway_keys``."""
        return cls(load_gateway_keys(path), inner)

    @property
    def key_configs_document(self) -> bytes:
        """The ``application/ohttp-keys`` bytes :meth:`key_config_response` serves."""
        return self._key_document

    def handle(
        self, method: str, path: str, headers: Mapping[str, str], body: bytes
    ) -> HandlerResult:
        """Route ``POST /v1/ohttp`` and ``GET /v1/ohttp-keys``; 404/405 for the rest."""
        split = urllib.parse.urlsplit(path)
        if split.path == OHTTP_PATH:
            if method != "POST":
                return self._with(_plain_error(405, "method_not_allowed", "use POST"), "POST")
            if split.query:
                return _plain_error(400, "bad_query", "this endpoint takes no query string")
            content_type = next(
                (value for name, value in headers.items() if name.lower() == "content-type"),
                "",
            )
            return self.handle_encapsulated(content_type, body)
        if split.path == OHTTP_KEYS_PATH:
            if method != "GET":
                return self._with(_plain_error(405, "method_not_allowed", "use GET"), "GET")
            if split.query or body:
                return _plain_error(400, "bad_request", "GET it without query or body")
            return self.key_config_response()
        return _plain_error(404, "not_found", "unknown path")

    @staticmethod
    def _with(result: HandlerResult, allow: str) -> HandlerResult:
        status, headers, body = result
        return status, [*headers, ("Allow", allow)], body

    def key_config_response(self) -> HandlerResult:
        """The answer to ``GET /v1/ohttp-keys``: every key configuration, newest last."""
        headers = [("Content-Type", KEYS_CONTENT_TYPE), ("Cache-Control", "max-age=3600")]
        return 200, headers, self._key_document

    def handle_encapsulated(self, content_type: str, body: bytes) -> HandlerResult:
        """Answer one ``message/ohttp-req``; never raises (a 4xx/5xx result instead)."""
        if content_type.split(";", 1)[0].strip().lower() != REQUEST_CONTENT_TYPE:
            return _plain_error(
                415, "unsupported_media_type", f"Content-Type must be {REQUEST_CONTENT_TYPE}"
            )
        if not body:
            return _plain_error(400, "empty_body", "no encapsulated request")
        if len(body) > MAX_ENCAPSULATED_REQUEST_SIZE:
            return _plain_error(
                413, "too_large",
                f"an encapsulated request is at most {MAX_ENCAPSULATED_REQUEST_SIZE} bytes",
            )
        try:
            plaintext, context = decapsulate_request(self._keys, body)
        except UnknownKeyIdError as exc:
            document = {
                "type": KEY_PROBLEM_TYPE,
                "title": "key identifier unknown",
                "error": UnknownKeyIdError.code,
                "message": f"{exc}; fetch the current key configuration",
            }
            return 400, [("Content-Type", _PROBLEM_CONTENT_TYPE)], _document(document)
        except DecapsulationError as exc:
            _log.debug("encapsulated request refused: %s", exc)
            return _plain_error(400, DecapsulationError.code, str(exc))
        try:
            answer = self._answer(plaintext)
        except Exception:
            _log.exception("unexpected error while answering an encapsulated request")
            answer = self._inner_error(500, "internal", "internal error; nothing was counted")
        return self._seal(context, answer)

    def _answer(self, plaintext: bytes) -> bytes:
        try:
            request = decode_bhttp_request(plaintext, max_size=MAX_BHTTP_REQUEST_SIZE)
        except BinaryHttpError as exc:
            return self._inner_error(400, BinaryHttpError.code, str(exc))
        target = urllib.parse.urlsplit(request.path).path
        if target in (OHTTP_PATH, OHTTP_KEYS_PATH):
            return self._inner_error(400, "nested_ohttp", "OHTTP requests cannot be nested")
        headers: dict[str, str] = {"host": request.authority} if request.authority else {}
        for name, value in request.headers:
            headers[name] = f"{headers[name]}, {value}" if name in headers else value
        status, answer_headers, answer_body = self._inner(
            request.method, request.path, headers, request.content
        )
        fields = tuple(
            (str(name).lower(), str(value))
            for name, value in answer_headers
            if str(name).lower() not in _DROPPED_ANSWER_HEADERS
        )
        return encode_bhttp_response(
            BinaryResponse(status, fields, bytes(answer_body)), pad_to=self._pad_to
        )

    def _inner_error(self, status: int, code: str, message: str) -> bytes:
        body = _document({"error": code, "message": message})
        response = BinaryResponse(status, (("content-type", _ERROR_CONTENT_TYPE),), body)
        return encode_bhttp_response(response, pad_to=self._pad_to)

    @staticmethod
    def _seal(context: GatewayContext, answer: bytes) -> HandlerResult:
        headers = [("Content-Type", RESPONSE_CONTENT_TYPE), ("Cache-Control", "no-store")]
        return 200, headers, context.seal_response(answer)


# --------------------------------------------------------------------------- CLI


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m sync.gateway",
        description="Manage the Oblivious HTTP gateway's key file.",
    )
    commands = parser.add_subparsers(dest="command", required=True)
    generate = commands.add_parser(
        "generate-key", help="write a new key file (mode 0600) and print its pin"
    )
    generate.add_argument("path", type=Path, help="key file to create (never overwritten)")
    generate.add_argument("--key-id", type=int, default=1, help="key identifier 0..255")
    show = commands.add_parser("show-config", help="print the configuration(s) and pin(s)")
    show.add_argument("path", type=Path, help="key file")
    return parser


def _describe(keys: Sequence[GatewayKey]) -> str:
    lines = []
    for key in keys:
        lines.append(f"key id {key.key_id}")
        lines.append(f"  key config (hex): {key.config.encode().hex()}")
        lines.append(f"  pin (sha-256):    {key.config.digest()}")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point (``python -m sync.gateway``)."""
    args = _parser().parse_args(argv)
    try:
        if args.command == "generate-key":
            key = GatewayKey.generate(args.key_id)
            save_gateway_keys(args.path, [key])
            keys: Sequence[GatewayKey] = (key,)
        else:
            keys = load_gateway_keys(args.path)
    except SyncError as exc:
        sys.stderr.write(f"sync.gateway: error: {exc}\n")
        return 2
    sys.stdout.write(_describe(keys))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
