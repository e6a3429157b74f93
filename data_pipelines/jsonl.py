"""JSON Lines files written by people: every bad line becomes a numbered problem, never an exception.

Every command that reads a user's JSONL (custom training data, predictions to score) reads it
with `read_lines`: a line that is not UTF-8, not JSON, holds an integer longer than Python
converts (4300 digits), or nests deeper than `MAX_DEPTH` is yielded as a problem and reading goes
on, so one report can name every bad line. Only a file that cannot be read at all raises
(`UnreadableFile`). `show` gives a short, safe repr of a hostile value for such reports;
`is_finite_number` tells a usable number from a bool, a NaN or a 400-digit integer.
"""
import codecs
import json
import math
import numbers
import reprlib
import sys
from typing import Any, Iterator, TextIO

# Far beyond any record of this project (pointing masks are 4 levels) and far below the depth at
# which Python's own recursion (json, repr, ==) fails, so a record that passes is safe to use.
MAX_DEPTH = 64

_SHORT = reprlib.Repr()
_SHORT.maxlevel, _SHORT.maxstring, _SHORT.maxother, _SHORT.maxlong = 3, 80, 80, 40


class UnreadableFile(ValueError):
    """The file cannot be read at all (missing, a folder, no permission); the message names it."""


def show(value: Any) -> str:
    """A repr of `value` of at most a few lines' length, whatever its size or depth."""
    return _SHORT.repr(value)


def is_finite_number(value: Any) -> bool:
    """A finite number, not a bool (a JSON integer too large for a float is not one)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        return False
    try:
        return math.isfinite(value)
    except OverflowError:
        return False


def depth(value: Any) -> int:
    """Nesting depth of lists / dicts (a scalar is 0), counted without recursion, up to MAX_DEPTH + 1."""
    level, n = [value], 0
    while n <= MAX_DEPTH:
        level = [v for v in level if isinstance(v, (list, dict))]
        if not level:
            break
        n += 1
        level = [c for v in level for c in (v.values() if isinstance(v, dict) else v)]
    return n


def parse_line(raw: bytes) -> tuple[Any, str | None]:
    """(value, None) for a good JSON line, (None, problem) for a bad one."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        return None, f"not UTF-8: byte 0x{raw[e.start]:02x} at byte {e.start + 1} of the line"
    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        return None, f"invalid JSON: {e.msg} at column {e.colno}"
    except RecursionError:
        return None, f"invalid JSON: nested deeper than {MAX_DEPTH} levels"
    except ValueError as e:  # an integer of more than 4300 digits; drop Python's advice after ';'
        return None, f"invalid JSON: {str(e).split(';')[0]}"
    if depth(value) > MAX_DEPTH:
        return None, f"invalid JSON: nested deeper than {MAX_DEPTH} levels"
    return value, None


def read_lines(path: str) -> Iterator[tuple[int, Any, str | None]]:
    """(1-based line number, value or None, problem or None) of every non-blank line of `path`.

    A UTF-8 byte-order mark at the start of the file is ignored. Raises UnreadableFile when the
    file cannot be opened or read.
    """
    try:
        with open(path, "rb") as f:
            for number, raw in enumerate(f, 1):
                if number == 1 and raw.startswith(codecs.BOM_UTF8):
                    raw = raw[len(codecs.BOM_UTF8):]
                if raw.strip():  # without its line ending, so that a column in a message is right
                    yield number, *parse_line(raw.rstrip(b"\r\n"))
    except OSError as e:
        raise UnreadableFile(f"{path}: cannot read: {e.strerror or e}") from e


def print_line(text: str, file: TextIO | None = None) -> None:
    """Prints `text`, escaping what the stream cannot encode (lone surrogates from JSON escapes)."""
    file = file or sys.stdout
    encoding = getattr(file, "encoding", None) or "utf-8"
    print(text.encode(encoding, "backslashreplace").decode(encoding), file=file)
