"""An IndexStore whose versions live in a `VersionStorage` (e.g. S3), cached in a local directory.

The local directory is an ordinary IndexStore (FAISS memory-maps from it); the storage is the truth
for which versions exist and which is CURRENT. Publishing writes the version into the cache with
IndexStore's crash-safe publish (not made current locally), uploads it (manifest last), then
switches the storage's CURRENT with compare-and-set: a lost race raises CurrentMovedError exactly
like the directory store's check under its lock. Loading a version not cached yet downloads it
into a temporary directory and renames it into place, so a crash never leaves half a version.
"""

from __future__ import annotations

import json
import os
import shutil
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

from index.search_index import SearchIndex
from index.storage import StorageError, VersionStorage, storage_from_url
from index.store import (
    _UNCHECKED,
    MANIFEST_FILE,
    TMP_PREFIX,
    CurrentMovedError,
    IndexStore,
    IndexStoreError,
)


class SyncedIndexStore(IndexStore):
    def __init__(self, cache_root: str | os.PathLike, storage: VersionStorage) -> None:
        super().__init__(cache_root)
        self.storage = storage

    # ----------------------------------------------------------------- reading
    def current_version(self) -> str | None:
        return self.storage.read_current()

    def versions(self) -> list[str]:
        return self.storage.versions()

    def version_dir(self, version: str) -> Path:
        """The cached directory of `version`, downloaded first when it is not cached yet."""
        directory = super().version_dir(version)
        if not directory.is_dir():
            self._download(version, directory)
        return directory

    def read_manifest(self, version: str | None = None) -> dict[str, Any]:
        """From the cache, or only the manifest from the storage (deciding to adopt or load a version
        must not cost a download of its index)."""
        name = self._resolve(version)
        if (self.versions_dir / name).is_dir():
            return super().read_manifest(name)
        try:
            return json.loads(self.storage.read_file(name, MANIFEST_FILE))
        except (StorageError, ValueError) as exc:
            raise IndexStoreError(f"version {name}: no readable manifest in the storage ({exc})") from exc

    def _resolve(self, version: str | None) -> str:
        name = version if version is not None else self.current_version()
        if name is None:
            raise IndexStoreError("no index published in the index storage (no CURRENT)")
        return name

    def _download(self, version: str, directory: Path) -> None:
        self.versions_dir.mkdir(parents=True, exist_ok=True)
        tmp = self.versions_dir / f"{TMP_PREFIX}{uuid.uuid4().hex}"
        tmp.mkdir()
        try:
            self.storage.get_version(version, tmp)
            try:
                os.rename(tmp, directory)
            except OSError:  # another process cached it meanwhile: theirs is the same version
                shutil.rmtree(tmp, ignore_errors=True)
        except StorageError as exc:
            shutil.rmtree(tmp, ignore_errors=True)
            raise IndexStoreError(str(exc)) from exc
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise

    # ----------------------------------------------------------------- writing
    def publish(
        self,
        index: SearchIndex,
        *,
        encoder_path: str | os.PathLike | None = None,
        extra_manifest: dict[str, Any] | None = None,
        make_current: bool = True,
        expected_current: str | None | object = _UNCHECKED,
        on_step: Callable[[str], None] | None = None,
    ) -> str:
        before = self.storage.read_current() if expected_current is _UNCHECKED else expected_current
        name = super().publish(
            index,
            encoder_path=encoder_path,
            extra_manifest=extra_manifest,
            make_current=False,
            on_step=on_step,
        )
        self.storage.put_version(name, super().version_dir(name))
        if make_current:
            while not self.storage.compare_and_set_current(before, name):
                if expected_current is not _UNCHECKED:
                    raise CurrentMovedError(
                        f"CURRENT moved to {self.storage.read_current()!r} (expected {expected_current!r}); "
                        f"version {name} was uploaded but not made current"
                    )
                before = self.storage.read_current()  # unchecked publish: last writer wins, as on disk
        return name

    def set_current(self, version: str) -> None:
        self.read_manifest(version)  # raises if missing
        while not self.storage.compare_and_set_current(self.storage.read_current(), version):
            pass

    def prune(self, keep: int = 3, *, stale_after_s: float = 15 * 60) -> list[str]:
        """Delete all but the `keep` newest versions from the storage (never CURRENT), and cached
        copies of versions the storage no longer has."""
        if keep < 1:
            raise ValueError("keep must be at least 1")
        self.clean_stale(stale_after_s)
        current = self.current_version()
        doomed = [v for v in self.versions()[:-keep] if v != current]
        for version in doomed:
            self.storage.delete_version(version)
        remaining = set(self.versions())
        if self.versions_dir.is_dir():
            for cached in super().versions():
                if cached not in remaining and cached != current:
                    shutil.rmtree(self.versions_dir / cached, ignore_errors=True)
        return doomed


def open_store(
    root: str | os.PathLike, storage_url: str | None = None, endpoint_url: str | None = None
) -> IndexStore:
    """The directory store, or (with `storage_url`) a store synced to that storage, cached at `root`."""
    if not storage_url:
        return IndexStore(root)
    return SyncedIndexStore(root, storage_from_url(storage_url, endpoint_url))
