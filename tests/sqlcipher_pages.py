"""Decrypt the raw pages of a SQLCipher 4 database (and its WAL) for tests.

The tests use this to look *inside* the encrypted pages: deleted rows must not linger
in any page, freelist or WAL frame. It implements just the SQLCipher 4 default page
format with a raw key: 4096-byte pages, AES-256-CBC over each page, a 16-byte IV and a
64-byte HMAC-SHA512 in the reserved tail of each page; page 1 keeps its first 16 bytes
(the salt) in the clear.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

PAGE = 4096
RESERVE = 16 + 64
WAL_HEADER = 32
FRAME_HEADER = 24


def decrypt_page(page: bytes, key: bytes, pgno: int) -> bytes:
    """The plaintext of one encrypted page (page 1: the part after the salt)."""
    start = 16 if pgno == 1 else 0
    body = page[start : PAGE - RESERVE]
    iv = page[PAGE - RESERVE : PAGE - RESERVE + 16]
    dec = Cipher(algorithms.AES(key), modes.CBC(iv)).decryptor()
    return dec.update(body) + dec.finalize()


def db_pages(path: Path, key: bytes) -> Iterator[tuple[int, bytes]]:
    """(page number, plaintext) for every page of the database file."""
    raw = path.read_bytes()
    for i in range(len(raw) // PAGE):
        yield i + 1, decrypt_page(raw[i * PAGE : (i + 1) * PAGE], key, i + 1)


def wal_pages(path: Path, key: bytes) -> Iterator[tuple[int, bytes]]:
    """(page number, plaintext) for every frame of a WAL file (none if absent)."""
    if not path.exists():
        return
    raw = path.read_bytes()
    off = WAL_HEADER
    while off + FRAME_HEADER + PAGE <= len(raw):
        pgno = int.from_bytes(raw[off : off + 4], "big")
        page = raw[off + FRAME_HEADER : off + FRAME_HEADER + PAGE]
        yield pgno, decrypt_page(page, key, pgno)
        off += FRAME_HEADER + PAGE


def plaintext_of_profile(directory: Path, key: bytes) -> bytes:
    """All decrypted page contents of profile.db and its WAL, concatenated."""
    db = directory / "profile.db"
    chunks = [p for _, p in db_pages(db, key)]
    chunks += [p for _, p in wal_pages(directory / "profile.db-wal", key)]
    return b"".join(chunks)


def page1_is_sqlite(directory: Path, key: bytes) -> bool:
    """Sanity check that decryption works: page 1 decrypts to a SQLite header whose
    page-size field (bytes 16-17 of the header) says 4096."""
    raw = (directory / "profile.db").read_bytes()[:PAGE]
    plain = decrypt_page(raw, key, 1)
    return plain[:2] == PAGE.to_bytes(2, "big")
