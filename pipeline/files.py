"""Writing a file so that it is whole or absent: a temporary file beside it, renamed over it.

A rename within one folder is atomic, so a reader (or a run resumed after a kill) sees either the
old file or the whole new one, never half of one. Every file fcnpipe writes this way ends in
:data:`PARTIAL` while it is written, so that what a killed writer left behind can be recognised
and removed (:func:`remove_partial_files`).

A store may also live in object storage (``s3://bucket/prefix/OUT.zarr``): the functions below
(:func:`put`, :func:`get`, :func:`names`, ...) take a path or a URL, so that the store's chunks,
shards, markers and state are written and read the same way in both. In object storage a PUT is
atomic already (an object is all there or not there), so each file is one PUT, with no temporary
name and no rename. The fsspec options of a store (``output.storage_options``; credentials and
endpoint otherwise come from the AWS environment) are registered per process (:func:`register`)
and never shown: every URL fcnpipe prints goes through :func:`pipeline.remote.redact`.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import threading
from collections.abc import Mapping
from typing import Any
from urllib.parse import urlsplit

from pipeline import remote
from pipeline.errors import ConfigError, OutputError

PARTIAL = ".partial"
"""The suffix of a file being written; renamed away once it is whole."""


def atomic_write(path: str, data: bytes | str, durable: bool = False) -> None:
    """Write ``data`` to ``path`` whole or not at all; ``durable``: flush it (and the rename) to disk
    first, so that a power cut keeps it too.

    The temporary name carries the thread, so two threads of one process never share one.
    """
    temporary = f"{path}.{threading.get_ident()}{PARTIAL}"
    raw = data if isinstance(data, bytes) else data.encode("utf-8")
    try:
        _write(temporary, raw, durable)
    except FileNotFoundError:  # the first file of its folder: make the folder (not a stat per file)
        os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
        _write(temporary, raw, durable)
    os.replace(temporary, path)
    if durable:
        fsync_path(os.path.dirname(path) or ".", directory=True)


def _write(path: str, data: bytes, durable: bool) -> None:
    with open(path, "wb") as file:
        file.write(data)
        if durable:
            file.flush()
            os.fsync(file.fileno())


def fsync_path(path: str, directory: bool = False) -> None:
    """Flush a file (or a folder's entries) to disk."""
    fd = os.open(path, os.O_RDONLY | (os.O_DIRECTORY if directory else 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def remove_partial_files(folder: str) -> int:
    """Delete the ``*.partial`` files under ``folder`` that killed writers left; return how many.

    Zarr's own metadata writes use the same suffix, so this covers them too.
    """
    removed = 0
    for parent, _, names in os.walk(folder):
        for name in names:
            if name.endswith(PARTIAL):
                os.unlink(os.path.join(parent, name))
                removed += 1
    return removed


# --- a path or a URL ------------------------------------------------------------------------------

WRITABLE = ("s3",)
"""URL schemes a store may be written to (objects PUT whole; conditional writes for the lease)."""

_options: dict[str, dict[str, Any]] = {}
_lock = threading.Lock()


def is_remote(path: str) -> bool:
    """Whether ``path`` is in object storage (a URL), not on a file system."""
    return remote.is_url(path)


def normalized(path: str) -> str:
    """A store's path as fcnpipe keeps it: a folder's resolved absolute path, or the URL without a
    trailing slash."""
    return path.rstrip("/") if is_remote(path) else os.path.realpath(path)


def check_writable(path: str, what: str = "the store") -> None:
    """Refuse a URL that cannot hold a store (``http://`` is read-only), in one line.

    >>> check_writable("s3://lab/maps/a.zarr"), check_writable("maps/a.zarr")
    (None, None)
    >>> try:
    ...     check_writable("https://host/a.zarr")
    ... except ConfigError as err:
    ...     print(str(err).split(": ", 1)[1].split(";")[0])
    cannot write the store to https:// URLs
    """
    if not is_remote(path):
        return
    scheme = urlsplit(path).scheme.lower()
    if scheme not in WRITABLE:
        raise ConfigError(
            f"{remote.redact(path)}: cannot write {what} to {scheme}:// URLs; write it to s3:// (or any "
            "S3-compatible server through AWS_ENDPOINT_URL), or to a local or shared path"
        )
    if not urlsplit(path).path.strip("/"):
        raise ConfigError(f"{remote.redact(path)}: name the store inside the bucket, e.g. {path.rstrip('/')}/out.zarr")


def register(path: str, options: Mapping[str, Any] | None) -> None:
    """Use ``options`` (fsspec) for the store at ``path`` and everything under or beside it in this process."""
    if is_remote(path) and options:
        with _lock:
            _options[_bucket(path)] = dict(options)


def options_for(path: str) -> dict[str, Any] | None:
    with _lock:
        return _options.get(_bucket(path))


def _bucket(path: str) -> str:
    parts = urlsplit(path)
    return f"{parts.scheme.lower()}://{parts.netloc}"


def _fs(path: str) -> tuple[Any, str]:
    return remote.filesystem(path, options_for(path))


def join(path: str, *names: str) -> str:
    """``path/name/...``: with ``/`` in a URL, the system's separator on a file system."""
    if is_remote(path):
        return "/".join([path.rstrip("/"), *names])
    return os.path.join(path, *names)


def _failed(path: str, err: BaseException, doing: str) -> OutputError:
    return OutputError(f"{remote.redact(path)}: cannot {doing} ({remote.short_reason(err, path)})")


def put(path: str, data: bytes | str, durable: bool = False) -> None:
    """Write ``data`` at ``path`` whole or not at all (``durable``: flushed to disk too, on a file system)."""
    if not is_remote(path):
        atomic_write(path, data, durable=durable)
        return
    fs, key = _fs(path)
    try:
        fs.pipe_file(key, data.encode("utf-8") if isinstance(data, str) else data)
    except Exception as err:
        raise _failed(path, err, "write this object") from err


def upload(local: str, path: str) -> None:
    """Copy the file ``local`` to ``path`` (in object storage: one object, which appears whole)."""
    if not is_remote(path):
        os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
        shutil.copyfile(local, path)
        return
    fs, key = _fs(path)
    try:
        fs.put_file(local, key)
    except Exception as err:
        raise _failed(path, err, "write this object") from err


def upload_tree(local: str, path: str) -> None:
    """Copy every file under the folder ``local`` to the same names under ``path``, in one
    concurrent batch in object storage."""
    found = [os.path.join(parent, name) for parent, _, names in os.walk(local) for name in names]
    targets = [join(path, *os.path.relpath(name, local).split(os.sep)) for name in found]
    if not is_remote(path):
        for name, target in zip(found, targets, strict=True):
            upload(name, target)
        return
    fs, _ = _fs(path)
    try:
        fs.put(found, [fs._strip_protocol(target) for target in targets])
    except Exception as err:
        raise _failed(path, err, "write the store") from err


def get(path: str, start: int | None = None, end: int | None = None) -> bytes | None:
    """The bytes of ``path`` (``[start, end)``; a negative ``start`` counts from its end), or None
    where there is no such file or object."""
    if not is_remote(path):
        try:
            with open(path, "rb") as file:
                if start is None:
                    return file.read()
                file.seek(start, os.SEEK_END if start < 0 else os.SEEK_SET)
                return file.read() if end is None else file.read(end - file.tell())
        except FileNotFoundError:
            return None
    fs, key = _fs(path)
    try:
        if start is not None and start < 0:
            start += int(fs.size(key))
        return bytes(fs.cat_file(key, start=start, end=end))
    except FileNotFoundError:
        return None
    except Exception as err:
        raise _failed(path, err, "read this object") from err


def exists(path: str) -> bool:
    """Whether ``path`` is a file or a folder (in object storage: an object, or a prefix of some)."""
    if not is_remote(path):
        return os.path.lexists(path)
    fs, key = _fs(path)
    try:
        return bool(fs.exists(key))
    except Exception as err:
        raise _failed(path, err, "look at it") from err


def names(path: str) -> list[str]:
    """The names in the folder ``path`` (in object storage: just below the prefix); [] where none."""
    if not is_remote(path):
        try:
            return os.listdir(path)
        except (FileNotFoundError, NotADirectoryError):
            return []
    fs, key = _fs(path)
    try:
        fs.invalidate_cache(key)  # another process (a worker, an earlier run) may have written there
        return [entry.rstrip("/").rsplit("/", 1)[-1] for entry in fs.ls(key, detail=False) if entry.rstrip("/") != key]
    except FileNotFoundError:
        return []
    except Exception as err:
        raise _failed(path, err, "list it") from err


def delete(path: str) -> None:
    """Remove the file ``path``, if it is there."""
    if not is_remote(path):
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)
        return
    fs, key = _fs(path)
    try:
        fs.rm_file(key)
    except FileNotFoundError:
        pass
    except Exception as err:
        raise _failed(path, err, "delete this object") from err


def remove_tree(path: str) -> None:
    """Remove the folder ``path`` and all under it (in object storage: every object under the prefix)."""
    if not is_remote(path):
        shutil.rmtree(path, ignore_errors=True)
        return
    fs, key = _fs(path)
    try:
        fs.invalidate_cache(key)
        found = fs.find(key.rstrip("/") + "/")
        if found:
            fs.rm(found)
        fs.invalidate_cache(key)
    except FileNotFoundError:
        pass
    except Exception as err:
        raise _failed(path, err, "delete it") from err
