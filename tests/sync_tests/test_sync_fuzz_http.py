"""HTTP fuzzing of the server: over 10,000 generated requests, no crash, no answer
outside the documented statuses and JSON error format, nothing counted that is invalid.

A seeded generator (``SYNC_FUZZ_SEED`` replaces the seed) builds requests from parts:
methods, targets, versions, header fields, bodies and line endings, valid and not,
then mutates some (bytes flipped in the head, truncation, pipelining, delivery in
pieces). Every request knows whether it is a valid report (``VALID``), certainly not
(``INVALID``), or unknowable (``MAYBE``: a random byte flip in its head, or a request
pipelined behind one that was not valid, which the server may read out of step).

- Over real sockets to a real :class:`SyncServer` on 127.0.0.1 (about half of the
  requests): each connection gets one request, or several pipelined, then the client
  half-closes and reads until the server closes. Every byte that comes back must parse
  as a sequence of documented answers (100 Continue aside) with exact
  ``Content-Length`` framing; a connection of one ``VALID`` request must get exactly
  one "counted", a connection with no ``VALID``/``MAYBE`` request none.
- In process through :meth:`ReportHandler.handle` (the rest): the exact oracle, counted
  if and only if valid.
- At the end: the count store holds exactly the "counted" answers; no error was logged
  (the server logs every unexpected exception), no thread died, the server's threads
  are all there, and it still counts a valid report.
"""

from __future__ import annotations

import itertools
import json
import logging
import os
import random
import re
import socket
import threading
import time
import urllib.parse
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from ondevice_sync.protocol import (
    BUNDLE_CONTENT_TYPE,
    CONTENT_TABLE_CONTENT_TYPE,
    MAX_BODY_SIZE,
    REPORT_CONTENT_TYPE,
    shift_epoch,
)
from ondevice_sync.server import ServerConfig, SyncServer

from .conftest import EPOCH, NOW, report_body, stored_total

SEED = int(os.environ.get("SYNC_FUZZ_SEED", "20261125"))
SOCKET_CONNECTIONS = 6_000  # ~8,500 requests (a fifth of the connections pipeline 2-4)
IN_PROCESS = 6_000
CLIENT_THREADS = 8

VALID, MAYBE, INVALID = "valid", "maybe", "invalid"
DOCUMENTED = {200, 400, 404, 405, 408, 411, 413, 414, 415, 425, 429, 431, 503, 505}
VALID_BODIES = {report_body(s, shift_epoch(EPOCH, w)) for s in range(8) for w in (-1, 0, 1)}
REPORT_TARGETS = ["/v1/report", "//v1/report", "http://sync.example/v1/report"]
OTHER_TARGETS = [
    "/v1/content", "/v1/bundle", "/v1/stats", f"/v1/stats?epoch={EPOCH}",
    "/v1/stats?epoch=2026-W40", "/v1/stats?epoch=x", "/v1/stats?epoch=a&epoch=b",
    "/v1/report?user=1", "/v1/report/", "/V1/REPORT", "/", "*", "/v1/%2e%2e/report",
    "/v1/report#x", "/\xff\xfe", "/" + "a" * 300, "/v1/ohttp", "//", "?", "/v1/stats?%zz",
]
METHODS = ["GET", "HEAD", "PUT", "DELETE", "OPTIONS", "PATCH", "BREW", "post", "POST\x00",
           "G ET", "", "CONNECT", "TRACE"]
VERSIONS = ["HTTP/2.0", "HTTP/0.9", "http/1.1", "HTTP/1.1x", "HTTP/1", "HTTP/11", "", "HTTP/3.0",
            "HTTP/1.1 extra"]
JUNK_FIELDS = [
    "NoColonHere", " folded: continuation", "Bad Name: x", "X-Ctl: a\x01b", "X-Nul: a\x00b",
    ": empty-name", "X-Tab\t: y", "Content-Length : 47", "X-Cr: a\rb",
]


@dataclass
class Req:
    raw: bytes
    kind: str  # VALID, MAYBE or INVALID
    method: str = ""
    target: str = ""


@dataclass
class Outcome:
    answers: list[tuple[int, dict[str, str], bytes]] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)


