"""Minimal, fast ustar packing and parsing for shards of many tiny members.

Python's tarfile costs ~50 µs per member; a shard holds four members per sample, so the WebDataset
backend packs and parses headers itself. Output is standard ustar (read by tar, tarfile and webdataset):
mtime 0, owner root, mode 0444, so the same content always gives the same bytes.
"""

from __future__ import annotations

from typing import Iterator

from ..toolbox.errors import StoreError

BLOCK = 512
_PAD = bytes(BLOCK)


def _header(name: bytes, size: int) -> bytes:
    if len(name) > 100:
        raise StoreError(f"tar member name {name!r} is longer than 100 bytes")
    head = b"".join([
        name.ljust(100, b"\0"), b"0000444\0", b"0000000\0", b"0000000\0",
        b"%011o\0" % size, b"00000000000\0", b" " * 8, b"0", bytes(100),
        b"ustar\0", b"00", bytes(32), bytes(32), b"0000000\0", b"0000000\0", bytes(155), bytes(12),
    ])
    checksum = b"%06o\0 " % sum(head)
    return head[:148] + checksum + head[156:]


def pack(members: list[tuple[str, bytes]]) -> bytes:
    """A whole tar archive (with the two closing zero blocks) holding `members` in order."""
    parts = []
    for name, data in members:
        parts.append(_header(name.encode(), len(data)))
        parts.append(data)
        if len(data) % BLOCK:
            parts.append(_PAD[: BLOCK - len(data) % BLOCK])
    parts.append(_PAD * 2)
    return b"".join(parts)


def _octal(field: bytes) -> int:
    """A ustar number field: octal digits padded with NULs or spaces (empty: 0); ValueError for anything else."""
    digits = field.strip(b"\0 ")
    if digits and (not digits.isdigit() or b"8" in digits or b"9" in digits):
        raise ValueError(field)
    return int(digits or b"0", 8)


def members(buf: bytes, where: str) -> Iterator[tuple[str, memoryview]]:
    """(name, data) of each regular file in a tar archive; pax headers are skipped, checksums verified."""
    view = memoryview(buf)
    off, n = 0, len(buf)
    while off + BLOCK <= n:
        head = buf[off:off + BLOCK]
        if head == _PAD:
            return
        try:  # octal digits only: int() would also take a sign, spaces and underscores (a negative size loops)
            size = _octal(head[124:136])
            stored = _octal(head[148:156])
        except ValueError:
            raise StoreError(f"{where}: bad tar header at byte {off}; the shard is corrupt, delete it and "
                             "finish the store with --resume") from None
        if stored != sum(head[:148]) + 256 + sum(head[156:]):
            raise StoreError(f"{where}: tar header checksum mismatch at byte {off}; the shard is corrupt, "
                             "delete it and finish the store with --resume")
        kind = head[156:157]
        name = head[:100].rstrip(b"\0").decode("utf-8", "replace")
        prefix = head[345:500].rstrip(b"\0").decode("utf-8", "replace") if head[257:262] == b"ustar" else ""
        start = off + BLOCK
        off = start + -(-size // BLOCK) * BLOCK
        if off > n:
            raise StoreError(f"{where}: member {name!r} is truncated; the shard is corrupt, delete it and "
                             "finish the store with --resume")
        if kind in (b"x", b"g"):  # pax extended headers: metadata only
            continue
        if kind not in (b"0", b"\0"):
            raise StoreError(f"{where}: member {name!r} is not a regular file (tar type {kind!r}); "
                             "the store is foreign, re-create it")
        yield (f"{prefix}/{name}" if prefix else name), view[start:start + size]
    raise StoreError(f"{where}: the archive ends without its closing blocks; the shard is truncated, "
                     "delete it and finish the store with --resume")
