"""Reading WebDataset shards record by record, with every failure accounted for.

Why not `ray.data.read_webdataset` or `webdataset.WebDataset`: both stop the
whole read at the first truncated tar and report failures without the shard
and record key, and neither bounds member names or sizes. Here a shard is read
with the standard library's streaming tar reader; a record is the group of
consecutive members sharing a key (WebDataset's convention: key = name up to
the first dot of the basename, extension = the rest, lower-cased). A document's
parts are members KEY.<i>.<ext>: their extension is `<i>.<ext>` (part_ext).
"""

from __future__ import annotations

import io
import posixpath
import re
import tarfile
from collections.abc import Iterator
from dataclasses import dataclass, field

from .shards import REMOTE

MAX_NAME = 1024  # longest member name accepted (untrusted input bound)
_HEADERS = (
    tarfile.GNUTYPE_LONGNAME,
    tarfile.GNUTYPE_LONGLINK,
    tarfile.XHDTYPE,
    tarfile.XGLTYPE,
    tarfile.SOLARIS_XHDTYPE,
)


class HeaderTooLarge(tarfile.HeaderError):
    pass


class ShardTooLarge(OSError):
    """A compressed shard decompressed past data.limits.shard_bytes."""


# A compressed shard is known by its first bytes, whatever its name says (a `.tar` that is gzip, a
# `.tar.gz` that is plain): gzip, bzip2, xz, zstd.
_MAGIC = ((b"\x1f\x8b", "gz"), (b"BZh", "bz2"), (b"\xfd7zXZ\x00", "xz"), (b"\x28\xb5\x2f\xfd", "zst"))


def _decompressing(f, kind: str):
    """A reader of `f`'s decompressed bytes. The standard library's for gzip, bzip2 and xz; zstandard's
    stream reader for zstd (tarfile has none before Python 3.14)."""
    import bz2
    import gzip
    import lzma

    if kind == "gz":
        return gzip.GzipFile(fileobj=f, mode="rb")
    if kind == "bz2":
        return bz2.BZ2File(f)
    if kind == "xz":
        return lzma.LZMAFile(f)
    import zstandard  # a dependency: WebDataset shards are often .tar.zst

    return zstandard.ZstdDecompressor().stream_reader(f, read_across_frames=True)


class ShardReadFailed(OSError):
    """A remote shard's bytes could not be read, its retries spent (the store gone, the connection dropped)."""


MAX_PAUSE_S = 30.0  # the longest pause between two tries of a remote read (doubling from 0.5 s reaches it at the 7th)


def retry_pause(attempt: int, first: float = 0.5) -> float:
    """The pause before retry number `attempt` (1, 2, ...) of a remote read: doubling from `first`, capped at
    MAX_PAUSE_S (uncapped, the 20th retry of data.remote_retries = 20 waited 72 hours)."""
    return min(MAX_PAUSE_S, first * 2 ** (attempt - 1))