# --------------------------------------------------------------------------- generator


def gen_body(rng: random.Random) -> bytes:
    roll = rng.random()
    if roll < 0.55:
        return report_body(rng.randrange(8), shift_epoch(EPOCH, rng.choice([-1, 0, 0, 1])))
    if roll < 0.65:  # valid-looking but outside the window or K
        return rng.choice([
            report_body(rng.randrange(8), shift_epoch(EPOCH, rng.choice([-3, 2, 9]))),
            b'{"version":2,"epoch":"%s","segment":"%02d"}' % (EPOCH.encode(), rng.randrange(8, 99)),
            b'{"version":1,"epoch":"%s","segment":"01"}' % EPOCH.encode(),
        ])
    if roll < 0.85:  # a valid report with a few bytes flipped, inserted or deleted
        body = bytearray(report_body(rng.randrange(8)))
        for _ in range(rng.randint(1, 3)):
            at = rng.randrange(len(body))
            action = rng.random()
            if action < 0.4:
                body[at] = rng.randrange(256)
            elif action < 0.7:
                body.insert(at, rng.randrange(256))
            elif len(body) > 1:
                del body[at]
        return bytes(body)
    if roll < 0.95:
        return bytes(rng.randrange(256) for _ in range(rng.randint(0, 80)))
    return b"{" * rng.choice([100, MAX_BODY_SIZE, MAX_BODY_SIZE + 1, 5000])


def gen_parts(rng: random.Random) -> dict[str, Any]:
    """A request as parts, and whether it is a valid report (before raw mutations)."""
    valid = True
    method = "POST"
    if rng.random() < 0.25:
        method, valid = rng.choice(["GET"] * 4 + METHODS), False
    if rng.random() < 0.7:
        target = rng.choice(REPORT_TARGETS) if rng.random() < 0.85 else "/v1/report"
    else:
        target, valid = rng.choice(OTHER_TARGETS), False
    version = rng.choice(["HTTP/1.1"] * 6 + ["HTTP/1.0"])
    if rng.random() < 0.05:
        version, valid = rng.choice(VERSIONS), False
    body = gen_body(rng) if method in ("POST", "PUT") or rng.random() < 0.15 else b""
    if body not in VALID_BODIES:
        valid = False
    content_type = REPORT_CONTENT_TYPE
    roll = rng.random()
    if roll < 0.05:
        content_type = REPORT_CONTENT_TYPE.upper()  # compared case-insensitively: fine
    elif roll < 0.12:
        content_type, valid = rng.choice(
            ["application/json", "text/plain", "", REPORT_CONTENT_TYPE + "; x=1",
             f"{REPORT_CONTENT_TYPE}, {REPORT_CONTENT_TYPE}"]), False
    fields: list[tuple[str, str]] = []
    if rng.random() < 0.9:
        fields.append((rng.choice(["Host", "host", "HOST"]), "127.0.0.1"))
    if rng.random() < 0.95:
        fields.append((rng.choice(["Content-Type", "content-type"]), content_type))
    elif method == "POST":
        valid = False  # no Content-Type: 415
    length = str(len(body))
    roll = rng.random()
    if roll < 0.04:
        length = rng.choice([" " + length + " ", "0" + length])  # still the same number
    elif roll < 0.12:
        length, valid = rng.choice(
            ["-1", "+" + length, length + "x", "1e3", "", "99999999999999999999",
             f"{length}, {length}", "\u00b2", str(len(body) + rng.randint(1, 5)),
             str(max(0, len(body) - rng.randint(1, 5)))]), False
    omit_length = rng.random() < 0.05
    if omit_length and method == "POST":
        valid = False
    if not omit_length:
        fields.append(("Content-Length", length))
    if not omit_length and rng.random() < 0.04:
        fields.append(("Content-Length", length))  # duplicated: 400
        valid = False
    if rng.random() < 0.04:
        fields.append(("Transfer-Encoding", rng.choice(["chunked", "identity", "gzip"])))
        valid = False
    if rng.random() < 0.1:
        fields.append(("Accept", "application/json"))
    if rng.random() < 0.06:
        fields.append(("Expect", "100-continue"))
    if rng.random() < 0.1:
        fields.append(("Connection", rng.choice(["close", "keep-alive", "Close", "upgrade"])))
    if rng.random() < 0.05:
        fields.append(("X-Anything", "".join(chr(rng.randrange(32, 127)) for _ in range(20))))
    if rng.random() < 0.06:
        fields.insert(rng.randrange(len(fields) + 1), ("", rng.choice(JUNK_FIELDS)))
        valid = False
    if rng.random() < 0.02:
        fields += [(f"X-Many-{n}", "y") for n in range(101)]
        valid = False
    if rng.random() < 0.02:
        fields.append(("X-Huge", "h" * rng.choice([8000, 17000])))
        if len(fields[-1][1]) > 16000:
            valid = False
    rng.shuffle(fields)
    return {
        "method": method, "target": target, "version": version, "fields": fields,
        "body": body, "valid": valid,
        "eol": "\r\n" if rng.random() < 0.85 else "\n",
        "lead": rng.random() < 0.03,
    }


