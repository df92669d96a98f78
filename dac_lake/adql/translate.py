"""ADQL -> DuckDB SQL: the translator proper.

The translation rebuilds the query tree node by node from an allow-list: every node type, function name
and clause the user wrote is either understood and re-emitted (with identifiers re-resolved against the
registry and quoted), or rejected. Nothing the user wrote is copied into the output as text; sqlglot's
DuckDB generator prints the rebuilt tree. A final check walks the rebuilt tree and verifies that it reads
only the planned relations and CTEs; the printed SQL is then parsed again by DuckDB itself, by the sandbox's
validator, which checks the same and more before anything runs (an earlier sqlglot re-parse here duplicated
that check and cost ~5 ms, a third of a translation).
"""

from __future__ import annotations

import bisect
import math
from dataclasses import dataclass

from sqlglot import exp

from . import functions as fx
from . import geom, sphere, sqlgeo
from .dialect import parse_adql
from .errors import (
    AdqlError,
    AdqlSyntaxError,
    AdqlTooComplex,
    AdqlUnknownColumn,
    AdqlUnknownTable,
    AdqlUnsupported,
)
from .geom import TE, GCircle, Geom, GPoint, GPolygon, Hint
from .model import CrossMatch, OutputColumn, Registry, TableMeta, TableRef, Translation, neighbour_order
from .scope import Meta, Scope, Source, near, unknown_column

RELATION_PREFIX = "__dac_t"
XMATCH_KEY_PREFIX = "__dac_x"
MAX_IN_ITEMS = 10_000
HEALPIX_COLUMN = "_healpix_29"
INT_TYPES = ("int8", "int16", "int32", "int64")
NUM_RANK = {"bool": 0, "int8": 1, "int16": 2, "int32": 3, "int64": 4, "float32": 5, "float64": 6}

CAST_TYPES = {
    exp.DataType.Type.SMALLINT: ("SMALLINT", "int16"),
    exp.DataType.Type.INT: ("INTEGER", "int32"),
    exp.DataType.Type.BIGINT: ("BIGINT", "int64"),
    exp.DataType.Type.FLOAT: ("REAL", "float32"),
    exp.DataType.Type.DOUBLE: ("DOUBLE", "float64"),
    exp.DataType.Type.CHAR: ("VARCHAR", "string"),
    exp.DataType.Type.VARCHAR: ("VARCHAR", "string"),
    exp.DataType.Type.TIMESTAMP: ("TIMESTAMP", "timestamp"),
}
COMPARISONS = {
    exp.EQ: exp.EQ,
    exp.NEQ: exp.NEQ,
    exp.GT: exp.GT,
    exp.GTE: exp.GTE,
    exp.LT: exp.LT,
    exp.LTE: exp.LTE,
}
ARITH = (exp.Add, exp.Sub, exp.Mul, exp.Div, exp.Mod)
BITWISE = (exp.BitwiseAnd, exp.BitwiseOr, exp.BitwiseXor)
CHAIN = (*ARITH, *BITWISE, exp.DPipe)
SELECT_ARGS = {
    "expressions",
    "from_",
    "joins",
    "where",
    "group",
    "having",
    "order",
    "limit",
    "offset",
    "distinct",
    "with_",
}
SETOP_ARGS = {"this", "expression", "distinct", "with_", "order", "limit", "offset", "by_name"}
REFPOS = {"GEOCENTER", "BARYCENTER", "HELIOCENTER", "TOPOCENTER", "UNKNOWNREFPOS", "LSR"}


@dataclass
class Ctx:
    """Where an expression sits: the clause (for error messages and aggregate checks)."""

    scope: Scope
    clause: str
    ctes: dict[str, list[tuple[str, Meta]]]
    allow_alias: bool = False


def translate(
    adql: str, registry: Registry, maxrec: int | None = None, neighbour_joins: bool = True
) -> Translation:
    """Translate one ADQL query into DuckDB SQL plus the plan the engine needs (see model.Translation).

    `neighbour_joins`: plan cross-matches of two catalog tables as an equi-join on HEALPix cells (the
    engine must then define the `CrossMatch.key` columns, see model.CrossMatch); False keeps the
    declination-band join, which needs nothing from the engine."""
    if maxrec is not None and maxrec < 0:
        raise AdqlError("MAXREC must be >= 0")
    tree = parse_adql(adql)
    try:
        return _Translator(adql, registry, neighbour_joins).run(tree, maxrec)
    except RecursionError:
        raise AdqlTooComplex("query nested too deeply") from None


