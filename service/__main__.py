"""`python -m service [--host H] [--port P]`: serve the API with uvicorn (settings from the environment)."""

from __future__ import annotations

import argparse
import logging
import sys

import uvicorn
from pydantic import ValidationError

from service.embedded_db import EmbeddedDatabaseError, secantusd_executable
from service.main import create_app
from service.settings import Settings

# On SIGTERM or Ctrl-C, requests in flight get this long to finish; then the shutdown itself runs
# (publish, close, stop the embedded database: service.lifecycle.SHUTDOWN_TIMEOUT_S and the server's
# own stop). Unbounded, one stuck request kept the shutdown from ever starting.
GRACEFUL_SHUTDOWN_S = 10


def load_settings() -> Settings:
    try:
        return Settings()
    except ValidationError as exc:  # one line per bad variable, not a traceback
        problems = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors())
        raise SystemExit(f"error: invalid settings: {problems}") from None


def main(argv: list[str] | None = None) -> None:
    settings = load_settings()
    parser = argparse.ArgumentParser(
        prog="python -m service",
        description="Serve the image-retrieval API. Every other setting comes from the environment "
        "(see README.md, 'The service'): MONGO_URI (unset = embedded SecantusDB under DATA_DIR/db), "
        "DATA_DIR, MODEL_CHECKPOINT, INDEX_DIR, API_KEY, CORS_ORIGINS, MAX_UPLOAD_BYTES, MAX_REQUEST_BYTES, "
        "MAX_PIXELS, SEARCH_MAX_K, "
        "RELOAD_POLL_SECONDS.",
    )
    parser.add_argument(
        "--host", default=settings.HOST, help=f"bind address (default {settings.HOST}, env HOST)"
    )
    parser.add_argument(
        "--port", type=int, default=settings.PORT, help=f"port (default {settings.PORT}, env PORT)"
    )
    parser.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    if not settings.MONGO_URI:
        try:  # fail before uvicorn starts, with one line instead of a lifespan traceback
            secantusd_executable()
        except EmbeddedDatabaseError as exc:
            parser.exit(2, f"error: {exc}\n")
    settings = settings.model_copy(update={"HOST": args.host, "PORT": args.port})
    sys.setswitchinterval(settings.GIL_SWITCH_INTERVAL_MS / 1000)  # a process-wide choice: made here
    uvicorn.run(
        create_app(settings),
        host=args.host,
        port=args.port,
        log_level=args.log_level,
        timeout_graceful_shutdown=GRACEFUL_SHUTDOWN_S,
    )


if __name__ == "__main__":
    main()