def encode(parts: dict[str, Any]) -> bytes:
    eol = parts["eol"]
    line = " ".join(x for x in (parts["method"], parts["target"], parts["version"]))
    lines = [line] + [value if not name else f"{name}: {value}" for name, value in
                      parts["fields"]]
    head = (eol.join(lines) + eol + eol).encode("latin-1")
    return (b"\r\n" if parts["lead"] else b"") + head + parts["body"]


def gen_request(rng: random.Random) -> Req:
    parts = gen_parts(rng)
    raw = encode(parts)
    kind = VALID if parts["valid"] else INVALID
    roll = rng.random()
    head_end = raw.find(b"\n\r\n") if parts["eol"] == "\r\n" else raw.find(b"\n\n")
    if roll < 0.08 and head_end > 0:  # a few bytes of the head flipped
        mutated = bytearray(raw)
        for _ in range(rng.randint(1, 3)):
            mutated[rng.randrange(head_end)] = rng.randrange(256)
        # Either way: "Transfer-Encoding" may become "Transfe*-Encoding", "POST" "POSt".
        raw, kind = bytes(mutated), MAYBE
    elif roll < 0.13:  # cut short: the server sees the end of the stream mid-request
        raw, kind = raw[: rng.randrange(max(1, len(raw)))], INVALID
    elif roll < 0.16:  # plain garbage, sometimes with an empty line in it
        raw = bytes(rng.randrange(256) for _ in range(rng.randint(1, 300)))
        if rng.random() < 0.5:
            raw += b"\r\n\r\n"
        kind = INVALID
    return Req(raw, kind, parts["method"], parts["target"])


def gen_connections(rng: random.Random, n: int) -> list[list[Req]]:
    """One request per connection, or a few pipelined. Behind a request that is not
    valid, the server may read the next ones out of step (a cut-short request runs into
    the next one, a wrong length eats into it), so they become MAYBE."""
    connections = []
    for _ in range(n):
        count = 1 if rng.random() < 0.8 else rng.randint(2, 4)
        requests = [gen_request(rng) for _ in range(count)]
        for before, after in itertools.pairwise(requests):
            if before.kind != VALID:
                after.kind = MAYBE
        connections.append(requests)
    return connections


# --------------------------------------------------------------------------- checking


def check_answer(
    status: int, headers: dict[str, str], body: bytes, bundle: bytes, problems: list[str]
) -> None:
    if status not in DOCUMENTED:
        problems.append(f"undocumented status {status}")
        return
    content_type = headers.get("content-type", "")
    if status == 200:
        if content_type == "application/json":
            document = json.loads(body)
            if document != {"status": "counted"} and document.get("version") != 2:
                problems.append(f"unexpected 200 document {body[:80]!r}")
        elif content_type == BUNDLE_CONTENT_TYPE:
            if body != bundle:
                problems.append("the bundle's bytes differ")
        elif content_type != CONTENT_TABLE_CONTENT_TYPE:
            problems.append(f"200 with content type {content_type!r}")
        return
    if content_type != "application/json":
        problems.append(f"{status} with content type {content_type!r}")
        return
    try:
        document = json.loads(body)
    except ValueError:
        problems.append(f"{status} with a body that is not JSON: {body[:80]!r}")
        return
    if not (
        isinstance(document, dict)
        and isinstance(document.get("error"), str) and document["error"]
        and isinstance(document.get("message"), str) and document["message"]
        and set(document) <= {"error", "message", "available_at"}
    ):
        problems.append(f"{status} with a malformed error document {body[:120]!r}")


