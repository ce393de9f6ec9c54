"""Inputs that are URLs: ``s3://bucket/key``, ``https://host/path``, ``http://``, any fsspec URL.

The one owner of fsspec. A task still carries a location, never a handle: each process opens the
URL itself (:func:`filesystem`, kept per process), so the same task graph runs on threads,
processes or a cluster whose workers share no file system. Credentials and endpoint come from the
standard AWS environment (``AWS_ENDPOINT_URL``, ``AWS_ACCESS_KEY_ID``, ``AWS_SECRET_ACCESS_KEY``,
``AWS_DEFAULT_REGION``, ``AWS_PROFILE``), which s3fs reads itself, or from ``storage_options``
(config ``input.storage_options``), which travel with the task; neither is ever written into a
message: every URL fcnpipe shows goes through :func:`redact` first.

Reads are ranged: :func:`read_ranges` fetches the byte ranges a window needs (a file's tiles) in
one concurrent batch, adjacent ranges merged into one request, so that a window's tiles arrive
together instead of one round trip after another; :func:`read_once` fetches each keyed range
(a file tile) once per process, however many threads want it at the same time; and :data:`FETCHED`
counts what came over the network (the bytes-fetched / file-size ratio a run reports).
"""

from __future__ import annotations

import os
import re
import threading
from collections.abc import Hashable, Mapping, Sequence
from typing import Any, Protocol, TypeVar
from urllib.parse import urlsplit, urlunsplit

from pipeline.errors import ConfigError, SourceError

METADATA_BLOCK = 1 << 16
"""Bytes per block of the cache tifffile's directory parsing reads through (64 KiB: a block holds
an IFD and its tags, a few hold a slide's tile offsets; a block per tiny tag read would cost a round
trip each, and larger blocks fetch image data the directory does not need)."""
MERGE_GAP = 1 << 16
"""Ranges this close together are fetched as one request (the bytes between are read and dropped)."""
_SCHEME = re.compile(r"^[a-zA-Z][a-zA-Z0-9+.-]*://")


