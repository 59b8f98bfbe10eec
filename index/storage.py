"""Where published index versions live: a pluggable storage behind `IndexStore`.

`IndexStore` (index/store.py) keeps versions in a directory: enough for replicas on one machine or
on a shared volume, where its cross-process lock serialises the switch of CURRENT. Replicas on
different machines keep versions in an object store instead; each machine then holds a local cache
(an ordinary IndexStore directory that FAISS memory-maps), filled on demand by `SyncedIndexStore`
(index/synced_store.py). A storage only has to offer:

  * whole versions, visible only once complete (every file first, `manifest.json` last; readers
    list a version only when its manifest exists);
  * CURRENT with an atomic compare-and-set, so concurrent publishers never overwrite each other
    (the filesystem: the store's lock file; S3: conditional PUT with If-Match / If-None-Match).

Implementations: `FileSystemStorage` (a directory, e.g. an NFS mount, in IndexStore's own layout,
so an IndexStore on the same directory reads what it writes) and `S3Storage` (any S3-compatible
service through boto3: AWS S3, MinIO, Ceph RGW; conditional writes need AWS S3 since 2024-11 or
a server that implements them; tested against moto's server).
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import shutil
import uuid
from abc import ABC, abstractmethod
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlparse

from index.store import CURRENT_FILE, MANIFEST_FILE, TMP_PREFIX, VERSION_PATTERN, VERSIONS_DIR, _fsync_dir

try:  # optional: only S3Storage needs it (pip install '.[s3]')
    import boto3
    from botocore.exceptions import ClientError
except ImportError:  # pragma: no cover - depends on the installation
    boto3 = None

    class ClientError(Exception):  # type: ignore[no-redef]  # never raised without botocore
        response: dict = {}


PRECONDITION_FAILED = ("PreconditionFailed", "412", "ConditionalRequestConflict")


class StorageError(RuntimeError):
    """The storage could not be read or written (message says which and why)."""


class VersionStorage(ABC):
    """Complete index versions plus a CURRENT pointer with compare-and-set."""

    @abstractmethod
    def read_current(self) -> str | None:
        """The current version's name, None when nothing was published."""

    @abstractmethod
    def compare_and_set_current(self, expected: str | None, new: str) -> bool:
        """Point CURRENT at `new` only if it still names `expected` (None: nothing published yet);
        False, changing nothing, when someone else switched it first."""

    @abstractmethod
    def versions(self) -> list[str]:
        """Complete versions, oldest first."""

    @abstractmethod
    def read_file(self, version: str, name: str) -> bytes:
        """One file of a version (e.g. its manifest) without fetching the rest."""

    @abstractmethod
    def put_version(self, version: str, source: Path) -> None:
        """Store the files of directory `source` as `version`; the manifest goes last."""

    @abstractmethod
    def get_version(self, version: str, target: Path) -> None:
        """Copy every file of `version` into the (existing, empty) directory `target`."""

    @abstractmethod
    def delete_version(self, version: str) -> None:
        """Remove a version: the manifest first, so it stops being listed before its files go."""


def _files(source: Path) -> list[Path]:
    """A version's files with the manifest last (the commit point of an upload)."""
    files = sorted(p for p in source.iterdir() if p.is_file())
    return [p for p in files if p.name != MANIFEST_FILE] + [p for p in files if p.name == MANIFEST_FILE]


class FileSystemStorage(VersionStorage):
    """A directory in IndexStore's layout (versions/<v>/..., CURRENT, .current.lock)."""

    def __init__(self, root: str | os.PathLike) -> None:
        self.root = Path(root)
        self.versions_dir = self.root / VERSIONS_DIR

    @contextlib.contextmanager
    def _lock(self) -> Iterator[None]:
        self.root.mkdir(parents=True, exist_ok=True)
        with open(self.root / ".current.lock", "w") as handle:  # the same lock file as IndexStore's
            fcntl.flock(handle, fcntl.LOCK_EX)
            yield

    def read_current(self) -> str | None:
        try:
            return (self.root / CURRENT_FILE).read_text(encoding="utf-8").strip() or None
        except FileNotFoundError:
            return None

    def compare_and_set_current(self, expected: str | None, new: str) -> bool:
        with self._lock():
            if self.read_current() != expected:
                return False
            tmp = self.root / f"{CURRENT_FILE}.tmp-{uuid.uuid4().hex[:8]}"
            with open(tmp, "w", encoding="utf-8") as handle:
                handle.write(new + "\n")
                handle.flush()
                os.fsync(handle.fileno())
            os.replace(tmp, self.root / CURRENT_FILE)
            _fsync_dir(self.root)
            return True

    def versions(self) -> list[str]:
        if not self.versions_dir.is_dir():
            return []
        return sorted(
            p.name
            for p in self.versions_dir.iterdir()
            if VERSION_PATTERN.match(p.name) and (p / MANIFEST_FILE).is_file()
        )

    def read_file(self, version: str, name: str) -> bytes:
        try:
            return (self.versions_dir / version / name).read_bytes()
        except FileNotFoundError as exc:
            raise StorageError(f"version {version} has no {name} in {self.root}") from exc

    def put_version(self, version: str, source: Path) -> None:
        self.versions_dir.mkdir(parents=True, exist_ok=True)
        tmp = self.versions_dir / f"{TMP_PREFIX}{uuid.uuid4().hex}"
        tmp.mkdir()
        try:
            for path in _files(source):
                shutil.copyfile(path, tmp / path.name)
                with open(tmp / path.name, "rb") as handle:
                    os.fsync(handle.fileno())
            _fsync_dir(tmp)
            os.rename(tmp, self.versions_dir / version)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        _fsync_dir(self.versions_dir)

    def get_version(self, version: str, target: Path) -> None:
        source = self.versions_dir / version
        if not (source / MANIFEST_FILE).is_file():
            raise StorageError(f"no complete version {version} in {self.root}")
        for path in _files(source):
            shutil.copyfile(path, target / path.name)

    def delete_version(self, version: str) -> None:
        directory = self.versions_dir / version
        with contextlib.suppress(FileNotFoundError):
            (directory / MANIFEST_FILE).unlink()
        shutil.rmtree(directory, ignore_errors=True)