STATUS_LINE = re.compile(rb"HTTP/1\.1 ([0-9]{3}) [A-Za-z ]+\Z")


def parse_answers(data: bytes, head_only_last: bool, bundle: bytes) -> Outcome:
    """Split everything the server sent into answers; note anything out of format."""
    outcome = Outcome()
    at = 0
    while at < len(data):
        end = data.find(b"\r\n\r\n", at)
        if end < 0:
            outcome.problems.append(f"trailing bytes without a head: {data[at:at + 80]!r}")
            break
        lines = data[at:end].split(b"\r\n")
        match = STATUS_LINE.match(lines[0])
        if match is None:
            outcome.problems.append(f"bad status line {lines[0][:80]!r}")
            break
        status = int(match.group(1))
        at = end + 4
        if status == 100:
            if len(lines) != 1:
                outcome.problems.append("100 Continue with header fields")
            continue
        headers: dict[str, str] = {}
        for line in lines[1:]:
            name, colon, value = line.decode("latin-1").partition(": ")
            if not colon or name.lower() in headers:
                outcome.problems.append(f"bad or repeated header field {line[:80]!r}")
            headers[name.lower()] = value
        length_text = headers.get("content-length", "")
        if not length_text.isdigit():
            outcome.problems.append(f"{status} without a Content-Length")
            break
        length = int(length_text)
        if head_only_last and at == len(data):  # the answer to HEAD: a head only
            outcome.answers.append((status, headers, b""))
            break
        body = data[at : at + length]
        if len(body) != length:
            outcome.problems.append(f"{status}: {len(body)} body bytes of {length}")
            break
        at += length
        check_answer(status, headers, body, bundle, outcome.problems)
        outcome.answers.append((status, headers, body))
    return outcome


def exchange(address: tuple[str, int], requests: list[Req], pieces: bool) -> bytes:
    payload = b"".join(r.raw for r in requests)
    with socket.create_connection(address, timeout=10) as sock:
        try:
            if pieces and len(payload) > 3:  # delivered in three pieces
                cut = sorted(random.Random(len(payload)).sample(range(1, len(payload)), 2))
                for chunk in (payload[: cut[0]], payload[cut[0] : cut[1]], payload[cut[1] :]):
                    sock.sendall(chunk)
                    time.sleep(0.002)
            else:
                sock.sendall(payload)
            sock.shutdown(socket.SHUT_WR)
        except OSError:
            pass  # the server may refuse and close before everything was sent
        data = b""
        try:
            while chunk := sock.recv(65536):
                data += chunk
        except ConnectionResetError:
            pass
        return data


# --------------------------------------------------------------------------- the test


@pytest.fixture
def fuzz_server(tmp_path: Path) -> Iterator[SyncServer]:
    content = tmp_path / "content.json"
    content.write_text(json.dumps({"version": 2, "segments": [[f"i{n}"] for n in range(8)]}))
    bundle = tmp_path / "catalog.bundle"
    bundle.write_bytes(os.urandom(3000))
    config = ServerConfig(
        k=8, db_path=tmp_path / "counts.db", port=0, rate_limit=0, synchronous="NORMAL",
        content_path=content, bundle_path=bundle, workers=8, request_timeout=5.0,
    )
    server = SyncServer(config=config, clock=lambda: NOW).start()
    yield server
    server.close()


def test_ten_thousand_generated_requests_crash_nothing_and_count_only_valid_reports(
    fuzz_server: SyncServer, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING)
    died: list[str] = []
    previous_hook = threading.excepthook
    threading.excepthook = lambda args: died.append(f"{args.thread}: {args.exc_value!r}")
    try:
        _run_campaign(fuzz_server, died)
    finally:
        threading.excepthook = previous_hook
    assert died == []
    logged = [
        r for r in caplog.records
        if r.name.startswith("ondevice_sync") and r.levelno >= logging.ERROR
    ]
    assert logged == [], [r.getMessage() for r in logged[:5]]


