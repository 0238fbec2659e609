"""Reading user-supplied JSON / JSONL record files with errors that name the file, line and field.

:func:`read_records` accepts JSONL (one object per line; blank lines skipped) or one JSON array of
objects, and returns ``(where, record)`` pairs, ``where`` being ``"FILE:LINE"`` (JSONL) or
``"FILE[INDEX]"`` (array). :func:`field` checks one field of a record.
"""

from __future__ import annotations

import json
from pathlib import Path


def read_records(path: str | Path) -> list[tuple[str, dict]]:
    """All records of ``path`` (see the module docstring); ValueError on a missing or bad file."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"data file {path} does not exist")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as error:
        raise ValueError(f"{path} is not UTF-8 text: {error}") from None
    if text.lstrip().startswith("["):
        try:
            records = json.loads(text)
        except json.JSONDecodeError as error:
            raise ValueError(f"{path} is not valid JSON: {error}") from None
        pairs = [(f"{path}[{i}]", record) for i, record in enumerate(records)]
    else:
        pairs = []
        for number, line in enumerate(text.splitlines(), start=1):
            if not line.strip():
                continue
            try:
                pairs.append((f"{path}:{number}", json.loads(line)))
            except json.JSONDecodeError as error:
                raise ValueError(f"{path}:{number}: not a JSON object: {error}") from None
    for where, record in pairs:
        if not isinstance(record, dict):
            raise ValueError(f"{where}: a record must be a JSON object, got {type(record).__name__}")
    if not pairs:
        raise ValueError(f"{path} has no records")
    return pairs


def field(record, name: str, kind: type | tuple[type, ...], where: str, optional: bool = False):
    """``record[name]``, checked to be a ``kind`` (non-empty if a string); None if ``optional`` and absent/null."""
    if not isinstance(record, dict):
        raise ValueError(f"{where}: expected a JSON object")
    value = record.get(name)
    if value is None:
        if optional:
            return None
        raise ValueError(f"{where}: missing field {name!r}")
    kinds = kind if isinstance(kind, tuple) else (kind,)
    if not isinstance(value, kinds) or (isinstance(value, bool) and bool not in kinds):
        names = " or ".join(k.__name__ for k in kinds)
        raise ValueError(f"{where}: field {name!r} must be {names}, got {type(value).__name__}")
    if isinstance(value, str) and not value.strip():
        raise ValueError(f"{where}: field {name!r} is empty")
    return value


def string_list(record, name: str, where: str, optional: bool = False) -> tuple[str, ...] | None:
    """A field holding a list of strings, as a tuple (None if ``optional`` and absent/null)."""
    value = field(record, name, list, where, optional)
    if value is None:
        return None
    if not all(isinstance(v, str) for v in value):
        raise ValueError(f"{where}: field {name!r} must be a list of strings")
    return tuple(value)