class _Retrying(io.RawIOBase):
    """A remote shard's bytes, read again from where they broke off. A read of the object store that fails
    (the connection dropped, the server answered an error) reopens the object and seeks back to the same
    byte, up to `retries` times with a doubling pause (0.5 s, 1 s, 2 s... at most MAX_PAUSE_S); then
    ShardReadFailed, and the shard is errored as `shard_read_failed` with what was read whole before kept.
    So is a read still going after `deadline_s` (a store that trickles bytes would hold its actor forever).
    (fsspec's own retries cover one request; this covers the stream, whose reader cannot start the tar again.)"""

    def __init__(self, url: str, retries: int, pause: float = 0.5, deadline_s: float = float("inf")):
        super().__init__()
        import time

        import fsspec

        self.url, self.retries, self.pause, self.pos, self.failures = url, retries, pause, 0, 0
        self.deadline_s, self.deadline = deadline_s, time.monotonic() + deadline_s
        # 8 MiB requests: s3fs's default block is 50 MiB, held per open shard in every reading actor
        fs, path = fsspec.core.url_to_fs(url)
        self._open = lambda: fs.open(path, "rb", block_size=8 << 20)
        self.f = self._call(self._open, reopen=False)

    def _call(self, fn, reopen: bool = True):
        import time

        while True:
            if time.monotonic() > self.deadline:
                raise self._late()
            try:
                return self._bounded(fn)
            except (ShardTooLarge, HeaderTooLarge, FileNotFoundError, ShardReadFailed):
                raise  # not the store failing (no retry brings a missing shard back), or out of time
            except Exception as e:  # whatever the store's client raises is a failed read
                if self.failures >= self.retries:
                    raise ShardReadFailed(
                        f"{self.url}: {type(e).__name__}: {str(e)[:200]} (after {self.failures} "
                        f"retries, at byte {self.pos})"
                    ) from e
                time.sleep(retry_pause(self.failures + 1, self.pause))
                self.failures += 1
                if reopen:
                    try:
                        self.f.close()
                    except Exception:  # noqa: BLE001 - the old handle is broken anyway
                        pass
                    try:
                        self.f = self._open()
                        self.f.seek(self.pos)
                    except Exception:  # noqa: BLE001 - counted as this attempt; the next read tries again
                        pass

    def _late(self) -> ShardReadFailed:
        return ShardReadFailed(
            f"{self.url}: still reading after data.read_deadline_s = {self.deadline_s:g} s (at byte {self.pos})"
        )

    def _bounded(self, fn):
        """fn() within what is left of the deadline. A store that trickles bytes blocks one read call for as
        long as it likes (each byte resets the client's socket timeout), so the call runs in a daemon thread
        and is given up at the deadline; the shard then fails, and its file is closed under the thread."""
        import threading
        import time

        if self.deadline_s == float("inf"):
            return fn()
        left = self.deadline - time.monotonic()
        box: dict = {}

        def run() -> None:
            try:
                box["value"] = fn()
            except BaseException as e:  # noqa: BLE001 - handed back to the reading thread as it is
                box["error"] = e

        t = threading.Thread(target=run, daemon=True, name="omnistream-shard-read")
        t.start()
        t.join(max(left, 0.0))
        if t.is_alive():
            raise self._late()
        if "error" in box:
            raise box["error"]
        return box["value"]

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def readinto(self, b) -> int:
        data = self._call(lambda: self.f.read(len(b)))
        b[: len(data)] = data
        self.pos += len(data)
        return len(data)

    def seek(self, offset: int, whence: int = 0) -> int:
        self.pos = self._call(lambda: self.f.seek(offset, whence))
        return self.pos

    def tell(self) -> int:
        return self.pos

    def close(self) -> None:
        if not self.closed:
            try:
                self.f.close()
            except Exception:  # noqa: BLE001
                pass
        super().close()


class _Bounded(io.RawIOBase):
    """The decompressed stream of a compressed shard, counted: past `limit` bytes it raises ShardTooLarge,
    so neither a bomb (bzip2 turns 64 MiB of zeros into 79 bytes) nor members skipped for their size
    cost more than the limit. It keeps the last bytes read, for the check of where the tar reader
    stopped (tarfile reads ahead of the header it stops at)."""

    KEEP = 64 << 10

    def __init__(self, source, raw, limit: int):
        super().__init__()
        self.source, self.raw, self.limit, self.n, self.tail = source, raw, limit, 0, bytearray()

    def readable(self) -> bool:
        return True

    def readinto(self, b) -> int:
        data = self.raw.read(min(len(b), 1 << 20))
        self.n += len(data)
        if self.n > self.limit:
            raise ShardTooLarge(f"more than {self.limit} bytes decompressed (data.limits.shard_bytes)")
        b[: len(data)] = data
        self.tail += data
        if len(self.tail) > 2 * self.KEEP:
            del self.tail[: -self.KEEP]
        return len(data)

    def after(self, offset: int) -> str | None:
        """Why the tar stream did not end at `offset` (where the tar reader stopped), else None: its end is
        zero blocks; no bytes at all there is a stream cut between members; anything else is a header
        the reader could not read, with the records after it unread."""
        start = self.n - len(self.tail)
        if offset < start:
            return None  # read past what is kept: the reader's own look-ahead is never this large
        rest = bytes(self.tail[offset - start :])
        anything, nonzero = bool(rest), bool(rest.strip(b"\0"))
        while not nonzero:
            more = self.read(1 << 20)
            if not more:
                break
            anything, nonzero = True, bool(more.strip(b"\0"))
        if nonzero:
            return (
                f"an invalid tar header at byte {offset} of the decompressed stream: the reader stopped "
                f"there, what follows unread"
            )
        if not anything:
            return "the decompressed stream ends without an end-of-archive marker"
        return None

    def close(self) -> None:
        if not self.closed:
            self.raw.close()
            self.source.close()
        super().close()


class _BoundedTarInfo(tarfile.TarInfo):
    """tarfile reads a GNU long-name or pax header's data whole, before any name can be checked: a
    header claiming gigabytes would be read into memory. This refuses one over `max_header` bytes."""

    max_header = 64 << 10

    def _proc_member(self, tf):
        if self.type in _HEADERS and self.size > self.max_header:
            raise HeaderTooLarge(f"a {self.type!r} tar header of {self.size} bytes > {self.max_header}")
        return super()._proc_member(tf)