def _run_campaign(server: SyncServer, died: list[str]) -> None:
    rng = random.Random(SEED)
    started = time.monotonic()
    bundle = server.handler.config.bundle_path.read_bytes()  # type: ignore[union-attr]
    connections = gen_connections(rng, SOCKET_CONNECTIONS)
    pieces = [rng.random() < 0.05 for _ in connections]
    in_process = [gen_parts(rng) for _ in range(IN_PROCESS)]
    total = sum(len(c) for c in connections) + len(in_process)
    assert total >= 10_000

    def run(index: int) -> tuple[int, Outcome]:
        requests = connections[index]
        data = exchange(server.address, requests, pieces[index])
        head_last = any(r.method == "HEAD" for r in requests)
        return index, parse_answers(data, head_last, bundle)

    counted_socket = 0
    problems: list[str] = []
    with ThreadPoolExecutor(CLIENT_THREADS) as pool:
        for index, outcome in pool.map(run, range(len(connections))):
            requests = connections[index]
            where = f"seed {SEED}, connection {index}: {[r.raw[:200] for r in requests]!r}"
            problems += [f"{where}: {p}" for p in outcome.problems]
            counted = sum(
                1 for status, _, body in outcome.answers
                if status == 200 and body == b'{"status":"counted"}'
            )
            counted_socket += counted
            possible = sum(1 for r in requests if r.kind in (VALID, MAYBE))
            if counted > possible:
                problems.append(f"{where}: {counted} counted, at most {possible} valid")
            if len(requests) == 1 and requests[0].kind == VALID and counted != 1:
                problems.append(f"{where}: a valid report was not counted: {outcome.answers!r}")
            if len(outcome.answers) > len(requests) + 1:
                problems.append(f"{where}: more answers than requests")
            if any(status == 500 for status, _, _ in outcome.answers):
                problems.append(f"{where}: 500")
    assert problems == [], "\n".join(problems[:10])

    counted_in_process = 0
    for index, parts in enumerate(in_process):
        headers = {name: value for name, value in parts["fields"] if name}
        status, answer_headers, body = server.handler.handle(
            parts["method"], parts["target"], headers, parts["body"]
        )
        problems_here: list[str] = []
        check_answer(status, {k.lower(): v for k, v in answer_headers}, body, bundle,
                     problems_here)
        split = urllib.parse.urlsplit(parts["target"])
        content_type = next(
            (v for k, v in headers.items() if k.lower() == "content-type"), ""
        ).strip().lower()
        valid = (
            parts["method"] == "POST" and split.path == "/v1/report" and not split.query
            and "#" not in parts["target"] and content_type == REPORT_CONTENT_TYPE
            and parts["body"] in VALID_BODIES
        )
        counted = status == 200 and body == b'{"status":"counted"}'
        if counted != valid or status == 500 or problems_here:
            problems.append(f"seed {SEED}, in-process {index}: {parts!r} -> {status} {body!r} "
                            f"{problems_here}")
        counted_in_process += counted
    assert problems == [], "\n".join(problems[:10])

    # Exactly the acknowledged reports are in the store; the server still works.
    db = server.handler.config.db_path
    assert stored_total(db) == counted_socket + counted_in_process
    assert counted_socket > 500 and counted_in_process > 1000  # the oracle was exercised
    names = [t.name for t in threading.enumerate()]
    assert "sync-server" in names
    assert sum(name.startswith("sync-worker-") for name in names) == 8
    with socket.create_connection(server.address, timeout=5) as sock:
        valid = report_body(3)
        sock.sendall(
            b"POST /v1/report HTTP/1.1\r\nContent-Type: " + REPORT_CONTENT_TYPE.encode()
            + b"\r\nContent-Length: 47\r\nConnection: close\r\n\r\n" + valid
        )
        assert sock.recv(4096).startswith(b"HTTP/1.1 200 ")
    assert stored_total(db) == counted_socket + counted_in_process + 1
    assert time.monotonic() - started < 60
    assert died == []
