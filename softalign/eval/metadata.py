"""Read and check GenEval metadata lines (`prompts/evaluation_metadata.jsonl`, one JSON object a line).

A line looks like
`{"tag": "position", "include": [{"class": "kite", "count": 1}, {"class": "dog", "count": 1, "position": ["above", 0]}],
"prompt": "a photo of a dog above a kite"}`. The checks catch what would otherwise surface later as a `KeyError` deep
in the rules, or worse, as a silently wrong score (a count of `"2"`, a typo in a relation, a position that points at
a clause not yet matched). Dicts are returned unchanged, so `json.dumps` of one gives GenEval's `metadata` column.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from typing import Any

TAGS = ("single_object", "two_object", "counting", "colors", "position", "color_attr")
RELATIONS = ("left of", "right of", "above", "below")

_LINE_KEYS = {"tag", "include", "prompt"}
_OPTIONAL_LINE_KEYS = {"exclude"}
_INCLUDE_KEYS = {"class", "count", "color", "position"}
_EXCLUDE_KEYS = {"class", "count"}  # GenEval reads only these two from an exclude clause


def _where(source: str, line: int | None) -> str:
    return f"{source}, line {line}" if line is not None else source


def validate_metadata(
    metadata: Any,
    *,
    source: str = "metadata",
    line: int | None = None,
    classes: Iterable[str] | None = None,
    colors: Iterable[str] | None = None,
) -> dict:
    """Check one GenEval metadata object and return it unchanged.

    Args:
        metadata (`dict`): the parsed line.
        source (`str`, *optional*): the file name (or other origin) to name in errors.
        line (`int`, *optional*): the 1-based line number to name in errors.
        classes (`Iterable[str]`, *optional*): when given, every clause's class must be one of these.
        colors (`Iterable[str]`, *optional*): when given, every clause's colour must be one of these.

    Raises:
        `ValueError`: naming the source, the line and what was expected.
    """
    where = _where(source, line)
    if not isinstance(metadata, dict):
        raise ValueError(f"{where}: expected a JSON object, got {type(metadata).__name__}")
    missing = sorted(_LINE_KEYS - metadata.keys())
    if missing:
        raise ValueError(
            f"{where}: missing key(s) {missing}; a line needs 'tag', 'include', 'prompt' (and may have 'exclude')"
        )
    unknown = sorted(metadata.keys() - _LINE_KEYS - _OPTIONAL_LINE_KEYS)
    if unknown:
        raise ValueError(f"{where}: unknown key(s) {unknown}; expected only 'tag', 'include', 'exclude', 'prompt'")
    tag = metadata["tag"]
    if tag not in TAGS:
        raise ValueError(f"{where}: unknown tag {tag!r}; expected one of {list(TAGS)}")
    prompt = metadata["prompt"]
    if not isinstance(prompt, str) or not prompt.strip():
        raise ValueError(f"{where}: 'prompt' must be a non-empty string, got {prompt!r}")
    class_set = None if classes is None else set(classes)
    color_set = None if colors is None else set(colors)
    include = metadata["include"]
    if not isinstance(include, list) or not include:
        raise ValueError(f"{where}: 'include' must be a non-empty list of clauses, got {include!r}")
    for index, clause in enumerate(include):
        _check_clause(clause, f"{where}: include[{index}]", _INCLUDE_KEYS, class_set, color_set)
        if "position" in clause:
            _check_position(clause["position"], index, f"{where}: include[{index}].position")
    exclude = metadata.get("exclude", [])
    if not isinstance(exclude, list):
        raise ValueError(f"{where}: 'exclude' must be a list of clauses, got {exclude!r}")
    for index, clause in enumerate(exclude):
        _check_clause(clause, f"{where}: exclude[{index}]", _EXCLUDE_KEYS, class_set, None)
    return metadata


def _check_clause(clause: Any, where: str, allowed: set[str], classes: set | None, colors: set | None) -> None:
    if not isinstance(clause, dict):
        raise ValueError(f"{where}: expected an object like {{'class': 'dog', 'count': 1}}, got {clause!r}")
    missing = sorted({"class", "count"} - clause.keys())
    if missing:
        raise ValueError(f"{where}: missing key(s) {missing}; a clause needs 'class' and 'count'")
    unknown = sorted(clause.keys() - allowed)
    if unknown:
        raise ValueError(f"{where}: unknown key(s) {unknown}; expected only {sorted(allowed)}")
    name = clause["class"]
    if not isinstance(name, str) or not name:
        raise ValueError(f"{where}: 'class' must be a non-empty string, got {name!r}")
    if classes is not None and name not in classes:
        raise ValueError(f"{where}: unknown class {name!r}; expected one of {sorted(classes)}")
    count = clause["count"]
    # bool is an int in Python; `"count": true` is a typo, not a count of one.
    if isinstance(count, bool) or not isinstance(count, int) or count < 1:
        raise ValueError(f"{where}: 'count' must be a positive integer, got {count!r}")
    if "color" in clause:
        color = clause["color"]
        if not isinstance(color, str) or not color:
            raise ValueError(f"{where}: 'color' must be a non-empty string, got {color!r}")
        if colors is not None and color not in colors:
            raise ValueError(f"{where}: unknown color {color!r}; expected one of {sorted(colors)}")


def _check_position(position: Any, index: int, where: str) -> None:
    if not isinstance(position, (list, tuple)) or len(position) != 2:
        raise ValueError(f"{where}: expected [relation, clause_index] like ['left of', 0], got {position!r}")
    relation, target = position
    if relation not in RELATIONS:
        raise ValueError(f"{where}: unknown relation {relation!r}; expected one of {list(RELATIONS)}")
    # GenEval looks the target up among the clauses already matched, so it must be an earlier clause.
    if isinstance(target, bool) or not isinstance(target, int) or not 0 <= target < index:
        raise ValueError(
            f"{where}: clause index must be an integer pointing at an earlier include clause (0..{index - 1}), "
            f"got {target!r}"
            if index
            else f"{where}: the first include clause cannot have a position (there is no earlier clause), got {position!r}"
        )


def parse_metadata_line(text: str, *, source: str = "metadata", line: int | None = None, **checks) -> dict:
    """Parse one JSONL line and [`validate_metadata`] it; `checks` are its `classes` / `colors`."""
    try:
        metadata = json.loads(text)
    except json.JSONDecodeError as error:
        raise ValueError(f"{_where(source, line)}: broken JSON ({error.msg} at column {error.colno})") from None
    except RecursionError:
        raise ValueError(f"{_where(source, line)}: JSON nested too deeply") from None
    return validate_metadata(metadata, source=source, line=line, **checks)


def load_metadata(
    path: str | os.PathLike, *, classes: Iterable[str] | None = None, colors: Iterable[str] | None = None
) -> list[dict]:
    """Read a GenEval `evaluation_metadata.jsonl` (or a per-prompt `metadata.jsonl`), checking every line.

    Blank lines are skipped; line numbers in errors count them, so they match an editor's.

    Args:
        path (`str` or `os.PathLike`): the JSONL file.
        classes (`Iterable[str]`, *optional*): allowed class names, e.g. GenEval's 80 COCO names.
        colors (`Iterable[str]`, *optional*): allowed colours, e.g. [`COLORS`].

    Returns:
        `list[dict]`: one metadata dict per non-blank line, in file order.
    """
    source = os.fspath(path)
    if classes is not None:
        classes = set(classes)
    if colors is not None:
        colors = set(colors)
    entries = []
    try:
        with open(source, encoding="utf-8") as handle:
            lines = handle.read().split("\n")
    except UnicodeDecodeError as error:
        raise ValueError(f"{source} is not UTF-8 text: {error}") from None
    for number, text in enumerate(lines, start=1):
        if text.strip():
            entries.append(parse_metadata_line(text, source=source, line=number, classes=classes, colors=colors))
    if not entries:
        raise ValueError(f"{source}: no metadata lines; expected one JSON object per line")
    return entries
