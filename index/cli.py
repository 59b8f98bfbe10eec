"""Shared CLI plumbing: bad input ends in one clear line on stderr and exit status 1 (argparse
already uses 2 for usage errors), never a traceback."""

from __future__ import annotations

import sys
from collections.abc import Callable

EXIT_ERROR = 1


def run_cli(main: Callable[[list[str] | None], int], argv: list[str] | None = None) -> int:
    try:
        return main(argv)
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return 130
    except MemoryError:
        print("error: out of memory (try a smaller --max-memory or another --type)", file=sys.stderr)
        return EXIT_ERROR
    except Exception as exc:  # every failure becomes one line; the type says where it came from
        message = str(exc).strip().splitlines()[-1] if str(exc).strip() else type(exc).__name__
        print(f"error: {message}", file=sys.stderr)
        return EXIT_ERROR
