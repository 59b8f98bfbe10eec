"""Index versions on disk, published atomically.

Layout under INDEX_DIR:
  versions/<version>/index.faiss        the FAISS index (carries the int64 ids itself)
  versions/<version>/deleted.npy        int64 ids removed from an HNSW graph but still stored (if any)
  versions/<version>/labels.npy         int64 Nx2 (id, label) for the kNN classifier (if labelled)
  versions/<version>/class_names.json   names for the label indices (if known)
  versions/<version>/encoder.pt         the encoder file that made the vectors (if given)
  versions/<version>/encoder.inference.pt  its deploy-time form, copied when next to the encoder
  versions/<version>/manifest.json      what this version is (see `IndexStore.publish`)
  CURRENT                               one line: the name of the current version

Version names sort by creation time and are unique: `20261127T211500123456Z-1a2b3c`.

Publishing writes into `versions/.tmp-<uuid>/`, fsyncs every file and the directory, renames it to
its version name, fsyncs `versions/`, then writes `CURRENT.tmp`, fsyncs it and `os.replace`s it onto
`CURRENT` (and fsyncs INDEX_DIR). A crash at any point leaves the previous version current and
loadable; leftover temporary directories are ignored by readers and removed by `clean_stale`/`prune`.

Crash tests: INDEX_STORE_CRASH_AT=<a PUBLISH_STEPS step> makes it `os._exit(CRASH_EXIT_CODE)` after it.

Thread safety: an IndexStore holds no mutable state; concurrent publishes in one or several
processes are safe (each writes its own directory; the last CURRENT replace wins).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import time
import uuid
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import faiss
import numpy as np

from index.encoder_file import encoder_version
from index.search_index import INDEX_TYPES, SearchIndex

MANIFEST_FORMAT = "ssl-retrieval/index/v1"
INDEX_FILE = "index.faiss"
DELETED_FILE = "deleted.npy"
LABELS_FILE = "labels.npy"
CLASS_NAMES_FILE = "class_names.json"
ENCODER_FILE = "encoder.pt"
INFERENCE_ENCODER_FILE = "encoder.inference.pt"
MANIFEST_FILE = "manifest.json"
CURRENT_FILE = "CURRENT"
VERSIONS_DIR = "versions"
TMP_PREFIX = ".tmp-"
VERSION_PATTERN = re.compile(r"^\d{8}T\d{12}Z-[0-9a-f]{6}$")
STALE_TMP_SECONDS = 15 * 60

PUBLISH_STEPS = (
    "tmp_created",
    "index_written",
    "files_written",
    "files_synced",
    "renamed",
    "versions_synced",
    "current_tmp_written",
    "current_replaced",
)
CRASH_ENV = "INDEX_STORE_CRASH_AT"
CRASH_EXIT_CODE = 86


_UNCHECKED = object()


class CurrentMovedError(RuntimeError):
    """publish(expected_current=...) found CURRENT pointing elsewhere: someone else published."""


class IndexStoreError(LookupError):
    """No usable version: none published, CURRENT pointing nowhere, or a missing/corrupt version."""


def new_version_name(now: datetime | None = None) -> str:
    now = now or datetime.now(timezone.utc)
    return f"{now:%Y%m%dT%H%M%S%f}Z-{uuid.uuid4().hex[:6]}"


class IndexStore:
    """Versions of a SearchIndex under one directory (see the module docstring for the layout)."""

    def __init__(self, root: str | os.PathLike) -> None:
        self.root = Path(root)
        self.versions_dir = self.root / VERSIONS_DIR

    # ----------------------------------------------------------------- reading
    def current_version(self) -> str | None:
        """The version CURRENT names, or None when nothing was published (or CURRENT is unreadable)."""
        try:
            name = (self.root / CURRENT_FILE).read_text(encoding="utf-8").strip()
        except (FileNotFoundError, NotADirectoryError, UnicodeDecodeError):
            return None
        return name or None

    def versions(self) -> list[str]:
        """Complete versions, oldest first (temporary directories are not versions)."""
        if not self.versions_dir.is_dir():
            return []
        return sorted(
            p.name for p in self.versions_dir.iterdir() if p.is_dir() and VERSION_PATTERN.match(p.name)
        )

    def version_dir(self, version: str) -> Path:
        if not VERSION_PATTERN.match(version):
            raise IndexStoreError(f"{version!r} is not a valid version name")
        return self.versions_dir / version

    def read_manifest(self, version: str | None = None) -> dict[str, Any]:
        directory = self.version_dir(self._resolve(version))
        try:
            manifest = json.loads((directory / MANIFEST_FILE).read_text(encoding="utf-8"))
        except FileNotFoundError as exc:
            raise IndexStoreError(
                f"version {directory.name} is missing or incomplete (no {MANIFEST_FILE})"
            ) from exc
        except (OSError, ValueError) as exc:
            raise IndexStoreError(f"version {directory.name} has a corrupt {MANIFEST_FILE}: {exc}") from exc
        if not isinstance(manifest, dict) or manifest.get("index_type") not in INDEX_TYPES:
            raise IndexStoreError(f"version {directory.name} has an invalid {MANIFEST_FILE}")
        return manifest

    def load(self, version: str | None = None, *, mmap: bool = True) -> SearchIndex:
        """Load a version (the current one when None). Memory-mapped when FAISS supports it for the
        type (read-only until the first add/remove, which copies it into memory).

        Raises IndexStoreError when there is no such version or it cannot be read.
        """
        name = self._resolve(version)
        directory = self.version_dir(name)
        manifest = self.read_manifest(name)
        faiss_index, mapped = _read_faiss(directory / INDEX_FILE, mmap)
        if faiss_index.d != manifest.get("dim"):
            raise IndexStoreError(
                f"version {name}: index dimension {faiss_index.d} does not match "
                f"the manifest's {manifest.get('dim')}"
            )
        try:
            deleted = _optional_npy(directory / DELETED_FILE)
            label_table = _optional_npy(directory / LABELS_FILE)
            class_names = _optional_json(directory / CLASS_NAMES_FILE)
        except (OSError, ValueError) as exc:
            raise IndexStoreError(f"version {name} has a corrupt file: {exc}") from exc
        labels = (label_table[:, 0], label_table[:, 1]) if label_table is not None else None
        encoder = directory / ENCODER_FILE
        index = SearchIndex(
            faiss_index,
            manifest["index_type"],
            params=manifest.get("params", {}),
            manifest=manifest,
            labels=labels,
            class_names=class_names,
            deleted_ids=deleted,
            encoder_path=encoder if encoder.is_file() else None,
            memory_mapped=mapped,
        )
        if index.ntotal != manifest.get("ntotal", index.ntotal):
            raise IndexStoreError(
                f"version {name}: {index.ntotal} vectors but the manifest says {manifest['ntotal']}"
            )
        return index

    def _resolve(self, version: str | None) -> str:
        if version is not None:
            return version
        current = self.current_version()
        if current is None:
            raise IndexStoreError(f"no index published in {self.root} (no {CURRENT_FILE})")
        if not (self.versions_dir / current).is_dir():
            raise IndexStoreError(
                f"{self.root / CURRENT_FILE} names version {current!r}, which does not exist"
            )
        return current

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
        """Write `index` as a new version and (by default) make it current; returns the version name.

        The manifest is the index's own manifest (so a loaded-and-modified index keeps its build
        facts: recall, latency, source...) updated with: format, version, parent_version,
        created_at, dim, metric, index_type, params, ntotal, deleted_count, labels/class count,
        encoder file and version, faiss_version, then `extra_manifest`. `encoder_path` defaults to
        the encoder of the version the index was loaded from. `on_step(step)` is called after each
        of PUBLISH_STEPS.
        """
        encoder_source = Path(encoder_path) if encoder_path is not None else index.encoder_path
        if encoder_source is not None and not encoder_source.is_file():
            raise IndexStoreError(f"encoder file not found: {encoder_source}")
        model_version = encoder_version(encoder_source) if encoder_source is not None else None
        self.versions_dir.mkdir(parents=True, exist_ok=True)
        self.clean_stale()
        name = new_version_name()
        tmp = self.versions_dir / f"{TMP_PREFIX}{uuid.uuid4().hex}"

        def step(label: str) -> None:
            if on_step is not None:
                on_step(label)
            if os.environ.get(CRASH_ENV) == label:
                os._exit(CRASH_EXIT_CODE)

        tmp.mkdir()
        try:
            step("tmp_created")
            written = index.write_snapshot(tmp / INDEX_FILE, tmp / DELETED_FILE, tmp / LABELS_FILE)
            step("index_written")
            if index.class_names is not None:
                _write_json(tmp / CLASS_NAMES_FILE, index.class_names)
                written.append(tmp / CLASS_NAMES_FILE)
            if encoder_source is not None:
                shutil.copyfile(encoder_source, tmp / ENCODER_FILE)
                written.append(tmp / ENCODER_FILE)
                inference_source = encoder_source.with_name(INFERENCE_ENCODER_FILE)
                if inference_source.is_file():  # the reader checks that it is of the same model
                    shutil.copyfile(inference_source, tmp / INFERENCE_ENCODER_FILE)
                    written.append(tmp / INFERENCE_ENCODER_FILE)
            manifest = self._manifest(index, name, written, model_version, extra_manifest)
            _write_json(tmp / MANIFEST_FILE, manifest)
            written.append(tmp / MANIFEST_FILE)
            step("files_written")
            for path in written:
                _fsync_file(path)
            _fsync_dir(tmp)
            step("files_synced")
            os.rename(tmp, self.versions_dir / name)
            step("renamed")
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        _fsync_dir(self.versions_dir)
        step("versions_synced")
        if make_current:
            with self._current_lock():
                if expected_current is not _UNCHECKED and self._read_current() != expected_current:
                    raise CurrentMovedError(
                        f"CURRENT moved to {self._read_current()!r} (expected {expected_current!r}); "
                        f"version {name} was written but not made current"
                    )
                self._write_current(name, step)
        return name

    @contextlib.contextmanager
    def _current_lock(self):
        """An exclusive lock around check-and-switch of CURRENT, across processes (the service
        republishing its adds and a refresh publishing a new model must not overwrite each other)."""
        import fcntl

        self.root.mkdir(parents=True, exist_ok=True)
        with open(self.root / ".current.lock", "w") as handle:
            fcntl.flock(handle, fcntl.LOCK_EX)
            yield

    def _read_current(self) -> str | None:
        path = self.root / CURRENT_FILE
        return path.read_text().strip() or None if path.is_file() else None

    def set_current(self, version: str) -> None:
        """Point CURRENT at an existing version (e.g. to roll back)."""
        self.read_manifest(version)  # raises if missing or incomplete
        with self._current_lock():
            self._write_current(version, lambda _step: None)

    def _write_current(self, version: str, step: Callable[[str], None]) -> None:
        tmp = self.root / f"{CURRENT_FILE}.tmp-{uuid.uuid4().hex[:8]}"
        with open(tmp, "w", encoding="utf-8") as handle:
            handle.write(version + "\n")
            handle.flush()
            os.fsync(handle.fileno())
        step("current_tmp_written")
        os.replace(tmp, self.root / CURRENT_FILE)
        step("current_replaced")
        _fsync_dir(self.root)

    def _manifest(
        self,
        index: SearchIndex,
        name: str,
        written: list[Path],
        encoder_version: str | None,
        extra: dict[str, Any] | None,
    ) -> dict[str, Any]:
        manifest = dict(index.manifest)
        parent = manifest.get("version")
        manifest.update(
            {
                "format": MANIFEST_FORMAT,
                "version": name,
                "parent_version": parent,
                "created_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                "dim": index.dim,
                "metric": "inner_product",
                "index_type": index.index_type,
                "params": index.params,
                "ntotal": index.ntotal,
                "deleted_count": index.deleted_count,
                "labelled": int(index.label_arrays()[0].size),
                "num_classes": len(index.class_names) if index.class_names is not None else None,
                "encoder_file": ENCODER_FILE if encoder_version is not None else None,
                "encoder_version": encoder_version,
                "files": sorted(p.name for p in written),
                "faiss_version": faiss.__version__,
            }
        )
        manifest.update(extra or {})
        return manifest

    # ----------------------------------------------------------------- housekeeping
    def clean_stale(self, older_than_s: float = STALE_TMP_SECONDS) -> list[str]:
        """Remove temporary publish directories and CURRENT.tmp files older than `older_than_s`
        (younger ones may belong to a publish in progress). Returns what was removed."""
        removed = []
        cutoff = time.time() - older_than_s
        candidates = list(self.versions_dir.glob(f"{TMP_PREFIX}*")) if self.versions_dir.is_dir() else []
        candidates += list(self.root.glob(f"{CURRENT_FILE}.tmp*")) if self.root.is_dir() else []
        for path in candidates:
            with contextlib.suppress(FileNotFoundError):
                if path.lstat().st_mtime <= cutoff:
                    if path.is_dir():
                        shutil.rmtree(path, ignore_errors=True)
                    else:
                        path.unlink()
                    removed.append(path.name)
        return removed

    def prune(self, keep: int = 3, *, stale_after_s: float = STALE_TMP_SECONDS) -> list[str]:
        """Delete all but the `keep` newest versions, never the current one; also clean stale
        temporary directories. Returns the deleted version names. (A process still serving a deleted
        memory-mapped version keeps working: the mapping outlives the unlinked files.)"""
        if keep < 1:
            raise ValueError("keep must be at least 1")
        self.clean_stale(stale_after_s)
        current = self.current_version()
        doomed = [v for v in self.versions()[:-keep] if v != current]
        for version in doomed:
            shutil.rmtree(self.versions_dir / version, ignore_errors=True)
        if doomed:
            _fsync_dir(self.versions_dir)
        return doomed


# --------------------------------------------------------------------- file helpers
def _read_faiss(path: Path, mmap: bool) -> tuple[faiss.Index, bool]:
    if not path.is_file():
        raise IndexStoreError(f"version {path.parent.name} is missing {path.name}")
    if mmap:
        # Zero-copy mapping (FAISS >= 1.10) for every type; older FAISS maps IVF lists only.
        flags = getattr(faiss, "IO_FLAG_MMAP_IFC", faiss.IO_FLAG_MMAP) | faiss.IO_FLAG_READ_ONLY
        try:
            return faiss.read_index(str(path), flags), True
        except RuntimeError:
            pass  # this type cannot be mapped: read it normally
    try:
        return faiss.read_index(str(path)), False
    except RuntimeError as exc:
        first_line = str(exc).strip().splitlines()[-1] if str(exc).strip() else "unreadable"
        raise IndexStoreError(f"version {path.parent.name}: corrupt {path.name} ({first_line})") from exc


def _optional_npy(path: Path) -> np.ndarray | None:
    return np.load(path, allow_pickle=False) if path.is_file() else None


def _optional_json(path: Path) -> Any:
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else None


def _write_json(path: Path, value: Any) -> None:
    path.write_text(json.dumps(value, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def _fsync_file(path: Path) -> None:
    with open(path, "rb") as handle:
        os.fsync(handle.fileno())


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