@dataclass
class RawRecord:
    """One record; with an empty key it stands for a failure of the shard as a whole."""

    shard: str
    key: str
    fields: dict[str, bytes] = field(default_factory=dict)
    error: str | None = None  # reason, when the record could not be read whole
    detail: str = ""


def _unsafe(name: str) -> str | None:
    if len(name) > MAX_NAME:
        return "member_name_too_long"
    if name.startswith("/") or "\\" in name or ".." in name.split("/") or any(ord(c) < 32 for c in name):
        return "member_name_unsafe"
    return None


def printable(name: str) -> str:
    """A member name as valid Unicode: the bytes that are not UTF-8 (kept by tarfile as surrogates)
    become \\xNN escapes, so keys can be hashed, logged and stored in Arrow like any other string."""
    return name.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")


def split_name(name: str) -> tuple[str, str]:
    d, base = posixpath.split(name)
    if "." not in base:
        return posixpath.join(d, base), ""
    stem, ext = base.split(".", 1)
    return posixpath.join(d, stem), ext.lower()


_PART = re.compile(r"(\d{1,9})\.(.+)")  # KEY.<i>.<ext>: the part's place in its document, then its extension


def part_ext(field_name: str) -> tuple[int | None, str]:
    """(the part's place, its extension) of a record field: `2.txt` -> (2, "txt"); `txt` -> (None, "txt")."""
    m = _PART.fullmatch(field_name)
    return (int(m.group(1)), m.group(2)) if m else (None, field_name)


def read_shard(
    url: str,
    max_member_bytes: int,
    limits=None,
    ext_bytes: dict[str, int] | None = None,
    retries: int = 3,
    deadline_s: float = float("inf"),
) -> Iterator[RawRecord]:
    """Yield the records of one shard; a failure becomes a record with `error` set, never an exception.

    `limits` (config.Limits) bounds each record's members, total bytes and the tar headers;
    `ext_bytes` caps members by extension (a modality's data.limits.member_bytes, over its keys);
    `retries`: how often a remote shard's read is resumed after a failure (_Retrying); `deadline_s`: the
    wall-clock seconds a remote shard's read may take."""
    import fsspec

    from .config import Limits

    limits = limits or Limits()
    ext_bytes = ext_bytes or {}
    tarinfo = type("BoundedTarInfo", (_BoundedTarInfo,), {"max_header": limits.header_bytes})

    try:
        f = (
            io.BufferedReader(_Retrying(url, retries, deadline_s=deadline_s), 1 << 20)
            if url.startswith(REMOTE)
            else fsspec.open(url, "rb").open()
        )
        kind = _compression(f)
        if kind is not None:
            f = _Bounded(f, _decompressing(f, kind), limits.shard_bytes)
    except Exception as e:  # noqa: BLE001 - any failure to open a shard is the shard's, accounted
        missing = isinstance(e, FileNotFoundError) or isinstance(e.__cause__, FileNotFoundError)
        # a store that failed while the shard was opened is an outage, tried again by the next run (cache.py)
        reason = (
            "shard_missing"
            if missing
            else "shard_read_failed"
            if isinstance(e, ShardReadFailed)
            else "shard_unreadable"
        )
        yield RawRecord(url, "", error=reason, detail=f"{type(e).__name__}: {e}")
        return
    cur: RawRecord | None = None
    seen_keys: set[str] = set()
    cut = _cut_short(f) if kind is None else None  # a compressed shard's size says nothing of its tar
    in_header = False  # True while the parser reads the next header (the record before it is whole)
    try:
        with f, tarfile.open(fileobj=f, mode="r|", encoding="utf-8", errors="surrogateescape", tarinfo=tarinfo) as tar:
            members = iter(tar)
            while True:
                in_header = True
                m = next(members, None)
                in_header = False
                if m is None:
                    break
                if not m.isfile():
                    continue
                bad = _unsafe(m.name)
                name = printable(m.name)
                key, ext = split_name(name)
                if cur is not None and key != cur.key:
                    yield cur
                    cur = None
                if cur is None:
                    if key in seen_keys:
                        # members of a key that appeared earlier in this shard: a duplicate record
                        cur = RawRecord(url, key, error="duplicate_key", detail=name)
                    else:
                        cur = RawRecord(url, key)
                    seen_keys.add(key)
                if cur.error:
                    continue
                cap = min(max_member_bytes, ext_bytes.get(part_ext(ext)[1], max_member_bytes))
                held = sum(len(v) for v in cur.fields.values())
                if bad:
                    cur.error, cur.detail = bad, name[:200]
                elif m.size > cap:
                    cur.error, cur.detail = "member_too_large", f"{name}: {m.size} bytes > {cap}"
                elif len(cur.fields) >= limits.members:
                    cur.error, cur.detail = "too_many_members", f"{name}: more than {limits.members} members"
                elif held + m.size > limits.record_bytes:
                    cur.error, cur.detail = "record_too_large", f"{name}: {held + m.size} bytes > {limits.record_bytes}"
                elif not ext:
                    cur.error, cur.detail = "member_no_extension", name
                elif ext in cur.fields:
                    cur.error, cur.detail = "duplicate_field", name
                else:
                    cur.fields[ext] = tar.extractfile(m).read()
            if kind is not None:
                stopped = f.after(tar.offset)
            else:
                stopped = _stopped_early(f, tar.offset) if not cut else None
    except Exception as e:  # noqa: BLE001 - a shard's bytes end the shard, never the reader: said, with a reason
        # truncated or corrupt tar: what was read whole is kept, the record being read is lost, with a reason.
        # Crafted headers raise what the tar parser happens to raise (3,000 chained GNU long-name headers a
        # RecursionError, a sparse header cut short an IndexError): those are a damaged shard.
        if isinstance(e, HeaderTooLarge):
            reason = "header_too_large"
        elif isinstance(e, ShardTooLarge):
            reason = "shard_too_large"
        elif isinstance(e, ShardReadFailed):
            reason = "shard_read_failed"
        elif isinstance(e, (tarfile.TarError, EOFError, OSError, ValueError)):
            reason = "shard_truncated"
        else:
            reason = "shard_damaged"
        if reason == "shard_damaged" and in_header and cur is not None:
            # the damage is in the next header: every member of the record before it was read whole
            yield cur
            cur = None
        if cur is not None:
            cur.error, cur.detail = reason, f"{type(e).__name__}: {e}"
            cur.fields = {}
            yield cur
        if cur is None or reason == "shard_read_failed":  # the store failed: the shard itself is errored too
            yield RawRecord(url, "", error=reason, detail=f"{type(e).__name__}: {e}")
        return
    if cur is not None:
        yield cur
    if stopped:
        yield RawRecord(
            url, "", error="shard_truncated" if "without an end" in stopped else "shard_damaged", detail=stopped
        )
    if cut:
        # the stdlib reader ends quietly when a tar is cut exactly between members: say so
        yield RawRecord(url, "", error="shard_truncated", detail=cut)