class _Translator:
    def __init__(self, text: str, registry: Registry, neighbour_joins: bool = True) -> None:
        self.text = text
        self.neighbour_joins = neighbour_joins
        self.keyed: set[str] = set()  # relations already in a neighbour join (one each)
        self._pending_key: tuple[str, int, tuple[str, ...]] | None = None
        self.line_starts = [0] + [i + 1 for i, ch in enumerate(text) if ch == "\n"]
        self.tables = list(registry.tables())
        self.refs: list[TableRef] = []
        self.crossmatches: list[CrossMatch] = []
        self.cte_names: set[str] = set()

    # ---------------------------------------------------------------- entry

    def run(self, tree: exp.Expr, maxrec: int | None) -> Translation:
        if not isinstance(tree, (exp.Select, exp.SetOperation, exp.Subquery)):
            raise AdqlUnsupported(
                f"only SELECT queries are allowed, not {tree.key.upper()}", *self._loc(tree)
            )
        sql_tree, cols = self.query(tree, None, {}, top=True)
        if maxrec is not None:
            target = sql_tree.this if isinstance(sql_tree, exp.Subquery) else sql_tree
            cap = maxrec + 1
            lim = target.args.get("limit")
            top = int(lim.expression.name) if lim is not None else None
            target.set("limit", exp.Limit(expression=sqlgeo.num(cap if top is None else min(top, cap))))
        self._final_check(sql_tree)
        sql = sql_tree.sql(dialect="duckdb", comments=False)
        columns = [OutputColumn(n, m.datatype, m.unit, m.ucd, m.description) for n, m in cols]
        return Translation(sql, self.refs, self.crossmatches, columns, maxrec)

    def _final_check(self, tree: exp.Expr) -> None:
        """Defence in depth: the output must be one query reading only planned relations and CTEs."""
        if not isinstance(tree, (exp.Select, exp.SetOperation, exp.Subquery)):
            raise AdqlError("internal error: generated SQL is not a single query")  # pragma: no cover
        allowed = {r.relation for r in self.refs} | self.cte_names
        for table in tree.find_all(exp.Table):
            if not isinstance(table.this, exp.Identifier) or table.name not in allowed or table.db:
                raise AdqlError(
                    f"internal error: generated SQL reads {table.sql('duckdb')}"
                )  # pragma: no cover

    def _loc(self, node: exp.Expr | None) -> tuple[int | None, int | None]:
        if node is None:
            return None, None
        for n in [node, *node.find_all(exp.Identifier, exp.Literal)]:
            start = n.meta.get("start") if n.meta else None
            if start is not None:
                line = bisect.bisect_right(self.line_starts, start)
                return line, start - self.line_starts[line - 1] + 1
        return None, None

    # ---------------------------------------------------------------- queries

    def query(self, node: exp.Expr, parent: Scope | None, ctes: dict, top: bool = False):
        """Translate a query expression; returns (tree, [(column name, Meta)])."""
        ctes = dict(ctes)
        with_out = None
        w = node.args.get("with_")
        if w is not None:
            if w.args.get("recursive"):
                raise AdqlUnsupported("recursive WITH is not part of ADQL", *self._loc(w))
            out_ctes = []
            for cte in w.expressions:
                name = cte.alias
                self._check_name(name, cte)
                body, cols = self.query(cte.this, parent, ctes)
                alias_cols = cte.args["alias"].columns if cte.args.get("alias") else []
                if alias_cols:
                    if len(alias_cols) != len(cols):
                        raise AdqlError(
                            f"WITH {name}: {len(alias_cols)} column names for {len(cols)} columns"
                        )
                    cols = [(c.name, m) for c, (_, m) in zip(alias_cols, cols, strict=True)]
                ctes[name.casefold()] = cols
                self.cte_names.add(name)
                out_ctes.append(
                    exp.CTE(
                        this=body,
                        alias=exp.TableAlias(
                            this=exp.to_identifier(name, quoted=True),
                            columns=[exp.to_identifier(c, quoted=True) for c, _ in cols]
                            if alias_cols
                            else None,
                        ),
                    )
                )
            with_out = exp.With(expressions=out_ctes)
        if isinstance(node, exp.Subquery):
            if node.alias:
                raise AdqlUnsupported("unexpected alias on a query", *self._loc(node))
            inner, cols = self.query(node.this, parent, ctes, top=top)
            out: exp.Expr = exp.Subquery(this=inner)
        elif isinstance(node, exp.Select):
            out, cols = self.select(node, parent, ctes, top)
        elif isinstance(node, exp.SetOperation):
            out, cols = self.setop(node, parent, ctes, top)
        else:
            raise AdqlUnsupported(f"{node.key.upper()} is not a query", *self._loc(node))
        if with_out is not None:
            out.set("with_", with_out)
        return out, cols

    def setop(self, node: exp.SetOperation, parent: Scope | None, ctes: dict, top: bool):
        self._check_args(node, SETOP_ARGS, "set operation")
        if node.args.get("by_name"):
            raise AdqlUnsupported("UNION BY NAME is not ADQL", *self._loc(node))
        left, lcols = self.query(node.this, parent, ctes, top=top)
        right, rcols = self.query(node.expression, parent, ctes)
        if len(lcols) != len(rcols):
            raise AdqlError(
                f"{node.key.upper()}: the two queries return {len(lcols)} and {len(rcols)} columns"
            )
        cls = type(node)
        out = cls(this=left, expression=right, distinct=bool(node.args.get("distinct")))
        names = {n.casefold(): m for n, m in lcols}
        if node.args.get("order"):
            ordered = []
            for o in node.args["order"].expressions:
                e = o.this
                if isinstance(e, exp.Literal) and not e.is_string:
                    pos = int(e.name)
                    if not 1 <= pos <= len(lcols):
                        raise AdqlError(f"ORDER BY position {pos} out of range", *self._loc(e))
                    t = exp.Literal.number(pos)
                elif isinstance(e, exp.Column) and not e.table and e.name.casefold() in names:
                    t = exp.column(exp.to_identifier(self._out_name(lcols, e.name), quoted=True))
                else:
                    raise AdqlUnsupported(
                        "ORDER BY of a set operation may only name output columns or positions", *self._loc(e)
                    )
                ordered.append(exp.Ordered(this=t, desc=bool(o.args.get("desc"))))
            out.set("order", exp.Order(expressions=ordered))
        self._limit_offset(node, out)
        return out, lcols

    @staticmethod
    def _out_name(cols, name: str) -> str:
        for n, _ in cols:
            if n.casefold() == name.casefold():
                return n
        return name  # pragma: no cover

    def _limit_offset(self, node: exp.Expr, out: exp.Expr) -> None:
        for key in ("limit", "offset"):
            arg = node.args.get(key)
            if arg is None:
                continue
            if (
                isinstance(arg, exp.Fetch)
                or not isinstance(arg.expression, exp.Literal)
                or arg.expression.is_string
            ):
                raise AdqlUnsupported(
                    f"{'TOP' if key == 'limit' else 'OFFSET'} needs an unsigned integer", *self._loc(arg)
                )
            text = arg.expression.name
            if not text.isdigit():
                raise AdqlError(
                    f"{'TOP' if key == 'limit' else 'OFFSET'} needs an unsigned integer, not {text}",
                    *self._loc(arg),
                )
            cls = exp.Limit if key == "limit" else exp.Offset
            out.set(key, cls(expression=exp.Literal.number(int(text))))

    def _check_args(self, node: exp.Expr, allowed: set[str], what: str) -> None:
        for key, value in node.args.items():
            if key not in allowed and value not in (None, False, [], ""):
                raise AdqlUnsupported(f"{key.upper()} in a {what} is not ADQL", *self._loc(node))

    def _check_name(self, name: str, node: exp.Expr) -> None:
        if name.casefold().startswith("__dac_") or name.casefold() == HEALPIX_COLUMN:
            raise AdqlUnsupported(f"the name '{name}' is reserved", *self._loc(node))

    # ---------------------------------------------------------------- SELECT

    def select(self, node: exp.Select, parent: Scope | None, ctes: dict, top: bool):
        self._check_args(node, SELECT_ARGS, "SELECT")
        scope = Scope(parent=parent)
        out = exp.Select()
        distinct = node.args.get("distinct")
        if distinct is not None:
            if distinct.args.get("on"):
                raise AdqlUnsupported("DISTINCT ON is not ADQL", *self._loc(node))
            out.set("distinct", exp.Distinct())
        from_ = node.args.get("from_")
        if from_ is not None:
            out.set("from_", exp.From(this=self.from_item(from_.this, scope, ctes)))
            joins = [self.join(j, scope, ctes) for j in node.args.get("joins") or []]
            if joins:
                out.set("joins", joins)
        elif node.args.get("joins"):  # pragma: no cover
            raise AdqlUnsupported("JOIN without FROM", *self._loc(node))
        ctx = Ctx(scope, "where", ctes)
        if node.args.get("where"):
            out.set(
                "where", exp.Where(this=self.condition(node.args["where"].this, ctx, list(scope.sources)))
            )
        # select list
        ctx = Ctx(scope, "select", ctes)
        items: list[tuple[exp.Expr, str, Meta, bool]] = []  # (sql, name, meta, explicit)
        for i, proj in enumerate(node.expressions, start=1):
            items.extend(self.projection(proj, ctx, i))
        names = self._dedupe([n for _, n, _, _ in items])
        cols = []
        projections = []
        for (sql, _, meta, _), name in zip(items, names, strict=True):
            projections.append(exp.Alias(this=sql, alias=exp.to_identifier(name, quoted=True)))
            cols.append((name, meta))
        out.set("expressions", projections)
        scope.select_aliases = {n.casefold(): m for n, m in cols}
        if node.args.get("group"):
            g = node.args["group"]
            self._check_args(g, {"expressions"}, "GROUP BY")
            gctx = Ctx(scope, "group", ctes, allow_alias=True)
            out.set("group", exp.Group(expressions=[self.scalar(e, gctx).sql for e in g.expressions]))
        if node.args.get("having"):
            hctx = Ctx(scope, "having", ctes, allow_alias=True)
            out.set("having", exp.Having(this=self.condition(node.args["having"].this, hctx, [])))
        if node.args.get("order"):
            octx = Ctx(scope, "order", ctes, allow_alias=True)
            ordered = []
            for o in node.args["order"].expressions:
                e = o.this
                if isinstance(e, exp.Literal) and not e.is_string:
                    if not e.name.isdigit() or not 1 <= int(e.name) <= len(cols):
                        raise AdqlError(f"ORDER BY position {e.name} out of range", *self._loc(e))
                    t = exp.Literal.number(int(e.name))
                elif isinstance(e, exp.Column) and not e.table and e.name.casefold() in scope.select_aliases:
                    t = exp.column(exp.to_identifier(self._out_name(cols, e.name), quoted=True))
                else:
                    t = self.scalar(e, octx).sql
                ordered.append(exp.Ordered(this=t, desc=bool(o.args.get("desc"))))
            out.set("order", exp.Order(expressions=ordered))
        self._limit_offset(node, out)
        return out, cols

    @staticmethod
    def _dedupe(names: list[str]) -> list[str]:
        seen: set[str] = set()
        out = []
        for n in names:
            cand, k = n, 1
            while cand.casefold() in seen:
                k += 1
                cand = f"{n}_{k}"
            seen.add(cand.casefold())
            out.append(cand)
        return out

    def projection(self, proj: exp.Expr, ctx: Ctx, index: int) -> list[tuple[exp.Expr, str, Meta, bool]]:
        scope = ctx.scope
        star = proj if isinstance(proj, exp.Star) else proj.this if isinstance(proj, exp.Column) else None
        if isinstance(star, exp.Star) and any(v for v in star.args.values()):
            raise AdqlUnsupported("EXCLUDE/REPLACE/RENAME after '*' is not ADQL", *self._loc(proj))
        if isinstance(proj, exp.Star):
            return self._star(scope, None, proj)
        if isinstance(proj, exp.Column) and isinstance(proj.this, exp.Star):
            qual = ".".join(p.name for p in proj.parts[:-1])
            src = scope.by_qualifier(qual) or scope.by_qualifier(proj.table)
            if src is None:
                raise AdqlUnknownTable(f"unknown table '{qual}' in '{qual}.*'", *self._loc(proj))
            return self._star(scope, src, proj)
        if isinstance(proj, exp.Alias):
            name = proj.alias
            self._check_name(name, proj)
            value = self.scalar(proj.this, ctx)
            return [(value.sql, name, value.meta, True)]
        value = self.scalar(proj, ctx)
        if value.origin is not None:
            name = value.origin[1]
        elif isinstance(proj, exp.Column):
            name = proj.name
        elif isinstance(proj, (exp.Anonymous, exp.Cast)):
            name = (proj.name if isinstance(proj, exp.Anonymous) else "cast").lower()
        else:
            name = f"col{index}"
        return [(value.sql, name, value.meta, False)]

    def _star(self, scope: Scope, only: Source | None, node: exp.Expr):
        out = []
        if only is None:
            for key, (name, meta, _) in scope.merged.items():
                del key
                out.append((exp.column(exp.to_identifier(name, quoted=True)), name, meta, False))
        if not scope.sources:
            raise AdqlError("SELECT * needs a FROM clause", *self._loc(node))
        for src in [only] if only is not None else scope.sources:
            for cname, meta in src.columns:
                if only is None and any(
                    cname.casefold() == k and src in parts for k, (_, _, parts) in scope.merged.items()
                ):
                    continue
                out.append((self._colref(src, cname), cname, meta, False))
        return out

    @staticmethod
    def _colref(src: Source, name: str) -> exp.Expr:
        ident = exp.to_identifier(name, quoted=True)
        if src.alias is None:
            return exp.column(ident)
        return exp.column(ident, table=exp.to_identifier(src.alias, quoted=True))

    # ---------------------------------------------------------------- FROM

    def from_item(self, item: exp.Expr, scope: Scope, ctes: dict) -> exp.Expr:
        if isinstance(item, exp.Table):
            self._check_args(item, {"this", "db", "catalog", "alias", "joins"}, "table reference")
            if not isinstance(item.this, exp.Identifier):
                what = item.this.sql() if isinstance(item.this, exp.Expr) else str(item.this)
                raise AdqlUnsupported(
                    f"table functions are not ADQL: {what[:60]}; only catalog tables may appear in FROM",
                    *self._loc(item),
                )
            out = self._table(item, scope, ctes)
            if item.args.get("joins"):
                out.set("joins", [self.join(j, scope, ctes) for j in item.args["joins"]])
            return out
        if isinstance(item, exp.Subquery):
            self._check_args(item, {"this", "alias"}, "derived table")
            inner = item.this
            if isinstance(inner, exp.Table):  # parenthesised join
                if item.alias:
                    raise AdqlUnsupported(
                        "an alias on a parenthesised join is not supported", *self._loc(item)
                    )
                return exp.Subquery(this=self.from_item(inner, scope, ctes))
            body, cols = self.query(inner, scope.parent, ctes)
            alias = item.args.get("alias")
            name = alias.name if alias is not None and alias.name else None
            if name:
                self._check_name(name, item)
            if alias is not None and alias.columns:
                if len(alias.columns) != len(cols):
                    raise AdqlError(f"{name}: {len(alias.columns)} column names for {len(cols)} columns")
                cols = [(c.name, m) for c, (_, m) in zip(alias.columns, cols, strict=True)]
            self._add_source(scope, Source(name, {name.casefold()} if name else set(), cols), item)
            out_alias = None
            if name:
                out_alias = exp.TableAlias(
                    this=exp.to_identifier(name, quoted=True),
                    columns=[exp.to_identifier(c, quoted=True) for c, _ in cols] if alias.columns else None,
                )
            return exp.Subquery(this=body, alias=out_alias)
        raise AdqlUnsupported(f"{item.key.upper()} is not allowed in FROM", *self._loc(item))

    def _add_source(self, scope: Scope, src: Source, node: exp.Expr) -> None:
        for other in scope.sources:
            if src.alias and other.alias and src.alias.casefold() == other.alias.casefold():
                raise AdqlError(
                    f"the name '{src.alias}' is used for two tables in FROM: give one of them an alias",
                    *self._loc(node),
                )
        scope.sources.append(src)

    def _table(self, item: exp.Table, scope: Scope, ctes: dict) -> exp.Expr:
        name, schema, catalog = item.name, item.db, item.catalog
        alias = item.alias or None
        if catalog:
            raise AdqlUnknownTable(f"unknown table '{catalog}.{schema}.{name}'", *self._loc(item))
        if alias:
            self._check_name(alias, item)
        if not schema and name.casefold() in ctes:
            cols = ctes[name.casefold()]
            cte_name = next(c for c in self.cte_names if c.casefold() == name.casefold())
            src_alias = alias or cte_name
            self._add_source(scope, Source(src_alias, {src_alias.casefold()}, list(cols)), item)
            return exp.Table(
                this=exp.to_identifier(cte_name, quoted=True),
                alias=exp.TableAlias(this=exp.to_identifier(src_alias, quoted=True)) if alias else None,
            )
        table = self._lookup_table(schema, name, item)
        relation = f"{RELATION_PREFIX}{len(self.refs)}"
        ref = TableRef(relation=relation, table=table, alias=alias)
        src_alias = alias or table.name
        quals = (
            {src_alias.casefold()}
            if alias
            else {table.name.casefold(), f"{table.schema}.{table.name}".casefold()}
        )
        cols = [(c.name, Meta(c.datatype, c.unit, c.ucd, c.description)) for c in table.columns]
        self._add_source(scope, Source(src_alias, quals, cols, ref=ref, table=table), item)
        self.refs.append(ref)
        return exp.Table(
            this=exp.to_identifier(relation, quoted=True),
            alias=exp.TableAlias(this=exp.to_identifier(src_alias, quoted=True)),
        )

    def _lookup_table(self, schema: str, name: str, node: exp.Expr) -> TableMeta:
        def fold(s: str) -> str:
            return s.casefold()

        if schema:
            hits = [t for t in self.tables if fold(t.schema) == fold(schema) and fold(t.name) == fold(name)]
        else:
            hits = [t for t in self.tables if fold(t.name) == fold(name)]
        if len(hits) == 1:
            return hits[0]
        full = f"{schema}.{name}" if schema else name
        if len(hits) > 1:
            options = ", ".join(f"{t.schema}.{t.name}" for t in hits)
            raise AdqlUnknownTable(
                f"table name '{full}' is ambiguous: use one of {options}", *self._loc(node)
            )
        known = [f"{t.schema}.{t.name}" for t in self.tables]
        raise AdqlUnknownTable(f"unknown table '{full}'{near(full, known)}", *self._loc(node))

    def join(self, join: exp.Join, scope: Scope, ctes: dict) -> exp.Join:
        self._check_args(join, {"this", "on", "using", "kind", "side", "method"}, "JOIN")
        method = (join.args.get("method") or "").upper()
        kind = (join.args.get("kind") or "").upper()
        side = (join.args.get("side") or "").upper()
        if (
            method not in ("", "NATURAL")
            or kind not in ("", "INNER", "OUTER", "CROSS")
            or side not in ("", "LEFT", "RIGHT", "FULL")
        ):
            raise AdqlUnsupported(f"{method or kind or side} JOIN is not ADQL", *self._loc(join))
        before = list(scope.sources)
        right_tree = self.from_item(join.this, scope, ctes)
        right = [s for s in scope.sources if s not in before]
        out = exp.Join(this=right_tree)
        if side:
            out.set("side", side)
        if kind in ("OUTER", "INNER", "CROSS"):
            out.set("kind", kind)
        using: list[str] = []
        if method == "NATURAL":
            if join.args.get("on") or join.args.get("using"):
                raise AdqlError("NATURAL JOIN takes neither ON nor USING", *self._loc(join))
            left_names = self._column_names(before, scope)
            using = []
            for src in right:
                for c, _ in src.columns:
                    if c.casefold() in left_names and c.casefold() not in {u.casefold() for u in using}:
                        using.append(c)
        elif join.args.get("using"):
            using = [u.name for u in join.args["using"]]
        if using:
            ids = []
            for uname in using:
                left_src = self._using_side(uname, before, scope, join, "left")
                right_src = self._using_side(uname, right, None, join, "right")
                exact = left_src.find(uname, True) if left_src else scope.merged[uname.casefold()][0]
                meta = left_src.meta(exact) if left_src else scope.merged[uname.casefold()][1]
                parts = list(scope.merged.get(uname.casefold(), (exact, meta, []))[2])
                parts.extend([s for s in (left_src, right_src) if s is not None])
                scope.merged[uname.casefold()] = (exact, meta, parts)
                ids.append(exp.to_identifier(exact, quoted=True))
            out.set("using", ids)
        elif method == "NATURAL":
            if side:
                out.set("on", exp.Boolean(this=True))
            else:
                out.set("kind", "CROSS")
        if join.args.get("on") is not None:
            if side == "LEFT":
                eligible = right
            elif side == "RIGHT":
                eligible = before
            elif side == "FULL":
                eligible = []
            else:
                eligible = list(scope.sources)
            out.set("on", self.condition(join.args["on"], Ctx(scope, "on", ctes), eligible))
        elif not using and method != "NATURAL" and kind != "CROSS" and (side or kind == "INNER"):
            raise AdqlSyntaxError(f"{side or kind} JOIN needs ON or USING", *self._loc(join))
        return out

    @staticmethod
    def _column_names(sources: list[Source], scope: Scope | None) -> set[str]:
        names = {c.casefold() for s in sources for c, _ in s.columns}
        if scope is not None:
            names |= set(scope.merged)
        return names

    def _using_side(self, name: str, sources: list[Source], scope: Scope | None, node: exp.Expr, side: str):
        hits = [s for s in sources if s.find(name, False)]
        if scope is not None and name.casefold() in scope.merged:
            return None
        if len(hits) != 1:
            problem = "is ambiguous" if hits else "does not exist"
            raise AdqlUnknownColumn(f"join column '{name}' {problem} on the {side} side", *self._loc(node))
        return hits[0]

    # ---------------------------------------------------------------- conditions

    def condition(self, node: exp.Expr, ctx: Ctx, eligible: list[Source]) -> exp.Expr:
        """A search condition; top-level conjuncts are inspected for regions and cross-matches."""
        conjuncts: list[exp.Expr] = []
        stack = [node]
        while stack:
            n = stack.pop()
            if isinstance(n, exp.And):
                stack.append(n.expression)
                stack.append(n.this)
            elif isinstance(n, exp.Paren) and isinstance(n.this, exp.And):
                stack.append(n.this)
            else:
                conjuncts.append(n)
        out: list[exp.Expr] = []
        for c in conjuncts:
            sql, hint, band = self._conjunct(c, ctx)
            key = self._neighbour_key(hint, ctx.scope, eligible) if hint is not None else None
            if key is not None:
                out.append(key)  # the join key; the band below stays as a cheap filter before the distance
            if band is not None:
                out.append(band)
            out.append(sql)
            if hint is not None:
                self._record(hint, ctx.scope, eligible)
        result = exp.and_(*out, copy=False) if len(out) > 1 else out[0]
        return result

    def _neighbour_key(self, hint: Hint, scope: Scope, eligible: list[Source]) -> exp.Expr | None:
        """For a cross-match of two catalog tables: `a.key = b.key`, the equi-join on HEALPix cells that
        DuckDB then joins on instead of the declination band (model.CrossMatch says what the engine puts in
        the key columns). The band stays, as a filter: two comparisons that drop most candidate pairs of
        neighbouring cells before the haversine distance (1.1 s -> ~0.4 s of a 2M x 10M match).

        The engine joins one side (the "expanded" one) with a neighbour table, which repeats each of its
        rows once per neighbouring cell; the equality keeps exactly one copy per matching pair. That is
        only right where every row of the expanded side must satisfy this condition or be dropped: a
        WHERE conjunct or an inner join's ON, or the non-preserved side of an outer join (`eligible`); a
        preserved side would also keep its unmatched copies. A relation takes part in one neighbour join
        at most (several would multiply its copies); further cross-matches keep the band."""
        if not self.neighbour_joins or hint.other is None or hint.source is None or hint.radius is None:
            return None
        if hint.source not in scope.sources or hint.other not in scope.sources:
            return None
        a, b = hint.source.ref, hint.other.ref
        order = neighbour_order(hint.radius)
        if a is None or b is None or order is None or {a.relation, b.relation} & self.keyed:
            return None
        expandable = tuple(s.ref.relation for s in (hint.source, hint.other) if s in eligible and s.ref)
        if not expandable:
            return None
        key = f"{XMATCH_KEY_PREFIX}{len(self.crossmatches)}"
        self.keyed |= {a.relation, b.relation}
        self._pending_key = (key, order, expandable)
        return exp.EQ(
            this=self._colref(hint.source, key),
            expression=self._colref(hint.other, key),
        )

    def _record(self, hint: Hint, scope: Scope, eligible: list[Source]) -> None:
        if hint.other is not None and hint.source is not None and hint.radius is not None:
            pending, self._pending_key = self._pending_key, None
            if hint.source in scope.sources and hint.other in scope.sources:
                a, b = hint.source.ref, hint.other.ref
                if a is not None and b is not None:
                    filtered = tuple(
                        s.ref.relation for s in (hint.source, hint.other) if s in eligible and s.ref
                    )
                    cm = CrossMatch(a.relation, b.relation, hint.radius, expandable=filtered)
                    if pending is not None:
                        cm.key, cm.order, cm.expandable = pending
                    self.crossmatches.append(cm)
            return
        src = hint.source
        if src is not None and hint.region is not None and src in eligible and src.ref is not None:
            src.ref.regions.append(hint.region)

    def _conjunct(self, node: exp.Expr, ctx: Ctx) -> tuple[exp.Expr, Hint | None, exp.Expr | None]:
        # 1 = CONTAINS(...), CONTAINS(...) = 1, and the same for INTERSECTS
        if isinstance(node, exp.EQ):
            for fn, lit in ((node.this, node.expression), (node.expression, node.this)):
                if self._is_pred_call(fn) and self._int_literal(lit) in (0, 1):
                    sql, hint = self._predicate(fn, ctx)
                    if self._int_literal(lit) == 1:
                        return sql, hint, None
                    return exp.Not(this=exp.Paren(this=sql)), None, None
        # DISTANCE(p, q) < r  (or <=, or r > DISTANCE(...))
        if isinstance(node, (exp.LT, exp.LTE, exp.GT, exp.GTE)):
            fn, lim = (
                (node.this, node.expression)
                if isinstance(node, (exp.LT, exp.LTE))
                else (node.expression, node.this)
            )
            if isinstance(fn, exp.Anonymous) and str(fn.name).upper() == "DISTANCE":
                points = self._distance_points(fn, ctx)
                limit = self.scalar(lim, ctx)
                sql = self.scalar(node, ctx).sql
                if limit.const is not None and limit.const >= 0:
                    band, hint = geom.distance_parts(points[0], points[1], limit.const)
                    return sql, hint, band
                return sql, None, None
        return self.boolean(node, ctx).sql, None, None

    @staticmethod
    def _is_pred_call(node: exp.Expr) -> bool:
        return isinstance(node, exp.Anonymous) and str(node.name).upper() in ("CONTAINS", "INTERSECTS")

    @staticmethod
    def _int_literal(node: exp.Expr) -> int | None:
        if isinstance(node, exp.Literal) and not node.is_string and node.name.isdigit():
            return int(node.name)
        return None

    # ---------------------------------------------------------------- expressions

    def boolean(self, node: exp.Expr, ctx: Ctx) -> TE:
        return self.scalar(node, ctx)

    def scalar(self, node: exp.Expr, ctx: Ctx) -> TE:
        value = self.expr(node, ctx)
        if not isinstance(value, TE):
            raise AdqlUnsupported(
                "geometry values (POINT, CIRCLE, BOX, POLYGON) cannot be returned or compared; use them in "
                "CONTAINS, INTERSECTS, DISTANCE, AREA, COORD1/COORD2",
                *self._loc(node),
            )
        return value

    def expr(self, node: exp.Expr, ctx: Ctx) -> TE | Geom:
        if isinstance(node, CHAIN):
            return self._chain(node, ctx)
        if isinstance(node, exp.Paren):
            inner = self.expr(node.this, ctx)
            if isinstance(inner, TE):
                return TE(exp.Paren(this=inner.sql), inner.meta, inner.const, inner.origin)
            return inner
        if isinstance(node, exp.Literal):
            return self._literal(node)
        if isinstance(node, exp.HexString):
            value = int(node.this, 16)
            if value >= 2**63:
                raise AdqlError(
                    f"hexadecimal literal 0x{node.this} does not fit in a BIGINT", *self._loc(node)
                )
            return TE(sqlgeo.num(value), Meta("int64"), float(value))
        if isinstance(node, exp.Boolean):
            return TE(exp.Boolean(this=bool(node.this)), Meta("bool"))
        if isinstance(node, exp.Null):
            return TE(exp.Null(), Meta("string"))
        if isinstance(node, exp.Column):
            return self.column(node, ctx)
        if isinstance(node, exp.Neg):
            v = self.scalar(node.this, ctx)
            self._numeric(v, node)
            return TE(exp.Neg(this=exp.Paren(this=v.sql)), v.meta, -v.const if v.const is not None else None)
        if isinstance(node, exp.BitwiseNot):
            v = self.scalar(node.this, ctx)
            self._integer(v, node)
            return TE(exp.BitwiseNot(this=exp.Paren(this=v.sql)), v.meta)
        if isinstance(node, exp.Not):
            v = self.scalar(node.this, ctx)
            return TE(exp.Not(this=exp.Paren(this=v.sql)), Meta("bool"))
        if isinstance(node, (exp.And, exp.Or)):
            return self._connector(node, ctx)
        if type(node) in COMPARISONS:
            return self._comparison(node, ctx)
        if isinstance(node, exp.Between):
            if node.args.get("symmetric"):
                raise AdqlUnsupported("BETWEEN SYMMETRIC is not ADQL", *self._loc(node))
            a, lo, hi = (self.scalar(node.args[k], ctx) for k in ("this", "low", "high"))
            return TE(exp.Between(this=a.sql, low=lo.sql, high=hi.sql), Meta("bool"))
        if isinstance(node, exp.In):
            return self._in(node, ctx)
        if isinstance(node, exp.Exists):
            body, _ = self.query(node.this, ctx.scope, ctx.ctes)
            return TE(exp.Exists(this=body), Meta("bool"))
        if isinstance(node, exp.Subquery):
            body, cols = self.query(node, ctx.scope, ctx.ctes)
            if len(cols) != 1:
                raise AdqlError(
                    f"a scalar subquery must return one column, not {len(cols)}", *self._loc(node)
                )
            return TE(body, cols[0][1])
        if isinstance(node, (exp.Like, exp.ILike)):
            a, b = self.scalar(node.this, ctx), self.scalar(node.expression, ctx)
            cls = type(node)
            sql = cls(this=exp.Paren(this=a.sql), expression=exp.Paren(this=b.sql))
            if node.args.get("negate"):
                sql = exp.Not(this=exp.Paren(this=sql))
            return TE(sql, Meta("bool"))
        if isinstance(node, exp.Is):
            a = self.scalar(node.this, ctx)
            rhs = node.expression
            if not isinstance(rhs, (exp.Null, exp.Boolean)):
                raise AdqlUnsupported("IS is only allowed with NULL, TRUE or FALSE", *self._loc(node))
            return TE(exp.Is(this=exp.Paren(this=a.sql), expression=rhs.copy()), Meta("bool"))
        if isinstance(node, exp.Case):
            return self._case(node, ctx)
        if isinstance(node, exp.Cast):
            return self._cast(node, ctx)
        if isinstance(node, exp.Anonymous):
            return self.function(node, ctx)
        if isinstance(node, exp.Star):
            raise AdqlError("'*' is only allowed in SELECT * and COUNT(*)", *self._loc(node))
        raise AdqlUnsupported(f"{node.key.upper()} is not supported in ADQL", *self._loc(node))

    def _literal(self, node: exp.Literal) -> TE:
        if node.is_string:
            return TE(exp.Literal.string(node.this), Meta("string"))
        text = node.this
        try:
            if text.isdigit():
                value = int(text)
                if value >= 2**63:
                    raise AdqlError(f"integer literal {text} is too large", *self._loc(node))
                return TE(
                    exp.Literal.number(value), Meta("int32" if value < 2**31 else "int64"), float(value)
                )
            fvalue = float(text)
        except ValueError:
            raise AdqlError(f"invalid number {text}", *self._loc(node)) from None
        if not math.isfinite(fvalue):
            raise AdqlError(f"number {text} out of range", *self._loc(node))
        return TE(sqlgeo.num(fvalue), Meta("float64"), fvalue)

    def _numeric(self, v: TE, node: exp.Expr) -> None:
        if v.meta.datatype in ("string", "timestamp"):
            raise AdqlError(f"a number is needed here, not a {v.meta.datatype}", *self._loc(node))

    def _integer(self, v: TE, node: exp.Expr) -> None:
        if v.meta.datatype not in INT_TYPES:
            raise AdqlError("bitwise operators need integer operands", *self._loc(node))

    def _chain(self, node: exp.Expr, ctx: Ctx) -> TE:
        """Left-deep chains of binary operators (a + b - c ...), iteratively: long chains must not
        exhaust the Python stack."""
        spine: list[exp.Expr] = []
        cur = node
        while isinstance(cur, CHAIN):
            spine.append(cur)
            cur = cur.this
        acc = self.scalar(cur, ctx)
        for op in reversed(spine):
            rhs = self.scalar(op.expression, ctx)
            acc = self._binary(op, acc, rhs)
        return acc

    def _binary(self, op: exp.Expr, a: TE, b: TE) -> TE:
        left, right = exp.Paren(this=a.sql), exp.Paren(this=b.sql)
        if isinstance(op, exp.DPipe):
            return TE(exp.DPipe(this=left, expression=right), Meta("string"))
        if isinstance(op, BITWISE):
            self._integer(a, op)
            self._integer(b, op)
            dtype = max(a.meta.datatype, b.meta.datatype, key=lambda t: NUM_RANK.get(t, 0))
            return TE(type(op)(this=left, expression=right), Meta(dtype))
        self._numeric(a, op)
        self._numeric(b, op)
        ta, tb = a.meta.datatype, b.meta.datatype
        both_int = ta in INT_TYPES and tb in INT_TYPES
        dtype = (
            max(ta, tb, key=lambda t: NUM_RANK.get(t, 6))
            if both_int
            else ("float32" if ta == tb == "float32" else "float64")
        )
        const = None
        if a.const is not None and b.const is not None:
            const = _fold(op, a.const, b.const, both_int)
        unit = a.meta.unit if isinstance(op, (exp.Add, exp.Sub)) and a.meta.unit == b.meta.unit else ""
        if isinstance(op, exp.Div) and both_int:
            sql: exp.Expr = exp.IntDiv(this=left, expression=right)
        else:
            sql = type(op)(this=left, expression=right)
        return TE(sql, Meta(dtype, unit), const)

    def _connector(self, node: exp.Expr, ctx: Ctx) -> TE:
        cls = type(node)
        parts: list[exp.Expr] = []
        stack = [node]
        while stack:
            n = stack.pop()
            if isinstance(n, cls):
                stack.append(n.expression)
                stack.append(n.this)
            else:
                parts.append(exp.Paren(this=self.scalar(n, ctx).sql))
        return TE(
            exp.and_(*parts, copy=False) if cls is exp.And else exp.or_(*parts, copy=False), Meta("bool")
        )

    def _comparison(self, node: exp.Expr, ctx: Ctx) -> TE:
        if isinstance(node, exp.EQ):
            for fn, lit in ((node.this, node.expression), (node.expression, node.this)):
                if self._is_pred_call(fn) and self._int_literal(lit) in (0, 1):
                    sql, _ = self._predicate(fn, ctx)
                    return TE(
                        sql if self._int_literal(lit) == 1 else exp.Not(this=exp.Paren(this=sql)),
                        Meta("bool"),
                    )
        a, b = self.scalar(node.this, ctx), self.scalar(node.expression, ctx)
        return TE(COMPARISONS[type(node)](this=a.sql, expression=b.sql), Meta("bool"))

    def _in(self, node: exp.In, ctx: Ctx) -> TE:
        self._check_args(node, {"this", "expressions", "query"}, "IN predicate")
        a = self.scalar(node.this, ctx)
        if node.args.get("query") is not None:
            body, cols = self.query(node.args["query"], ctx.scope, ctx.ctes)
            if len(cols) != 1:
                raise AdqlError(f"IN (subquery) must return one column, not {len(cols)}", *self._loc(node))
            return TE(
                exp.In(this=a.sql, query=body if isinstance(body, exp.Subquery) else exp.Subquery(this=body)),
                Meta("bool"),
            )
        items = node.expressions
        if len(items) > MAX_IN_ITEMS:
            raise AdqlTooComplex(f"IN list with {len(items)} values (limit {MAX_IN_ITEMS})", *self._loc(node))
        return TE(exp.In(this=a.sql, expressions=[self.scalar(i, ctx).sql for i in items]), Meta("bool"))

    def _case(self, node: exp.Case, ctx: Ctx) -> TE:
        subject = self.scalar(node.this, ctx).sql if node.args.get("this") is not None else None
        ifs, meta = [], None
        for branch in node.args.get("ifs") or []:
            cond = self.scalar(branch.this, ctx)
            val = self.scalar(branch.args["true"], ctx)
            meta = meta or val.meta
            ifs.append(exp.If(this=cond.sql, true=val.sql))
        default = None
        if node.args.get("default") is not None:
            d = self.scalar(node.args["default"], ctx)
            meta = meta or d.meta
            default = d.sql
        return TE(exp.Case(this=subject, ifs=ifs, default=default), Meta((meta or Meta("string")).datatype))

    def _cast(self, node: exp.Cast, ctx: Ctx) -> TE:
        to = node.args.get("to")
        if node.args.get("format") or node.args.get("safe") or not isinstance(to, exp.DataType):
            raise AdqlUnsupported("unsupported CAST", *self._loc(node))
        target = CAST_TYPES.get(to.this)
        if target is None:
            raise AdqlUnsupported(
                f"CAST to {to.sql()} is not supported; ADQL types are SMALLINT, INTEGER, BIGINT, REAL, "
                "DOUBLE PRECISION, CHAR(n), VARCHAR(n), TIMESTAMP",
                *self._loc(node),
            )
        v = self.scalar(node.this, ctx)
        return TE(exp.Cast(this=v.sql, to=exp.DataType.build(target[0], dialect="duckdb")), Meta(target[1]))

    # ---------------------------------------------------------------- columns

    def column(self, node: exp.Column, ctx: Ctx) -> TE:
        ident = node.this
        if isinstance(ident, exp.Star):
            raise AdqlError("'t.*' is only allowed in the SELECT list", *self._loc(node))
        name, quoted = ident.name, bool(ident.args.get("quoted"))
        parts = [p.name for p in node.parts[:-1]]
        loc = self._loc(node)
        if name.casefold() == HEALPIX_COLUMN:
            raise unknown_column(name, ctx.scope, *loc)
        if parts:
            qual = ".".join(parts)
            scope: Scope | None = ctx.scope
            while scope is not None:
                src = scope.by_qualifier(qual)
                if src is not None:
                    exact = src.find(name, quoted)
                    if exact is None:
                        cands = [f"{src.alias}.{c}" for c, _ in src.columns]
                        raise AdqlUnknownColumn(
                            f"table '{qual}' has no column '{name}'{near(qual + '.' + name, cands)}", *loc
                        )
                    return self._te(src, exact)
                scope = scope.parent
            aliases = [s.alias for s in _all_sources(ctx.scope) if s.alias]
            raise AdqlUnknownTable(
                f"unknown table '{qual}' in column reference '{qual}.{name}'{near(qual, aliases)}", *loc
            )
        if ctx.clause == "order" and name.casefold() in ctx.scope.select_aliases:
            return TE(
                exp.column(exp.to_identifier(name, quoted=True)), ctx.scope.select_aliases[name.casefold()]
            )
        scope = ctx.scope
        while scope is not None:
            if name.casefold() in scope.merged:
                exact, meta, _ = scope.merged[name.casefold()]
                others = [
                    s
                    for s in scope.sources
                    if s.find(name, quoted) and s not in scope.merged[name.casefold()][2]
                ]
                if not others:
                    return TE(exp.column(exp.to_identifier(exact, quoted=True)), meta)
            hits = [(s, s.find(name, quoted)) for s in scope.sources]
            hits = [(s, c) for s, c in hits if c is not None]
            if len(hits) > 1:
                options = ", ".join(f"{s.alias}.{c}" if s.alias else c for s, c in hits)
                raise AdqlUnknownColumn(f"column '{name}' is ambiguous: qualify it as one of {options}", *loc)
            if hits:
                return self._te(*hits[0])
            if ctx.allow_alias and scope is ctx.scope and name.casefold() in scope.select_aliases:
                return TE(
                    exp.column(exp.to_identifier(name, quoted=True)), scope.select_aliases[name.casefold()]
                )
            scope = scope.parent
        raise unknown_column(name, ctx.scope, *loc)

    def _te(self, src: Source, exact: str) -> TE:
        origin = (src, exact) if src.ref is not None else None
        return TE(self._colref(src, exact), src.meta(exact), None, origin)

    # ---------------------------------------------------------------- functions

    def function(self, node: exp.Anonymous, ctx: Ctx) -> TE | Geom:
        raw = node.this
        if isinstance(raw, exp.Identifier):
            raise AdqlUnsupported(f'quoted function names are not allowed: "{raw.name}"', *self._loc(node))
        name = str(raw).upper()
        args = list(node.expressions)
        loc = self._loc(node)
        if name in fx.AGGREGATES:
            return self._aggregate(name, args, node, ctx)
        if any(isinstance(a, exp.Distinct) for a in args):
            raise AdqlError(f"DISTINCT is only allowed in aggregate functions, not {name}", *loc)
        if name in fx.SCALAR:
            fn = fx.SCALAR[name]
            if not fn.min_args <= len(args) <= fn.max_args:
                raise AdqlError(
                    f"{name} takes {_arity(fn.min_args, fn.max_args)} argument(s), not {len(args)}", *loc
                )
            vals = [self.scalar(a, ctx) for a in args]
            if fn.result not in ("string", "first_meta"):
                for v, a in zip(vals, args, strict=True):
                    self._numeric(v, a)
            if name in ("LOWER", "UPPER"):
                for v, a in zip(vals, args, strict=True):
                    if v.meta.datatype != "string":
                        raise AdqlError(f"{name} needs a string argument", *self._loc(a))
            const = None
            if (vals and all(v.const is not None for v in vals)) or not vals:
                const = fx.const_eval(fn, [v.const for v in vals])  # type: ignore[misc]
            sql = exp.Anonymous(this=fn.duckdb, expressions=[v.sql for v in vals])
            if const is not None and name != "PI":
                sql = sqlgeo.num(const)
            if fn.result == "same":
                meta = Meta(vals[0].meta.datatype, vals[0].meta.unit)
            elif fn.result == "first_meta":
                meta = Meta(
                    vals[0].meta.datatype, vals[0].meta.unit, vals[0].meta.ucd, vals[0].meta.description
                )
            else:
                meta = Meta(fn.result)
            return TE(sql, meta, const)
        if name in ("ROUND", "TRUNCATE"):
            if not 1 <= len(args) <= 2:
                raise AdqlError(f"{name} takes 1 or 2 arguments, not {len(args)}", *loc)
            x = self.scalar(args[0], ctx)
            self._numeric(x, args[0])
            digits = 0
            if len(args) == 2:
                d = self.scalar(args[1], ctx)
                if d.const is None or d.const != int(d.const):
                    raise AdqlError(f"the second argument of {name} must be an integer constant", *loc)
                digits = int(d.const)
            meta = Meta("float64", x.meta.unit)
            if name == "ROUND":
                return TE(
                    exp.Anonymous(
                        this="ROUND",
                        expressions=[
                            x.sql,
                            exp.Literal.number(digits) if digits >= 0 else sqlgeo.num(digits),
                        ],
                    ),
                    meta,
                )
            return TE(
                sqlgeo.tpl("TRUNC(X * POWER(10e0, N)) / POWER(10e0, N)", X=x.sql, N=sqlgeo.num(digits)), meta
            )
        if name == "MOD":
            if len(args) != 2:
                raise AdqlError(f"MOD takes 2 arguments, not {len(args)}", *loc)
            a, b = self.scalar(args[0], ctx), self.scalar(args[1], ctx)
            return self._binary(exp.Mod(), a, b)
        if name == "RAND":
            if len(args) > 1:
                raise AdqlError("RAND takes at most one argument", *loc)
            return TE(exp.Anonymous(this="RANDOM", expressions=[]), Meta("float64"))
        if name == "IN_UNIT":
            return self._in_unit(args, node, ctx)
        if name == "IVO_HEALPIX_INDEX":
            return self._healpix(args, node, ctx)
        if name in fx.GEOMETRY:
            return self._geometry(name, args, node, ctx)
        raise AdqlUnsupported(
            f"unknown function {name}: not an ADQL function{near(name, fx.ALL_NAMES)}", *loc
        )

    def _aggregate(self, name: str, args: list[exp.Expr], node: exp.Expr, ctx: Ctx) -> TE:
        loc = self._loc(node)
        if ctx.clause in ("where", "on", "group"):
            raise AdqlError(f"aggregate function {name} is not allowed in {ctx.clause.upper()}", *loc)
        if len(args) != 1:
            raise AdqlError(f"{name} takes one argument", *loc)
        arg = args[0]
        cls = {"COUNT": exp.Count, "SUM": exp.Sum, "AVG": exp.Avg, "MIN": exp.Min, "MAX": exp.Max}[name]
        if isinstance(arg, exp.Star):
            if name != "COUNT":
                raise AdqlError(f"{name}(*) is not valid", *loc)
            return TE(exp.Count(this=exp.Star()), Meta("int64"))
        distinct = isinstance(arg, exp.Distinct)
        if distinct:
            if len(arg.expressions) != 1:
                raise AdqlError(f"{name}(DISTINCT ...) takes one expression", *loc)
            arg = arg.expressions[0]
        inner_ctx = Ctx(ctx.scope, "aggregate", ctx.ctes)
        v = self.scalar(arg, inner_ctx)
        if name in ("SUM", "AVG"):
            self._numeric(v, arg)
        inner = exp.Distinct(expressions=[v.sql]) if distinct else v.sql
        if name == "COUNT":
            meta = Meta("int64")
        elif name == "AVG":
            meta = Meta("float64", v.meta.unit, v.meta.ucd)
        elif name == "SUM":
            meta = Meta("int64" if v.meta.datatype in INT_TYPES else "float64", v.meta.unit, v.meta.ucd)
        else:
            meta = Meta(v.meta.datatype, v.meta.unit, v.meta.ucd, v.meta.description)
        return TE(cls(this=inner), meta)

    def _in_unit(self, args: list[exp.Expr], node: exp.Expr, ctx: Ctx) -> TE:
        loc = self._loc(node)
        if len(args) != 2 or not (isinstance(args[1], exp.Literal) and args[1].is_string):
            raise AdqlError(
                "IN_UNIT takes a value and a unit string literal, e.g. IN_UNIT(pmra, 'deg/yr')", *loc
            )
        v = self.scalar(args[0], ctx)
        self._numeric(v, args[0])
        target = args[1].this
        try:
            factor = fx.unit_factor(v.meta.unit, target)
        except AdqlError as err:
            raise AdqlError(err.message, *loc) from None
        sql = exp.Mul(this=exp.Paren(this=v.sql), expression=sqlgeo.num(factor))
        const = v.const * factor if v.const is not None else None
        return TE(sql, Meta("float64", target, v.meta.ucd, v.meta.description), const)

    def _healpix(self, args: list[exp.Expr], node: exp.Expr, ctx: Ctx) -> TE:
        loc = self._loc(node)
        if len(args) not in (2, 3):
            raise AdqlError("ivo_healpix_index takes (order, ra, dec) or (order, point)", *loc)
        order = self.scalar(args[0], ctx)
        if order.const is None or order.const != int(order.const) or not 0 <= order.const <= 29:
            raise AdqlError("the HEALPix order must be an integer constant between 0 and 29", *loc)
        k = int(order.const)
        if len(args) == 2:
            p = self.expr(args[1], ctx)
            if not isinstance(p, GPoint):
                raise AdqlError("ivo_healpix_index(order, point) needs a POINT", *loc)
        else:
            p = GPoint(self.scalar(args[1], ctx), self.scalar(args[2], ctx))
        src = p.source
        if src is not None:
            # the table's own position: the stored HATS index is exact and free
            col = self._colref(src, HEALPIX_COLUMN)
            return TE(
                exp.Paren(this=exp.BitwiseRightShift(this=col, expression=exp.Literal.number(2 * (29 - k)))),
                Meta("int64", "", "pos.healpix"),
            )
        return TE(sqlgeo.healpix_nested(k, p.ra.sql, p.dec.sql), Meta("int64", "", "pos.healpix"))

    # ---------------------------------------------------------------- geometry

    def _coordsys(self, args: list[exp.Expr], name: str) -> list[exp.Expr]:
        if args and isinstance(args[0], exp.Literal) and args[0].is_string:
            words = args[0].this.upper().split()
            if words and (words[0] not in ("ICRS", "J2000") or any(w not in REFPOS for w in words[1:])):
                raise AdqlUnsupported(
                    f"coordinate system '{args[0].this}' is not supported in {name}: only ICRS ('', 'ICRS', "
                    "'J2000') positions are available",
                    *self._loc(args[0]),
                )
            return args[1:]
        return args

    def _point_args(self, args: list[exp.Expr], ctx: Ctx, name: str, node: exp.Expr) -> tuple[GPoint, list]:
        """A centre given as POINT(...) or as two numbers; returns it and the remaining arguments."""
        if not args:
            raise AdqlError(f"{name}: missing arguments", *self._loc(node))
        first = self.expr(args[0], ctx)
        if isinstance(first, GPoint):
            return first, args[1:]
        if isinstance(first, (GCircle, GPolygon)):
            raise AdqlError(f"{name}: expected a position", *self._loc(args[0]))
        if len(args) < 2:
            raise AdqlError(f"{name}: missing arguments", *self._loc(node))
        second = self.scalar(args[1], ctx)
        self._numeric(first, args[0])
        self._numeric(second, args[1])
        return GPoint(first, second), args[2:]

    def _const(self, value: TE, what: str, node: exp.Expr) -> float:
        if value.const is None:
            raise AdqlUnsupported(f"{what} must be a constant", *self._loc(node))
        return value.const

    def _geom(self, node: exp.Expr, ctx: Ctx, name: str) -> Geom:
        g = self.expr(node, ctx)
        if isinstance(g, TE):
            raise AdqlError(f"{name} needs a geometry (POINT, CIRCLE, BOX or POLYGON) here", *self._loc(node))
        return g

    def _geometry(self, name: str, args: list[exp.Expr], node: exp.Expr, ctx: Ctx) -> TE | Geom:
        loc = self._loc(node)
        if name == "POINT":
            rest = self._coordsys(args, name)
            if len(rest) != 2:
                raise AdqlError(f"POINT takes 2 coordinates, not {len(rest)}", *loc)
            p, _ = self._point_args(rest, ctx, name, node)
            return p
        if name == "CIRCLE":
            rest = self._coordsys(args, name)
            center, rest = self._point_args(rest, ctx, name, node)
            if len(rest) != 1:
                raise AdqlError("CIRCLE takes a centre and a radius", *loc)
            radius = self.scalar(rest[0], ctx)
            self._numeric(radius, rest[0])
            geom.check_radius(radius.const)
            return GCircle(center, radius)
        if name == "BOX":
            rest = self._coordsys(args, name)
            center, rest = self._point_args(rest, ctx, name, node)
            if len(rest) != 2 or center.const is None:
                raise AdqlUnsupported("BOX takes a constant centre, width and height", *loc)
            w = self._const(self.scalar(rest[0], ctx), "BOX width", rest[0])
            h = self._const(self.scalar(rest[1], ctx), "BOX height", rest[1])
            try:
                return GPolygon(
                    sphere.SphPolygon.build(sphere.box_vertices(center.const[0], center.const[1], w, h))
                )
            except AdqlError as err:
                raise type(err)(err.message, *loc) from None
        if name == "POLYGON":
            rest = self._coordsys(args, name)
            vals = [self.expr(a, ctx) for a in rest]
            verts: list[tuple[float, float]] = []
            if vals and all(isinstance(v, GPoint) for v in vals):
                for v in vals:
                    c = v.const  # type: ignore[union-attr]
                    if c is None:
                        raise AdqlUnsupported("POLYGON vertices must be constants", *loc)
                    verts.append(c)
            elif all(isinstance(v, TE) for v in vals) and len(vals) % 2 == 0:
                consts = [v.const for v in vals]  # type: ignore[union-attr]
                if any(c is None for c in consts):
                    raise AdqlUnsupported("POLYGON vertices must be constants", *loc)
                verts = [(consts[i], consts[i + 1]) for i in range(0, len(consts), 2)]  # type: ignore[misc]
            else:
                raise AdqlError("POLYGON takes vertices as coordinate pairs or as POINTs (not mixed)", *loc)
            if len(verts) < 3:
                raise AdqlError("POLYGON needs at least 3 vertices", *loc)
            try:
                return GPolygon(sphere.SphPolygon.build(verts))
            except AdqlError as err:
                raise type(err)(err.message, *loc) from None
        if name == "REGION":
            raise AdqlUnsupported("REGION (STC-S strings) is not supported", *loc)
        if name == "CENTROID":
            if len(args) != 1:
                raise AdqlError("CENTROID takes one geometry", *loc)
            return geom.centroid(self._geom(args[0], ctx, name))
        if name in ("CONTAINS", "INTERSECTS"):
            sql, _ = self._predicate(node, ctx)
            return TE(exp.Cast(this=exp.Paren(this=sql), to=exp.DataType.build("INTEGER")), Meta("int32"))
        if name == "DISTANCE":
            p, q = self._distance_points(node, ctx)
            return geom.distance(p, q)
        if name == "AREA":
            if len(args) != 1:
                raise AdqlError("AREA takes one geometry", *loc)
            return geom.area(self._geom(args[0], ctx, name))
        if name in ("COORD1", "COORD2"):
            if len(args) != 1:
                raise AdqlError(f"{name} takes one POINT", *loc)
            p = self._geom(args[0], ctx, name)
            if not isinstance(p, GPoint):
                raise AdqlError(f"{name} takes a POINT", *loc)
            v = p.ra if name == "COORD1" else p.dec
            return TE(
                v.sql, Meta("float64", "deg", "pos.eq.ra" if name == "COORD1" else "pos.eq.dec"), v.const
            )
        if name == "COORDSYS":
            if len(args) != 1:
                raise AdqlError("COORDSYS takes one geometry", *loc)
            self._geom(args[0], ctx, name)
            return TE(exp.Literal.string("ICRS"), Meta("string"))
        raise AdqlUnsupported(f"{name} is not supported", *loc)  # pragma: no cover

    def _distance_points(self, node: exp.Expr, ctx: Ctx) -> tuple[GPoint, GPoint]:
        args = list(node.expressions)
        loc = self._loc(node)
        if len(args) == 4:
            vals = [self.scalar(a, ctx) for a in args]
            for v, a in zip(vals, args, strict=True):
                self._numeric(v, a)
            return GPoint(vals[0], vals[1]), GPoint(vals[2], vals[3])
        if len(args) != 2:
            raise AdqlError("DISTANCE takes two POINTs or four numbers", *loc)
        p, q = self.expr(args[0], ctx), self.expr(args[1], ctx)
        if not isinstance(p, GPoint) or not isinstance(q, GPoint):
            raise AdqlError("DISTANCE takes two POINTs or four numbers", *loc)
        return p, q

    def _predicate(self, node: exp.Anonymous, ctx: Ctx) -> tuple[exp.Expr, Hint | None]:
        name = str(node.name).upper()
        args = list(node.expressions)
        if len(args) != 2:
            raise AdqlError(f"{name} takes two geometries", *self._loc(node))
        a, b = self._geom(args[0], ctx, name), self._geom(args[1], ctx, name)
        sql, hint = geom.contains(a, b) if name == "CONTAINS" else geom.intersects(a, b)
        return exp.Paren(this=sql), hint


def _arity(lo: int, hi: int) -> str:
    return str(lo) if lo == hi else f"{lo} to {hi}"


def _fold(op: exp.Expr, a: float, b: float, both_int: bool) -> float | None:
    try:
        if isinstance(op, exp.Add):
            return a + b
        if isinstance(op, exp.Sub):
            return a - b
        if isinstance(op, exp.Mul):
            return a * b
        if isinstance(op, exp.Div):
            return float(math.trunc(a / b)) if both_int else a / b
        if isinstance(op, exp.Mod):
            return math.fmod(a, b)
    except (ZeroDivisionError, OverflowError, ValueError):
        return None
    return None


def _all_sources(scope: Scope | None) -> list[Source]:
    out = []
    while scope is not None:
        out.extend(scope.sources)
        scope = scope.parent
    return out