class Fetched:
    """Bytes and requests this process fetched over the network (thread-safe counters)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.bytes = 0
        self.requests = 0

    def add(self, count: int, requests: int = 1) -> None:
        with self._lock:
            self.bytes += count
            self.requests += requests

    def reset(self) -> None:
        with self._lock:
            self.bytes = self.requests = 0


FETCHED = Fetched()


def is_url(path: object) -> bool:
    """Whether ``path`` is a URL (``scheme://...``) other than a local ``file://`` one."""
    return isinstance(path, str) and bool(_SCHEME.match(path)) and not path.lower().startswith("file://")


def redact(url: str) -> str:
    """``url`` as it may be shown: without user, password or query (presigned URLs carry their
    signature in the query).

    >>> redact("https://user:secret@host/a/b.svs?X-Amz-Signature=abc")
    'https://host/a/b.svs'
    >>> redact("s3://bucket/key.tif")
    's3://bucket/key.tif'
    """
    if not is_url(url):
        return url
    parts = urlsplit(url)
    host = parts.hostname or ""
    if parts.port is not None:
        host = f"{host}:{parts.port}"
    return urlunsplit((parts.scheme, host if parts.netloc else parts.netloc, parts.path, "", ""))


def options_key(options: Mapping[str, Any] | None) -> tuple[tuple[str, str], ...]:
    """``options`` as a hashable key (values by their repr: nested dicts of client settings)."""
    return tuple(sorted((str(k), repr(v)) for k, v in (options or {}).items()))


_AWS_ENVIRONMENT = ("AWS_ENDPOINT_URL", "AWS_PROFILE", "AWS_ACCESS_KEY_ID", "AWS_DEFAULT_REGION")
_filesystems: dict[tuple[object, ...], Any] = {}
_fs_lock = threading.Lock()


def filesystem(url: str, options: Mapping[str, Any] | None = None) -> tuple[Any, str]:
    """``(fsspec filesystem, path within it)`` for ``url``; one filesystem per scheme and options
    per process (its connection pool is shared by the threads)."""
    import fsspec

    scheme = urlsplit(url).scheme.lower()
    environment = tuple(os.environ.get(name, "") for name in _AWS_ENVIRONMENT)  # a new endpoint: a new client
    key = (scheme, options_key(options), environment)
    try:
        with _fs_lock:
            fs = _filesystems.get(key)
            if fs is None:
                fs = _filesystems[key] = fsspec.filesystem(scheme, skip_instance_cache=True, **dict(options or {}))
    except (ImportError, ValueError) as err:
        raise SourceError(f"{redact(url)}: cannot read {scheme}:// URLs ({short_reason(err, url)})") from err
    path = url if scheme in ("http", "https") else fs._strip_protocol(url)
    return fs, path


def short_reason(err: BaseException, url: str = "") -> str:
    """What went wrong, in a few words, with ``url`` (and any credentials in it) left out."""
    name = type(err).__name__
    if isinstance(err, FileNotFoundError):
        detail = str(err).lower()
        return "no such bucket" if "bucket does not exist" in detail or "nosuchbucket" in detail else "no such file"
    if isinstance(err, PermissionError) or "403" in str(err) or "Forbidden" in str(err):
        return "access denied"
    text = " ".join(str(err).split()) or name
    if url:
        text = text.replace(url, redact(url))
    text = re.sub(r"(?i)(key|secret|token|signature|password)=[^&\s,'\"]+", r"\1=***", text)
    if any(word in name for word in ("Connection", "Disconnect", "Timeout", "Payload")) or isinstance(
        err, ConnectionError | TimeoutError
    ):
        return f"connection failed ({name}: {text[:160]})"
    return f"{name}: {text[:200]}"


def remote_error(url: str, err: BaseException, doing: str = "cannot read") -> SourceError:
    """One line naming the URL (redacted) and what went wrong."""
    return SourceError(f"{redact(url)}: {doing} ({short_reason(err, url)})")


def info(url: str, options: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """The object's ``size`` (bytes) and a ``version`` that changes when it is rewritten (ETag,
    modification time, or size); SourceError naming the URL if it cannot be reached."""
    fs, path = filesystem(url, options)
    try:
        found = fs.info(path)
    except Exception as err:  # every backend raises its own: one line naming the URL
        if isinstance(err, FileNotFoundError) and urlsplit(url).scheme.lower() in ("http", "https"):
            try:  # fsspec's HTTP info says "not found" for every failure; a ranged GET tells which
                fs.cat_file(path, 0, 1)
            except Exception as precise:
                raise remote_error(url, precise) from precise
        raise remote_error(url, err) from err
    if found.get("type") == "directory":
        raise SourceError(f"{redact(url)}: is a folder, not a TIFF file (fcnpipe batch takes a folder of inputs)")
    size = found.get("size")
    if size is None:
        raise SourceError(f"{redact(url)}: the server does not say its size (it must answer HEAD with Content-Length)")
    version = found.get("ETag") or found.get("etag") or found.get("LastModified") or found.get("mtime") or ""
    return {"size": int(size), "version": f"{version}:{size}"}


def open_file(url: str, options: Mapping[str, Any] | None = None, size: int | None = None) -> Any:
    """A seekable binary file object over ``url`` with a block cache (for tifffile's directory)."""
    fs, path = filesystem(url, options)
    kwargs: dict[str, Any] = {"block_size": METADATA_BLOCK, "cache_type": "blockcache"}
    if size is not None and urlsplit(url).scheme.lower() in ("http", "https"):
        kwargs["size"] = size  # no second HEAD request
    try:
        return _Counted(fs.open(path, "rb", **kwargs))
    except Exception as err:
        raise remote_error(url, err) from err


class _Counted:
    """A file object that counts what its reads fetch (through the cache, so a block fetched once
    counts once)."""

    def __init__(self, file: Any) -> None:
        self._file = file
        fetcher = file.cache.fetcher

        def counted(start: int, end: int) -> bytes:
            data: bytes = fetcher(start, end)
            FETCHED.add(len(data))
            return data

        file.cache.fetcher = counted
        if hasattr(file.cache, "_fetch_block_cached"):  # blockcache binds its fetcher through an lru cache
            file.cache._fetch_block_cached.cache_clear()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._file, name)

    def __enter__(self) -> _Counted:
        return self

    def __exit__(self, *exc: object) -> None:
        self._file.close()


def read_ranges(url: str, ranges: Sequence[tuple[int, int]], options: Mapping[str, Any] | None = None) -> list[bytes]:
    """The bytes of each ``(offset, count)`` in ``ranges``, fetched concurrently in as few requests
    as :data:`MERGE_GAP` allows; raises SourceError naming the URL."""
    if not ranges:
        return []
    fs, path = filesystem(url, options)
    order = sorted(range(len(ranges)), key=lambda i: ranges[i][0])
    groups: list[list[int]] = []
    for i in order:
        offset, _ = ranges[i]
        if groups:
            last = groups[-1]
            end = max(ranges[j][0] + ranges[j][1] for j in last)
            if offset <= end + MERGE_GAP:
                last.append(i)
                continue
        groups.append([i])
    starts = [min(ranges[j][0] for j in group) for group in groups]
    ends = [max(ranges[j][0] + ranges[j][1] for j in group) for group in groups]
    try:
        blobs = fs.cat_ranges([path] * len(groups), starts, ends, on_error="raise")
    except Exception as err:
        raise remote_error(url, err) from err
    out: list[bytes] = [b""] * len(ranges)
    for group, start, blob in zip(groups, starts, blobs, strict=True):
        if isinstance(blob, BaseException):
            raise remote_error(url, blob) from blob
        FETCHED.add(len(blob))
        for j in group:
            offset, count = ranges[j]
            out[j] = bytes(blob[offset - start : offset - start + count])
    return out


K = TypeVar("K", bound=Hashable)


class Kept(Protocol):
    """Where :func:`read_once` looks for ranges fetched before and keeps what it fetches."""

    def get(self, key: Any) -> tuple[bytes, int] | None: ...

    def put(self, key: Any, value: bytes, size: int) -> None: ...


class _Flight:
    """A keyed range one thread is fetching: its bytes once they land (None: the fetch failed)."""

    __slots__ = ("data", "landed")

    def __init__(self) -> None:
        self.landed = threading.Event()
        self.data: bytes | None = None


_flights: dict[Hashable, _Flight] = {}
"""The keyed ranges being fetched in this process (an entry lives while its request is under way)."""
_flights_lock = threading.Lock()


def read_once(
    url: str, ranges: Mapping[K, tuple[int, int]], options: Mapping[str, Any] | None = None, kept: Kept | None = None
) -> dict[K, bytes]:
    """The bytes of each keyed ``(offset, count)`` in ``ranges``, each fetched once by this process
    however many threads ask for it at the same time: taken from ``kept`` if there; waited for if
    another thread is fetching it (two threads reading neighbouring windows want the same halo
    tiles); else fetched in one batch (:func:`read_ranges`) and put into ``kept`` before the threads
    waiting for it wake. A key names the same bytes wherever it is used (a file version and a tile)."""
    found: dict[K, bytes] = {}
    mine: list[K] = []
    theirs: dict[K, _Flight] = {}
    with _flights_lock:  # a range is in flight or, once landed, in ``kept``: never neither
        for key in ranges:
            cached = None if kept is None else kept.get(key)
            flight = _flights.get(key)
            if cached is not None:
                found[key] = cached[0]
            elif flight is not None:
                theirs[key] = flight
            else:
                _flights[key] = _Flight()
                mine.append(key)
    try:
        blobs = read_ranges(url, [ranges[key] for key in mine], options) if mine else []
        for key, data in zip(mine, blobs, strict=True):
            found[key] = data
            if kept is not None:
                kept.put(key, data, len(data))
    finally:  # failed or not, the waiting threads wake (and fetch it themselves if it failed)
        with _flights_lock:
            landed = [_flights.pop(key) for key in mine]
        for key, flight in zip(mine, landed, strict=True):
            flight.data = found.get(key)
            flight.landed.set()
    for key, flight in theirs.items():
        flight.landed.wait()
        found[key] = flight.data if flight.data is not None else read_ranges(url, [ranges[key]], options)[0]
    return found


_configured: dict[str, Any] = {}


def configure(options: Mapping[str, Any] | None) -> None:
    """Set the fsspec options (``input.storage_options``) that inputs opened in this process use
    when their caller gives none; the run sets them once, before it opens its input."""
    _configured.clear()
    _configured.update(options or {})


def configured() -> dict[str, Any]:
    return dict(_configured)


def refuse_output(path: str, what: str) -> None:
    """Outputs other than a run's store (exports, a batch's folder) go to a file system: a URL is
    refused in one line that says what to do (``fcnpipe run -o s3://...`` writes a store to S3).

    >>> refuse_output("maps/a.tif", "an export")
    >>> try:
    ...     refuse_output("s3://lab/maps/a.tif", "an export")
    ... except ConfigError as err:
    ...     print(str(err).split(": ", 1)[1].split(" (")[0])
    an export needs a local or shared path
    """
    if is_url(path):
        raise ConfigError(
            f"{redact(path)}: {what} needs a local or shared path (or a mounted bucket); write it there and copy "
            "it after, e.g. aws s3 cp OUT s3://bucket/OUT (fcnpipe run -o s3://bucket/OUT.zarr writes a store to S3)"
        )


def expand(url: str, suffixes: tuple[str, ...], options: Mapping[str, Any] | None = None) -> list[str]:
    """The URLs ``url`` stands for in a batch: a pattern (``s3://b/scans/*.svs``, ``**`` too) or a
    folder (``s3://b/scans/``: its objects ending in one of ``suffixes``) expands, sorted; anything
    else, or a pattern that matches nothing, is kept as it is (and fails, named, when it is read)."""
    scheme = urlsplit(url).scheme.lower()
    pattern = any(char in urlsplit(url).path for char in "*?[")
    if scheme in ("http", "https") or not (pattern or url.endswith("/")):
        return [url]  # a web server lists no folder
    fs, path = filesystem(url, options)
    try:
        found = sorted(fs.glob(path)) if pattern else sorted(fs.find(path))
    except Exception as err:
        raise remote_error(url, err, "cannot list") from err
    kept = [p for p in found if p.lower().endswith(suffixes) and not p.rsplit("/", 1)[-1].startswith(".")]
    return [f"{scheme}://{p}" for p in kept] or [url]
