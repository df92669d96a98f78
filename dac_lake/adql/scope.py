"""Name resolution: which table reference (or derived table) each identifier of the query denotes.

The translator re-qualifies every column with its source's alias and the registry's exact spelling, so the
generated SQL never depends on DuckDB's own resolution rules (which differ from ADQL's in places, e.g.
case-sensitivity of quoted names) and never sees the hidden `_healpix_29` column unless we add it.
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass, field

from .errors import AdqlUnknownColumn
from .model import TableMeta, TableRef


@dataclass
class Meta:
    """What we know about a value: VOTable datatype plus unit/UCD/description when it is a plain column."""

    datatype: str
    unit: str = ""
    ucd: str = ""
    description: str = ""


@dataclass
class Source:
    """Something in a FROM clause: a registry table reference, a CTE reference or a derived table."""

    alias: str | None
    qualifiers: set[str]  # casefolded qualifiers that denote this source in column references
    columns: list[tuple[str, Meta]]
    ref: TableRef | None = None
    table: TableMeta | None = None

    def find(self, name: str, quoted: bool) -> str | None:
        """Exact column name for `name` (case-insensitive; a quoted name prefers an exact-case match)."""
        hits = [c for c, _ in self.columns if c.casefold() == name.casefold()]
        if quoted:
            exact = [c for c in hits if c == name]
            if exact:
                return exact[0]
        return hits[0] if hits else None

    def meta(self, name: str) -> Meta:
        for c, m in self.columns:
            if c == name:
                return m
        raise KeyError(name)  # pragma: no cover


@dataclass
class Scope:
    """The sources of one SELECT, plus a link to the enclosing query for correlated references."""

    parent: Scope | None
    sources: list[Source] = field(default_factory=list)
    merged: dict[str, tuple[str, Meta, list[Source]]] = field(default_factory=dict)  # USING/NATURAL
    select_aliases: dict[str, Meta] = field(default_factory=dict)

    def by_qualifier(self, qualifier: str) -> Source | None:
        q = qualifier.casefold()
        for src in self.sources:
            if q in src.qualifiers:
                return src
        return None

    def visible_columns(self) -> list[str]:
        out = []
        scope: Scope | None = self
        while scope is not None:
            for src in scope.sources:
                prefix = f"{src.alias}." if src.alias else ""
                out.extend(prefix + c for c, _ in src.columns)
            scope = scope.parent
        return out


def near(name: str, candidates: list[str], n: int = 5) -> str:
    """' (did you mean: a, b?)' or '' — near matches for error messages."""
    folded = {c.casefold(): c for c in candidates}
    hits = difflib.get_close_matches(name.casefold(), list(folded), n=n, cutoff=0.6)
    if not hits:
        short = {c.rsplit(".", 1)[-1].casefold(): c for c in candidates}
        hits = [short[h] for h in difflib.get_close_matches(name.casefold(), list(short), n=n, cutoff=0.6)]
        return f" (did you mean: {', '.join(hits)}?)" if hits else ""
    return f" (did you mean: {', '.join(folded[h] for h in hits)}?)"


def unknown_column(name: str, scope: Scope, line: int | None, col: int | None) -> AdqlUnknownColumn:
    return AdqlUnknownColumn(f"unknown column '{name}'{near(name, scope.visible_columns())}", line, col)
