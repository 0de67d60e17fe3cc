"""Where a cache lives: a local directory or a prefix in S3-compatible object storage.

Every cache file is named by its path relative to the cache root
(`soft_targets/split=labeled/part-00000.parquet`) and goes through a `Store`. Parquet goes
through pyarrow's filesystems and Zarr through zarr's stores (its local store, or its fsspec
store over s3fs for a URL). Each file is written under a temporary name and moved into
place: a rename on a local disk, a server-side copy on S3, where an object appears whole or
not at all. So a reader never sees half a part, wherever the cache is.

The S3 endpoint and credentials come from the standard AWS settings (AWS_ENDPOINT_URL,
AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_DEFAULT_REGION, or ~/.aws), which pyarrow and
s3fs both read. Object stores have no locks: two writers of the same shard of one cache
are refused on a local disk only.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import secrets
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from pathlib import Path, PurePosixPath
from typing import Any

import pyarrow.fs as pafs

from kd.errors import CacheError, InputError

URL_SCHEMES = ("s3://",)


def is_url(root: str | Path) -> bool:
    return isinstance(root, str) and root.startswith(URL_SCHEMES)


def location(value: str | Path) -> str | Path:
    """A cache location as given on the command line: a URL stays a string, anything else a Path."""
    return str(value) if is_url(str(value)) else Path(value)


class Store:
    """File operations on one cache root, by relative path."""

    def __init__(self, root: str | Path):
        self.root = location(root)
        self.remote = is_url(self.root)
        if self.remote:
            try:
                self.fs, self.base = pafs.FileSystem.from_uri(str(self.root).rstrip("/"))
            except Exception as exc:  # pyarrow raises several types for a bad URL or missing credentials
                raise CacheError(f"{self.root}: cannot open object storage ({exc})") from None
        else:
            self.fs, self.base = pafs.LocalFileSystem(), str(Path(self.root).absolute())

    def show(self, rel: str = "") -> str:
        """The path of `rel` as the user should see it in messages."""
        if self.remote:
            return str(self.root).rstrip("/") + ("/" + rel if rel else "")
        return str(Path(self.root) / rel) if rel else str(self.root)

    def full(self, rel: str) -> str:
        """The path of `rel` inside `self.fs`."""
        return f"{self.base}/{rel}" if rel else self.base

    def safe(self, rel: str, manifest: str = "manifest.json") -> str:
        """`rel` itself, refusing absolute paths, `..` and (locally) symlinks that leave the cache."""
        parts = PurePosixPath(rel).parts
        if not rel or rel.startswith("/") or ".." in parts:
            raise CacheError(f"{self.show(manifest)}: part path {rel!r} is not inside the cache")
        if not self.remote:
            full = Path(self.root) / rel
            if full.exists() and not full.resolve().is_relative_to(Path(self.root).resolve()):
                raise CacheError(f"{self.show(manifest)}: part path {rel!r} is a link leaving the cache")
        return rel

    def size(self, rel: str) -> int | None:
        """The file's size in bytes, or None if there is no such file."""
        info = self.fs.get_file_info(self.full(rel))
        return info.size if info.type == pafs.FileType.File else None

    def is_file(self, rel: str) -> bool:
        return self.size(rel) is not None

    def read_bytes(self, rel: str) -> bytes:
        with self.fs.open_input_stream(self.full(rel)) as handle:
            return handle.read()

    def sha256(self, rel: str, chunk: int = 1 << 20) -> str:
        digest = hashlib.sha256()
        with self.fs.open_input_stream(self.full(rel)) as handle:
            while block := handle.read(chunk):
                digest.update(block)
        return digest.hexdigest()

    def read_json(self, rel: str) -> Any:
        try:
            return json.loads(self.read_bytes(rel))
        except json.JSONDecodeError as exc:
            raise InputError(f"{self.show(rel)}: not valid JSON ({exc.msg} at line {exc.lineno})") from exc

    def write_json(self, rel: str, data: Any, *, shared: bool = False) -> None:
        """Write JSON atomically (temporary name, then moved into place); `shared` as in `writing`."""
        with self.writing(rel, shared=shared) as tmp, self.fs.open_output_stream(tmp) as handle:
            handle.write((json.dumps(data, indent=2, sort_keys=True) + "\n").encode())

    @contextmanager
    def writing(self, rel: str, *, shared: bool = False) -> Iterator[str]:
        """Yield a temporary path in `self.fs` to write `rel` to; move it into place on success,
        remove it on failure (so no half-written file is ever under its final name).

        A file only one process writes uses one fixed temporary name, so a rerun after a crash
        overwrites the leftover. A `shared` file, which several processes may write at once
        (the merged manifest, written by whichever shards finish together), gets a temporary
        name of its own per writer, so no writer moves another's file away.
        """
        tmp = self.full(rel) + (f".tmp-{os.getpid()}-{secrets.token_hex(4)}" if shared else ".tmp")
        if not self.remote:
            Path(tmp).parent.mkdir(parents=True, exist_ok=True)
        try:
            yield tmp
        except BaseException:
            self.fs.delete_file(tmp) if self.fs.get_file_info(tmp).type == pafs.FileType.File else None
            raise
        self.fs.move(tmp, self.full(rel))

    def delete(self, rel: str) -> None:
        """Remove a file or a whole directory; nothing if it is not there."""
        info = self.fs.get_file_info(self.full(rel))
        try:
            if info.type == pafs.FileType.Directory:
                self.fs.delete_dir(self.full(rel))
            elif info.type == pafs.FileType.File:
                self.fs.delete_file(self.full(rel))
        except FileNotFoundError:  # removed meanwhile by another process: the same outcome
            pass

    def files(self, rel: str) -> list[str]:
        """Relative paths of every file under directory `rel` (none if it is not there)."""
        selector = pafs.FileSelector(self.full(rel), recursive=True, allow_not_found=True)
        prefix = len(self.base) + 1
        try:
            infos = self.fs.get_file_info(selector)
        except FileNotFoundError:  # removed while listed (another shard merging)
            return []
        return sorted(i.path[prefix:] for i in infos if i.type == pafs.FileType.File)

    def total_bytes(self) -> int:
        return sum(self.size(rel) or 0 for rel in self.files(""))

    def zarr(self, rel: str, read_only: bool = False) -> Any:
        """A store for zarr.open_group / zarr.open_array at `rel`."""
        if not self.remote:
            return str(Path(self.root) / rel)
        from zarr.storage import FsspecStore  # needs s3fs, only for URLs

        try:
            return FsspecStore.from_url(self.show(rel), read_only=read_only)
        except ImportError as exc:
            raise CacheError(f"{self.show(rel)}: a cache on object storage needs s3fs ({exc}); "
                             "pip install s3fs") from None

    def lock(self, name: str = ".lock", what: str = "another `kd label`", *, wait: bool = False):
        """An exclusive lock held while writing (local disks only). A second writer fails at
        once, or with `wait` waits its turn (for short steps that shards share)."""
        return nullcontext() if self.remote else _flock(Path(self.root), name, what, wait)


@contextmanager
def _flock(root: Path, name: str, what: str, wait: bool) -> Iterator[None]:
    root.mkdir(parents=True, exist_ok=True)
    handle = open(root / name, "w")
    try:
        fcntl.flock(handle, fcntl.LOCK_EX if wait else fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.close()
        raise CacheError(f"{root}: {what} is writing this cache (lock {root / name} is held)") from None
    try:
        yield
    finally:
        fcntl.flock(handle, fcntl.LOCK_UN)
        handle.close()
