"""Errors raised by the ADQL translator.

Every rejection is an `AdqlError` (a `ValueError`) with a message meant for the person who wrote the query:
the TAP service returns it verbatim in an error VOTable. Errors that can be tied to a place in the query
carry a 1-based `line` and `column`, so clients can point at the offending token.
"""

from __future__ import annotations


class AdqlError(ValueError):
    """Base class: the query was rejected. `line`/`column` are 1-based, or None when not applicable."""

    def __init__(self, message: str, line: int | None = None, column: int | None = None) -> None:
        self.message = message
        self.line = line
        self.column = column
        where = f" (line {line}, column {column})" if line is not None and column is not None else ""
        super().__init__(f"{message}{where}")


class AdqlSyntaxError(AdqlError):
    """The text is not valid ADQL (or uses syntax of another SQL dialect)."""


class AdqlUnsupported(AdqlError):
    """Valid ADQL (or a recognisable construct) that this service does not implement or forbids."""


class AdqlTooComplex(AdqlUnsupported):
    """The query exceeds a size limit (length, nesting, list length): protects the service from
    pathological inputs that would exhaust the parser's stack or memory."""


class AdqlUnknownTable(AdqlError):
    """A table name that is not among the caller's visible tables."""


class AdqlUnknownColumn(AdqlError):
    """A column name that no table in scope provides (or that is ambiguous)."""


def position(text: str, offset: int) -> tuple[int, int]:
    """1-based (line, column) of character `offset` in `text`."""
    offset = max(0, min(offset, len(text)))
    line = text.count("\n", 0, offset) + 1
    start = text.rfind("\n", 0, offset) + 1
    return line, offset - start + 1
