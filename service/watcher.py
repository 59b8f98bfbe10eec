"""Follow the catalogue through a MongoDB change stream, so every replica's index keeps up with
writes made through any other replica (or `service.ingest`) without waiting for a published version.

Events on `images` are applied to the loaded index in order, in batches. Replicas replicate vectors,
they do not recompute them: the replica that indexes a record stores its vector in the record
(tagged by the model that computed it: with the insert for uploads and ingest, which embed before
they write, `indexing.store_and_index`; with an update when a pending record is indexed later,
`catalogue.mark_indexed`), and the others add that vector straight from the event. So:
  * an insert or update that carries a vector of the loaded model -> add it (no GridFS read, no
    embedding);
  * an insert (or replacement) of a pending record -> its writer may be embedding it right now
    (a writer of an older release did so after the insert): wait up to
    REPLICA_VECTOR_GRACE_SECONDS for its vector; when it does not come (the writer died, had no
    model loaded, or predates stored vectors), fall back as below;
  * anything else that makes a record live (a status change without a usable vector, a grace
    that ran out) -> the record's stored vector if the loaded model computed it, else embed the
    stored bytes and add (and store the vector in the record for the next replica);
  * deletes -> remove.
Applying is idempotent (every add checks the index first), so an event seen twice, or one that an
upload on this replica already applied, changes nothing. The records stay the truth.

Resume tokens. `token` is the position of the last event applied (advanced only after a batch is
fully applied). The publishing replica stores it with every index version it publishes
(manifest key `change_stream_token`): "this index holds the catalogue as of this token". A process
that loads such a version (at start-up, or a restarted replica) resumes the stream right there
and replays what happened since, instead of a full reconcile. A per-replica token saved elsewhere
would be wrong after a restart: the process reloads a published version, not its lost memory.
Within a process a watcher whose stream failed (database restarting, primary failover) resumes
from its in-memory token. When a token cannot be used (older than the oplog, invalid, collection
dropped) the watcher opens a fresh stream *first* and then reconciles, so nothing written between
the reconcile's read and the stream's start is missed. No change streams at all (a standalone
mongod) -> the watcher says so and the service keeps the version-polling behaviour.

Deferred inserts and the token. `token` moves past a deferred insert (the stream goes on), but the
id stays in memory until its vector arrives or its grace runs out, and the token a version is
published with (`publish_token`) is the position *before* the oldest still-deferred event: a
process that loads that version replays the insert (and the update with the vector, if it came),
so a restart never loses a deferred id. Within the process a stream that fails resumes from
`token` and the deferred ids are still in memory; a swap or a fresh stream + reconcile forgets
them (the version's token, or the reconcile, covers every record they name).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any

import numpy as np
from pymongo.asynchronous.change_stream import AsyncChangeStream
from pymongo.errors import OperationFailure, PyMongoError

from service.catalogue import PENDING, VECTOR, read_file, stored_vectors, usable_vector
from service.engine import Loaded
from service.errors import DATABASE_DOWN
from service.imaging import ImageRejected, decode_image
from service.indexing import index_images
from service.reconcile import reconcile
from service.state import ServiceState

log = logging.getLogger("service.watcher")
TOKEN_KEY = "change_stream_token"
BATCH = 64
MAX_AWAIT_MS = 1000  # an idle getMore waits this long on the server; events end the wait at once
RETRY_S = 1.0
NOT_A_REPLICA_SET = (40573, 40324)  # "$changeStream is only supported on replica sets", unknown stage
# Only what changes an index: inserts, replacements, deletes, and updates that touch `status` or
# `vector` (label or tag edits do not change vectors). The projection keeps events small: of the
# document only what decides between adding a stored vector, waiting for one, and embedding.
EVENT_FIELDS = ("status", "model_version", VECTOR)
PIPELINE: list[dict[str, Any]] = [
    {
        "$match": {
            "$or": [
                {"operationType": {"$in": ["insert", "replace", "delete"]}},
                {"operationType": "update", "updateDescription.updatedFields.status": {"$exists": True}},
                {"operationType": "update", f"updateDescription.updatedFields.{VECTOR}": {"$exists": True}},
            ]
        }
    },
    {
        "$project": {
            "operationType": 1,
            "documentKey": 1,
            "wallTime": 1,
            **{f"fullDocument.{name}": 1 for name in EVENT_FIELDS},
            **{f"updateDescription.updatedFields.{name}": 1 for name in EVENT_FIELDS},
        }
    },
]
LAG_WINDOW = 1000  # recent events kept for the apply-lag percentiles


@dataclass
class WatcherStats:
    state: str = "starting"  # starting | following | retrying | unavailable | stopped
    events_applied: int = 0
    added: int = 0
    added_from_vector: int = 0  # of `added`: from a vector stored by the replica that indexed it
    embedded: int = 0  # of `added`: embedded here from the stored bytes
    grace_expired: int = 0  # deferred inserts whose vector did not come within the grace
    removed: int = 0
    resumed_from_version: str | None = None  # the index version whose token the stream resumed at
    fallback_reconciles: int = 0  # reconciles run because no usable token existed
    last_event_at: float | None = None  # wall-clock time of the last event applied
    detail: str | None = None
    # Seconds from each write's commit (the event's wallTime) to its change in this index.
    lags: deque[float] = field(default_factory=lambda: deque(maxlen=LAG_WINDOW))

    def lag_summary(self) -> dict[str, float | int | None]:
        ordered = sorted(self.lags)

        def ms_at(quantile: float) -> float | None:
            if not ordered:
                return None
            return round(1000 * ordered[min(len(ordered) - 1, int(quantile * len(ordered)))], 1)

        return {"events": len(ordered), "p50_ms": ms_at(0.5), "p95_ms": ms_at(0.95), "max_ms": ms_at(1.0)}


@dataclass
class Deferred:
    """An insert of a pending record whose vector the writing replica is about to store."""

    deadline: float  # monotonic time when the grace runs out
    token: Mapping[str, Any] | None  # the stream position before the insert: replaying from it redoes it
    committed: datetime | None  # the insert's wallTime (its lag is counted when it is applied)


@dataclass
class Change:
    """The net effect of a batch's events on one id (the last event decides, see `_net_changes`)."""

    kind: str  # "delete" | "vector" (add `vector`) | "defer" (wait for a vector) | "lookup"
    vector: np.ndarray | None = None  # D, for "vector"
    committed: datetime | None = None  # for "defer"


