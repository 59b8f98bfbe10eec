"""Request value types shared by the routes: labels and tags are plain strings with no Mongo
operator characters, so nothing a client sends can turn into a query operator."""

from __future__ import annotations

import json
from typing import Annotated

from pydantic import StringConstraints, TypeAdapter, ValidationError

# No "$" (operators), no braces or brackets (JSON smuggled in a form field or query string, or a
# fragment of a list), no control characters.
SAFE_TEXT_PATTERN = r"^[^$\{\}\[\]\x00-\x1f]+$"
SAFE_TEXT_RULE = "no '$', braces, brackets or control characters"
Label = Annotated[
    str, StringConstraints(strict=True, min_length=1, max_length=100, pattern=SAFE_TEXT_PATTERN)
]
Tag = Annotated[str, StringConstraints(strict=True, min_length=1, max_length=100, pattern=SAFE_TEXT_PATTERN)]
MAX_TAGS = 32


class InvalidValue(ValueError):
    """A label or tag that is not a safe plain string: HTTP 422."""


def _tag_parts(value: object, field: str) -> list[object]:
    """One form value: a JSON list (`["a", "b"]`) or comma-separated tags (`a,b`)."""
    if not isinstance(value, str):
        return [value]  # left for the type check to refuse
    text = value.strip()
    if not text.startswith("["):
        return text.split(",")
    try:
        parsed = json.loads(text)
    except ValueError:
        parsed = None
    if not isinstance(parsed, list) or not all(isinstance(tag, str) for tag in parsed):
        raise InvalidValue(
            f'{field}: a value starting with "[" must be a JSON list of strings, like ["a", "b"]'
        )
    return parsed


def split_tags(values: list[str] | None, field: str = "tags") -> list[str]:
    """Form/query tags: repeated fields, comma-separated values and/or JSON lists; trimmed, de-duplicated."""
    tags: list[str] = []
    for value in values or []:
        for part in _tag_parts(value, field):
            part = part.strip() if isinstance(part, str) else part
            if part and part not in tags:
                tags.append(part)
    return tags


_TAGS = TypeAdapter(list[Tag])
_LABEL = TypeAdapter(Label)


def parse_tags(values: list[str] | None, field: str = "tags") -> list[str]:
    tags = split_tags(values, field)
    if len(tags) > MAX_TAGS:
        raise InvalidValue(f"{field}: at most {MAX_TAGS} tags")
    try:
        return _TAGS.validate_python(tags)
    except ValidationError as exc:
        raise InvalidValue(f"{field}: {_first_message(exc)} ({SAFE_TEXT_RULE})") from exc


def parse_label(value: str | None, field: str = "label") -> str | None:
    if value is None:
        return None
    try:
        return _LABEL.validate_python(value)
    except ValidationError as exc:
        raise InvalidValue(f"{field}: {_first_message(exc)} ({SAFE_TEXT_RULE})") from exc


def _first_message(exc: ValidationError) -> str:
    return str(exc.errors()[0].get("msg", "invalid value"))