class S3Storage(VersionStorage):
    """Objects `<prefix>/versions/<v>/<file>` and `<prefix>/CURRENT` in one bucket.

    CURRENT is switched with a conditional PUT: If-Match the ETag read with the expected name, or
    If-None-Match "*" when nothing is published; a 412 means someone else switched it first.
    Credentials and region come from boto3's usual chain (environment, config files, instance role).
    """

    def __init__(self, bucket: str, prefix: str = "", endpoint_url: str | None = None, client=None) -> None:
        if client is None and boto3 is None:
            raise StorageError("S3 index storage needs boto3: pip install 'ssl-retrieval[s3]'")
        self.bucket = bucket
        self.prefix = prefix.strip("/")
        self.client = client or boto3.client("s3", endpoint_url=endpoint_url)

    def _key(self, *parts: str) -> str:
        return "/".join(p for p in (self.prefix, *parts) if p)

    def _read_current(self) -> tuple[str | None, str | None]:
        try:
            reply = self.client.get_object(Bucket=self.bucket, Key=self._key(CURRENT_FILE))
        except ClientError as exc:
            if exc.response.get("Error", {}).get("Code") in ("NoSuchKey", "404"):
                return None, None
            raise StorageError(f"s3://{self.bucket}/{self._key(CURRENT_FILE)}: {exc}") from exc
        return reply["Body"].read().decode("utf-8").strip() or None, reply["ETag"]

    def read_current(self) -> str | None:
        return self._read_current()[0]

    def compare_and_set_current(self, expected: str | None, new: str) -> bool:
        current, etag = self._read_current()
        if current != expected:
            return False
        condition = {"IfMatch": etag} if etag is not None else {"IfNoneMatch": "*"}
        try:
            self.client.put_object(
                Bucket=self.bucket, Key=self._key(CURRENT_FILE), Body=(new + "\n").encode(), **condition
            )
        except ClientError as exc:
            if exc.response.get("Error", {}).get("Code") in PRECONDITION_FAILED:
                return False
            raise StorageError(f"could not switch CURRENT in s3://{self.bucket}: {exc}") from exc
        return True

    def _list(self, prefix: str) -> list[str]:
        keys = []
        for page in self.client.get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=prefix):
            keys.extend(item["Key"] for item in page.get("Contents", []))
        return keys

    def versions(self) -> list[str]:
        root = self._key(VERSIONS_DIR) + "/"
        complete = set()
        for key in self._list(root):
            version, _, name = key[len(root) :].partition("/")
            if name == MANIFEST_FILE and VERSION_PATTERN.match(version):
                complete.add(version)
        return sorted(complete)

    def read_file(self, version: str, name: str) -> bytes:
        key = self._key(VERSIONS_DIR, version, name)
        try:
            return self.client.get_object(Bucket=self.bucket, Key=key)["Body"].read()
        except ClientError as exc:
            raise StorageError(f"s3://{self.bucket}/{key}: {exc}") from exc

    def put_version(self, version: str, source: Path) -> None:
        for path in _files(source):  # upload_file: multipart for large index files
            self.client.upload_file(str(path), self.bucket, self._key(VERSIONS_DIR, version, path.name))

    def get_version(self, version: str, target: Path) -> None:
        root = self._key(VERSIONS_DIR, version) + "/"
        keys = self._list(root)
        if root + MANIFEST_FILE not in keys:
            raise StorageError(f"no complete version {version} in s3://{self.bucket}/{root}")
        for key in keys:
            self.client.download_file(self.bucket, key, str(target / key[len(root) :]))

    def delete_version(self, version: str) -> None:
        root = self._key(VERSIONS_DIR, version) + "/"
        keys = self._list(root)
        ordered = [k for k in keys if k.endswith("/" + MANIFEST_FILE)] + [
            k for k in keys if not k.endswith("/" + MANIFEST_FILE)
        ]
        for key in ordered:
            self.client.delete_object(Bucket=self.bucket, Key=key)


def storage_from_url(url: str, endpoint_url: str | None = None) -> VersionStorage:
    """`s3://bucket/prefix` or `file:///path` (or a plain path)."""
    parsed = urlparse(url)
    if parsed.scheme == "s3":
        if not parsed.netloc:
            raise StorageError(f"{url}: no bucket (expected s3://BUCKET/PREFIX)")
        return S3Storage(parsed.netloc, parsed.path, endpoint_url=endpoint_url)
    if parsed.scheme in ("", "file"):
        return FileSystemStorage(parsed.path or url)
    raise StorageError(f"{url}: unsupported index storage (use s3://BUCKET/PREFIX or a directory)")