class TokenUnusable(RuntimeError):
    """A resume token the server refuses (too old for the oplog, invalid, or from elsewhere)."""


class CatalogueWatcher:
    def __init__(self, state: ServiceState) -> None:
        self.state = state
        self.token: Mapping[str, Any] | None = None
        self.stats = WatcherStats()
        self._stream: AsyncChangeStream | None = None
        self._handover: tuple[AsyncChangeStream, Mapping[str, Any] | None] | None = None
        self._reconciling = False
        self._deferred: dict[int, Deferred] = {}  # in arrival order: the first has the oldest token

    @property
    def deferred(self) -> int:
        """Inserts waiting for their writer's vector now."""
        return len(self._deferred)

    @property
    def following(self) -> bool:
        """The index tracks the catalogue event by event (so versions of the same model can be adopted)."""
        return self.stats.state == "following" and not self._reconciling

    def publish_token(self) -> Mapping[str, Any] | None:
        """The token a version published now may carry: None while the loaded index is not known
        to equal the records as of `token` (a reconcile pending or running, no stream)."""
        if self.state.needs_reconcile or self._reconciling or self.stats.state != "following":
            return None
        if self._deferred:  # not in the index yet: a process resuming here must see their inserts
            return next(iter(self._deferred.values())).token
        return self.token

    # ----------------------------------------------------------------- opening streams
    async def _open(self, token: Mapping[str, Any] | None) -> AsyncChangeStream:
        try:
            return await self.state.db.images.watch(
                PIPELINE, resume_after=token, max_await_time_ms=MAX_AWAIT_MS
            )
        except OperationFailure as exc:
            if exc.code in NOT_A_REPLICA_SET:
                raise
            if token is not None:  # the server understood us but cannot resume there
                raise TokenUnusable(str(exc).split(", full error")[0]) from exc
            raise

    async def resume_at_version(self) -> bool:
        """After a swap (called under the refresh lock): resume at the loaded version's token, so
        no reconcile is needed (True). Otherwise make sure a stream is open *before* the caller's
        reconcile reads the records (False)."""
        loaded = self.state.engine.loaded
        token = loaded.index.manifest.get(TOKEN_KEY) if loaded is not None else None
        try:
            if token is not None:
                try:
                    stream = await self._open(token)
                except TokenUnusable as exc:
                    log.warning("index version %s: its change-stream token is unusable (%s); reconciling",
                                loaded.version, exc)  # fmt: skip
                else:
                    self._hand_over(stream, token)
                    self.stats.resumed_from_version = loaded.version
                    log.info("index version %s: following the catalogue from its change-stream token",
                             loaded.version)  # fmt: skip
                    return True
            if self._stream is None and self._handover is None:
                stream = await self._open(None)
                self._hand_over(stream, stream.resume_token)
        except (*DATABASE_DOWN, OperationFailure) as exc:
            log.warning("no change stream yet (%s); the watcher retries", type(exc).__name__)
        return False

    def _hand_over(self, stream: AsyncChangeStream, token: Mapping[str, Any] | None) -> None:
        previous, self._handover = self._handover, (stream, token)
        if previous is not None:
            asyncio.get_running_loop().create_task(previous[0].close())

    async def _fresh_stream_then_reconcile(self) -> AsyncChangeStream:
        """No usable token: open a stream at "now", then make the index agree with the records."""
        async with self.state.refresh_lock:  # no reconcile is running while we hold it
            stream = await self._open(None)
            self.token = stream.resume_token
            self._deferred.clear()  # the reconcile below (or the pending one) covers their records
            if not self.state.needs_reconcile:  # else the pending one runs after this open anyway
                self._reconciling = True
                try:
                    await reconcile(self.state.engine, self.state.db)
                    self.stats.fallback_reconciles += 1
                except BaseException:
                    self.state.needs_reconcile = True  # the maintenance loop retries it
                    raise
                finally:
                    self._reconciling = False
        return stream

    # ----------------------------------------------------------------- the loop
    async def run(self) -> None:
        while True:
            try:
                await self._follow()
                return
            except asyncio.CancelledError:
                raise
            except OperationFailure as exc:
                if exc.code in NOT_A_REPLICA_SET:
                    self.stats.state, self.stats.detail = "unavailable", str(exc).split(", full error")[0]
                    log.warning("change streams unavailable (%s): replicas see each other's writes only "
                                "through published index versions", self.stats.detail)  # fmt: skip
                    return
                self._failed(exc)
            except (TokenUnusable, PyMongoError) as exc:
                self._failed(exc)
            except Exception as exc:  # never let the watcher die: retry from the last applied token
                log.exception("watcher step failed")
                self._failed(exc)
            await self._close()
            await asyncio.sleep(RETRY_S)

    def _failed(self, exc: Exception) -> None:
        if isinstance(exc, TokenUnusable):
            self.token = None  # next round: fresh stream + reconcile
        self.stats.state, self.stats.detail = "retrying", f"{type(exc).__name__}: {str(exc)[:200]}"
        log.warning("change stream interrupted (%s); resuming in %.0f s", self.stats.detail, RETRY_S)

    async def _follow(self) -> None:
        engine = self.state.engine
        while True:
            if self._handover is not None:
                await self._close()
                (self._stream, self.token), self._handover = self._handover, None
                # The new position is a version's token (complete up to it: deferred inserts after
                # it are replayed) or a fresh stream that the caller's reconcile follows.
                self._deferred.clear()
            if engine.loaded is None:  # nothing to apply events to yet: leave them in the stream
                await asyncio.sleep(RETRY_S)
                continue
            if self._stream is None:
                self._stream = (
                    await self._open(self.token) if self.token is not None
                    else await self._fresh_stream_then_reconcile()
                )  # fmt: skip
            self.stats.state, self.stats.detail = "following", None
            stream = self._stream
            batch = [event] if (event := await stream.try_next()) is not None else []
            while batch and len(batch) < BATCH and _buffered(stream):
                batch.append(await stream.try_next())
            if self._handover is not None and stream is not self._handover[0]:
                continue  # a swap repositioned us meanwhile; this batch is replayed from there if needed
            if batch:
                await self._apply(batch, self.token)
            if not stream.alive:  # invalidated (collection dropped or renamed)
                raise TokenUnusable("the change stream was invalidated")
            self.token = stream.resume_token or self.token
            await self._resolve_expired()  # an idle stream still comes here every MAX_AWAIT_MS

    def _net_changes(self, events: list[Mapping[str, Any]], loaded: Loaded | None) -> dict[int, Change]:
        """Per id, in the order of each id's last event: what the batch asks of the index."""
        changes: dict[int, Change] = {}
        for event in events:
            image_id = int(event["documentKey"]["_id"])
            operation = event["operationType"]
            previous = changes.pop(image_id, None)  # keep insertion order = last event's order
            if operation == "delete":
                changes[image_id] = Change("delete")
                continue
            if operation == "update":
                fields = event.get("updateDescription", {}).get("updatedFields", {})
            else:  # insert or replace: the projected part of the whole document
                fields = event.get("fullDocument") or {}
            vector = (
                usable_vector(fields, loaded.model_version, loaded.index.dim) if loaded is not None else None
            )
            if vector is not None:
                changes[image_id] = Change("vector", vector)
            elif operation == "update" and VECTOR not in fields and previous and previous.kind == "vector":
                changes[image_id] = previous  # a later status change leaves the vector just seen valid
            elif operation != "update" and fields.get("status") == PENDING:
                changes[image_id] = Change("defer", committed=_wall_time(event))
            else:  # indexed without a vector we can use: the record itself decides (`_add_stored`)
                changes[image_id] = Change("lookup")
        return changes

    async def _apply(self, events: list[Mapping[str, Any]], token_before: Mapping[str, Any] | None) -> None:
        """Net effect per id in event order: removes, then adds from the events' vectors, then
        lookups (the stored vector, else the stored bytes); pending inserts wait (`_deferred`)."""
        engine = self.state.engine
        loaded = engine.loaded
        changes = self._net_changes(events, loaded)
        deleted = [i for i, change in changes.items() if change.kind == "delete"]
        live = [i for i, change in changes.items() if change.kind != "delete"]
        settled = [i for i, change in changes.items() if change.kind != "defer" and i in self._deferred]
        resolved = [self._deferred.pop(i) for i in settled]  # their vector came, or they went
        if deleted:
            self.stats.removed += await engine.remove(deleted)
        if live and loaded is not None:
            # The vectors were checked against `loaded`: keep it (after a swap meanwhile, every add
            # below is refused and the swap's resume or reconcile covers these records).
            await engine.wait_indexing(live)  # a reconcile in this replica is embedding them now
            indexed = await engine.run_in_thread(loaded.index.contains, live)
            todo = [i for i, there in zip(live, indexed.tolist(), strict=True) if not there]
            for image_id in set(live) - set(todo):  # added here meanwhile: nothing to wait for
                if (entry := self._deferred.pop(image_id, None)) is not None:
                    resolved.append(entry)
            await self._add_vectors(
                loaded, {i: changes[i].vector for i in todo if changes[i].kind == "vector"}
            )
            deadline = time.monotonic() + self.state.settings.REPLICA_VECTOR_GRACE_SECONDS
            for image_id in todo:
                change = changes[image_id]
                if change.kind == "defer" and image_id not in self._deferred:
                    self._deferred[image_id] = Deferred(deadline, token_before, change.committed)
            await self._add_stored(loaded, [i for i in todo if changes[i].kind == "lookup"])
        self.stats.events_applied += len(events)
        self.stats.last_event_at = time.time()
        # An event counts when its change is in the index: a deferred insert's when it is resolved.
        applied = [e for e in events if int(e["documentKey"]["_id"]) not in self._deferred]
        self._record_lags([_wall_time(e) for e in applied] + [entry.committed for entry in resolved])

    async def _resolve_expired(self) -> None:
        """Deferred inserts whose vector did not come in time: the stored vector (it may have come
        by a path we did not see), else embed the stored bytes."""
        now = time.monotonic()
        expired = [i for i, entry in self._deferred.items() if entry.deadline <= now]
        loaded = self.state.engine.loaded
        if not expired or loaded is None:
            return
        entries = [self._deferred.pop(i) for i in expired]
        self.stats.grace_expired += len(expired)
        await self._add_stored(loaded, expired)
        self._record_lags([entry.committed for entry in entries])

    async def _add_vectors(self, loaded: Loaded, vectors: dict[int, np.ndarray | None]) -> None:
        """Add vectors another replica computed with our model. Their records are marked indexed
        already (the event said so), so nothing is written back."""
        if vectors:
            ids = list(vectors)
            added = await self.state.engine.add(loaded, np.stack(list(vectors.values())), ids)  # NxD
            self.stats.added += len(added)
            self.stats.added_from_vector += len(added)

    async def _add_stored(self, loaded: Loaded, ids: list[int]) -> None:
        """The records' stored vectors where the loaded model computed them, else their bytes."""
        if not ids:
            return
        await self.state.engine.wait_indexing(ids)
        indexed = await self.state.engine.run_in_thread(loaded.index.contains, ids)
        ids = [i for i, there in zip(ids, indexed.tolist(), strict=True) if not there]
        known = await stored_vectors(self.state.db, ids, loaded.model_version, loaded.index.dim)
        await self._add_vectors(loaded, known)
        embedded = await self._embed_and_add(loaded, [i for i in ids if i not in known])
        self.stats.added += embedded
        self.stats.embedded += embedded

    def _record_lags(self, committed: list[datetime | None]) -> None:
        now = time.time()
        for moment in committed:
            if moment is not None:
                self.stats.lags.append(max(0.0, now - moment.timestamp()))

    async def _embed_and_add(self, loaded: Loaded, ids: list[int]) -> int:
        """Embed the stored bytes and add. Unlike reconcile, never drops a record whose bytes are
        missing: seen live, that can be a write still in flight; reconcile decides after its grace."""
        engine, db, settings = self.state.engine, self.state.db, self.state.settings
        images, kept = [], []
        for image_id in ids:
            stored = await read_file(db, image_id)
            if stored is None:
                continue  # deleted meanwhile (its delete event follows) or not written yet
            limit = max(settings.MAX_UPLOAD_BYTES, len(stored[0]))
            try:
                decoded = await engine.run_in_thread(decode_image, stored[0], limit, settings.MAX_PIXELS)
            except ImageRejected as exc:
                log.warning("record %d: stored bytes unreadable (%s); left pending", image_id, exc)
                continue
            images.append(decoded.image)
            kept.append(image_id)
        return len(await index_images(engine, db, loaded, kept, images))

    async def _close(self) -> None:
        stream, self._stream = self._stream, None
        if stream is not None:
            with contextlib.suppress(PyMongoError):
                await stream.close()

    async def stop(self) -> None:
        await self._close()
        if self._handover is not None:
            await self._handover[0].close()
            self._handover = None
        self.stats.state = "stopped"


def _wall_time(event: Mapping[str, Any]) -> datetime | None:
    """When the event's write committed (timezone-aware), if the server says."""
    committed = event.get("wallTime")
    if not isinstance(committed, datetime):
        return None
    if committed.tzinfo is None:  # a client without tz_aware decoding: BSON dates are UTC
        committed = committed.replace(tzinfo=timezone.utc)
    return committed


def _buffered(stream: AsyncChangeStream) -> bool:
    """Events of the last getMore still buffered client-side: take them into this batch without
    another round trip (which would wait MAX_AWAIT_MS when none are left)."""
    cursor = getattr(stream, "_cursor", None)
    return bool(cursor is not None and cursor._has_next())