def _compression(f) -> str | None:
    """The shard's compression, by its first bytes (None: a plain tar). `f` is left at its start."""
    if f.seekable():
        head = f.read(6)
        f.seek(0)
    else:  # a stream that cannot seek is peeked at through a buffer
        head = f.peek(6)[:6] if hasattr(f, "peek") else b""
    return next((kind for magic, kind in _MAGIC if head.startswith(magic)), None)


def _stopped_early(f, offset: int) -> str | None:
    """Why the tar reader ended before the archive did, else None. Python's tarfile takes an invalid header
    past the first one (a damaged checksum) for the end of the archive and stops there quietly; a real
    end is zero blocks. So bytes that are not zeros where the reader stopped are the records it never
    read: the shard is damaged, and says how much of it went unread. Streams that cannot seek (and
    compressed shards, whose offsets are not the file's) are not checked."""
    try:
        if not f.seekable():
            return None
        size = f.seek(0, 2)
        f.seek(offset)
        block = f.read(1024)
    except (OSError, ValueError):
        return None
    if block.strip(b"\0"):
        return (
            f"an invalid tar header at byte {offset}: the reader stopped there, {size - offset} of {size} bytes unread"
        )
    return None


def _cut_short(f) -> str | None:
    """Why a seekable tar is visibly incomplete (size not in 512-byte blocks, or no end-of-archive
    zero blocks), else None. Streams that cannot seek are not checked."""
    try:
        if not f.seekable():
            return None
        size = f.seek(0, 2)
        if size % 512:
            reason = f"{size} bytes is not a whole number of 512-byte tar blocks"
        else:
            f.seek(max(0, size - 1024))
            reason = None if f.read(1024) == bytes(1024) else "no end-of-archive marker"
        f.seek(0)
        return reason
    except (OSError, ValueError):
        return None
