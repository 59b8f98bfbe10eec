"""Every setting of the service, read from the environment (or a `.env` file) by pydantic-settings."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

from pydantic import Field, SecretStr, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from index.expansion import MAX_EXPANSION


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_file=".env", env_file_encoding="utf-8", extra="ignore")

    # Storage. Without MONGO_URI the service runs SecantusDB as a child process under DATA_DIR/db.
    MONGO_URI: str | None = Field(None, description="mongodb:// URI; unset = embedded SecantusDB")
    MONGO_DB: str = Field("retrieval", description="database name")
    MONGO_TIMEOUT_MS: int = Field(
        2000, ge=100, description="server selection timeout (503 after this when the DB is down)"
    )
    EMBEDDED_DB_PORT: int = Field(0, ge=0, le=65535, description="port of the embedded DB, 0 = a free one")
    DATA_DIR: Path = Field(Path("data"), description="root of the database, model and index files")
    MODEL_CHECKPOINT: Path | None = Field(
        None, description="encoder file used when no index version exists yet (default DATA_DIR/model.pt)"
    )
    INDEX_DIR: Path | None = Field(None, description="IndexStore root (default DATA_DIR/index)")
    INDEX_STORAGE_URL: str | None = Field(
        None,
        description="where index versions live for replicas on several machines: s3://BUCKET/PREFIX "
        "(endpoint and credentials from boto3's environment, e.g. AWS_ENDPOINT_URL) or a shared "
        "directory; INDEX_DIR is then a local cache. Unset: INDEX_DIR itself is the store",
    )

    # Reliability: durability, supervision of the embedded database, background clean-up.
    MONGO_JOURNAL: bool = Field(True, description="writes acknowledged once journaled (j: true)")
    EMBEDDED_DB_DURABLE: bool = Field(True, description="embedded DB fsyncs its log on every commit")
    EMBEDDED_DB_CHECK_SECONDS: float = Field(2.0, gt=0, description="how often the embedded DB is checked")
    EMBEDDED_DB_HANG_SECONDS: float = Field(
        180.0, gt=0, description="restart the embedded DB after this long without answering a real query"
    )
    ORPHAN_GRACE_SECONDS: float = Field(
        600.0, ge=0, description="age before GridFS files without a record are deleted"
    )
    ORPHAN_SWEEP_SECONDS: float = Field(600.0, gt=0, description="how often the orphan sweep runs")
    ORPHAN_SWEEP_DUTY: float = Field(
        0.5, gt=0, le=1, description="largest share of the database's time the orphan sweep takes (it pauses)"
    )

    # HTTP.
    HOST: str = "127.0.0.1"
    PORT: int = Field(8000, ge=0, le=65535)
    # A SecretStr: the key shows as '**********' wherever the settings are printed or logged.
    API_KEY: SecretStr | None = Field(None, description="when set, writes and admin need X-API-Key")
    PROTECT_READS: bool = Field(False, description="when true (and API_KEY set), reads need the key too")
    CORS_ORIGINS: Annotated[list[str], NoDecode] = Field(
        default_factory=list,
        description="origins allowed to call the API from a browser (comma-separated or a JSON list); "
        "empty = CORS off",
    )

    # Limits.
    MAX_UPLOAD_BYTES: int = Field(20 * 1024 * 1024, ge=1, description="per uploaded file")
    MAX_FILES_PER_REQUEST: int = Field(64, ge=1)
    MAX_REQUEST_BYTES: int = Field(
        256 * 1024 * 1024, ge=1, description="whole body of POST /images (other requests: one file + 1 MiB)"
    )
    MAX_PIXELS: int = Field(40_000_000, ge=1, description="width*height limit (decompression bombs)")
    SEARCH_MAX_K: int = Field(1000, ge=1)
    SEARCH_EXPAND: int = Field(
        5,
        ge=0,
        le=MAX_EXPANSION,
        description="POST /search ranks by alpha query expansion (Radenovic et al. 2018, alpha 3) over "
        "the query's top N results, unless a request sets `expand`; scores stay the cosine similarity "
        "to the query image. 0: plain nearest neighbours. POST /classify never expands (the paper's kNN)",
    )
    THUMBNAIL_SIZE: int = Field(128, ge=8, description="longer side of stored thumbnails, pixels")
    THUMBNAIL_CACHE_BYTES: int = Field(
        64 * 2**20, ge=0, description="memory for hot thumbnails (search results, GET thumbnail); 0: none"
    )

    # Classifier: weighted kNN of Wu et al. 2018 (InstDisc), k = 200, tau = 0.07.
    CLASSIFY_K: int = Field(200, ge=1)
    CLASSIFY_TAU: float = Field(0.07, gt=0)

    # Index life cycle.
    RELOAD_POLL_SECONDS: float = Field(
        5.0, gt=0, description="how often CURRENT is checked for a new version"
    )
    PUBLISH_DEBOUNCE_SECONDS: float = Field(10.0, ge=0, description="quiet time before republishing changes")
    INDEX_KEEP_VERSIONS: int = Field(5, ge=1, description="index versions kept on disk after a publish")
    PUBLISHER_LEASE_SECONDS: float = Field(
        10.0, gt=0, description="lease of the one replica that republishes the index (others only load)"
    )
    REPLICA_ID: str | None = Field(None, description="name in the publisher lease (default host:pid:random)")
    REPLICA_VECTOR_GRACE_SECONDS: float = Field(
        2.5,
        ge=0,
        description="how long a replica waits for the vector of a record another replica is indexing "
        "before it embeds the stored bytes itself",
    )
    EMBED_BATCH_MAX: int = Field(64, ge=1, description="largest micro-batch of concurrent embeddings")
    INFERENCE_THREADS: int = Field(2, ge=1, description="thread pool for decode, inference and FAISS")
    INTRA_OP_THREADS: int = Field(
        0,
        ge=0,
        description="threads per forward pass (torch's or ONNX Runtime's); 0: 1 for an encoder of at "
        "most 1 GMAC per image (batches then run side by side, one per pool thread; more threads "
        "gain only by spinning on the other core), torch's default otherwise",
    )
    FAISS_THREADS: int = Field(
        1, ge=1, description="OpenMP threads per FAISS call (1: no spin-wait contention with torch)"
    )
    GIL_SWITCH_INTERVAL_MS: float = Field(
        0.5,
        gt=0,
        le=100,
        description="how long a thread may hold the GIL while another waits for it (Python's own "
        "default: 5 ms). A pool thread back from a forward pass or a FAISS search needs the GIL to hand "
        "its result over, and under load the event loop holds it for long stretches: 0.5 ms gave "
        "6-12% more searches/s at concurrency 16 (bench/RESULTS.md). Set by `python -m service`",
    )

    @field_validator(
        "MONGO_URI", "API_KEY", "MODEL_CHECKPOINT", "INDEX_DIR", "REPLICA_ID", "INDEX_STORAGE_URL",
        mode="before",
    )  # fmt: skip
    @classmethod
    def _empty_is_unset(cls, value: object) -> object:
        """`API_KEY=` (as docker compose passes an unset variable) means unset, not an empty key."""
        return None if isinstance(value, str) and not value.strip() else value

    @field_validator("CORS_ORIGINS", mode="before")
    @classmethod
    def _comma_separated(cls, value: object) -> object:
        """`CORS_ORIGINS=https://a.example,https://b.example` as well as a JSON list."""
        if isinstance(value, str):
            text = value.strip()
            return (
                json.loads(text)
                if text.startswith("[")
                else [o.strip() for o in text.split(",") if o.strip()]
            )
        return value

    @property
    def index_dir(self) -> Path:
        return self.INDEX_DIR or self.DATA_DIR / "index"

    @property
    def model_checkpoint(self) -> Path:
        return self.MODEL_CHECKPOINT or self.DATA_DIR / "model.pt"

    @property
    def db_dir(self) -> Path:
        return self.DATA_DIR / "db"
