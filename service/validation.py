"""Request value types shared by the routes: labels and tags are plain strings with no Mongo
operator characters, so nothing a client sends can turn into a query operator."""

from __future__ import annotations

from typing import Annotated

from pydantic import StringConstraints, TypeAdapter, ValidationError

# No "$" (operators), no braces (JSON smuggled in a form field or query string), no control characters.
SAFE_TEXT_PATTERN = r"^[^$\{\}\x00-\x1f]+$"
Label = Annotated[
    str, StringConstraints(strict=True, min_length=1, max_length=100, pattern=SAFE_TEXT_PATTERN)
]
Tag = Annotated[str, StringConstraints(strict=True, min_length=1, max_length=100, pattern=SAFE_TEXT_PATTERN)]
MAX_TAGS = 32


def split_tags(values: list[str] | None) -> list[str]:
    """Form/query tags: repeated fields and/or comma-separated values, trimmed, de-duplicated."""
    tags: list[str] = []
    for value in values or []:
        for part in value.split(","):
            part = part.strip()
            if part and part not in tags:
                tags.append(part)
    return tags


_TAGS = TypeAdapter(list[Tag])
_LABEL = TypeAdapter(Label)


class InvalidValue(ValueError):
    """A label or tag that is not a safe plain string: HTTP 422."""


def parse_tags(values: list[str] | None, field: str = "tags") -> list[str]:
    tags = split_tags(values)
    if len(tags) > MAX_TAGS:
        raise InvalidValue(f"{field}: at most {MAX_TAGS} tags")
    try:
        return _TAGS.validate_python(tags)
    except ValidationError as exc:
        raise InvalidValue(f"{field}: {_first_message(exc)} (no '$', braces or control characters)") from exc


def parse_label(value: str | None, field: str = "label") -> str | None:
    if value is None:
        return None
    try:
        return _LABEL.validate_python(value)
    except ValidationError as exc:
        raise InvalidValue(f"{field}: {_first_message(exc)} (no '$', braces or control characters)") from exc


def _first_message(exc: ValidationError) -> str:
    return str(exc.errors()[0].get("msg", "invalid value"))
