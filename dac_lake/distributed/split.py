"""Split one DuckDB SELECT into a per-chunk *partial* query and a *final* query over the partials.

The engine runs a big query on a cluster by cutting ONE relation (the "partitioned" one) into disjoint
chunks of its rows; each task runs `partial_sql` with that relation holding one chunk and every other
relation holding all the rows that matter to it; the driver concatenates the task results into the
relation `PARTIALS` and runs `final_sql` over it. That only equals running the original SQL once if every
row of the original result depends on ONE row of the partitioned relation (row-local: plain rows, or
decomposable aggregates re-aggregated in the final step). Whatever this module cannot prove row-local it
refuses with `NotDistributable`, whose message is a sentence for the job log: the query then runs on one
machine, which is always correct.

How names bind matters and is DuckDB's: an unqualified name in GROUP BY, HAVING, in the SELECT list and in
an ORDER BY *expression* binds to a column of the FROM sources first and to a select alias only when no
source has it (a lateral alias in the SELECT list); a whole ORDER BY term that is a bare name binds to the
alias first. The schemas of the sources are unknown here, so the partial query evaluates group keys and
every non-aggregate piece of the output *in the original query's own context* (same FROM, same GROUP BY,
the original projections kept under their original aliases so lateral aliases resolve the same way); the
final query only re-aggregates and picks constant-per-group values with ANY_VALUE. No SQL text is spliced:
trees are rebuilt with sqlglot and printed with its DuckDB generator (ORDER BY always states NULLS
FIRST/LAST, so the partial, final and original orders agree whatever a worker's default_null_order is,
given the original is read with DuckDB's default, NULLS LAST).

Chunks: the driver runs at least one chunk (an empty chunk is fine). With zero chunks the partials relation
is empty and a query with aggregates but no GROUP BY would still give its one row (COUNT 0), but constant
non-aggregate pieces carried through ANY_VALUE would be NULL: hence >= 1 chunk is required.
"""

from __future__ import annotations

import functools
from collections.abc import Iterator
from dataclasses import dataclass

import duckdb
import sqlglot
from sqlglot import exp
from sqlglot.dialects.duckdb import DuckDB
from sqlglot.errors import ParseError

PARTIALS = "__dac_partials"
PREFIX = "__dac_"  # generated partial column names; output aliases may not start with it

TOP_ARGS = {"expressions", "from_", "joins", "where", "group", "having", "order", "limit", "offset",
            "distinct", "with_"}
ROW_LOCAL_ARGS = {"expressions", "from_", "joins", "where", "order", "with_"}
JOIN_ARGS = {"this", "on", "using", "side", "kind", "method"}
TABLE_ARGS = {"this", "alias", "joins"}
SUBQUERY_ARGS = {"this", "alias"}
ORDERED_ARGS = {"this", "desc", "nulls_first"}
CLAUSES = {"group": "GROUP BY", "order": "ORDER BY", "from_": "FROM", "with_": "WITH"}  # for messages
# aggregate wrappers/modifiers whose decomposition is not implemented
UNSUPPORTED_NODES = (exp.IgnoreNulls, exp.RespectNulls, exp.WithinGroup, exp.HavingMax, exp.Window)


@dataclass(frozen=True)
class SplitQuery:
    """The partial query (one run per chunk) and the final query over `PARTIALS` (their concatenation)."""

    partial_sql: str
    final_sql: str
    partial_columns: tuple[str, ...]  # exact, unique column names of partial_sql's result
    kind: str  # "rows" | "aggregate" | "distinct" - for logs
    early_stop_rows: int | None  # the final result is any this-many partial rows: stop gathering there


class NotDistributable(Exception):
    """Why this query must run on one machine (a sentence for the log/job progress)."""


class _Generator(DuckDB.Generator):
    """DuckDB's generator, but ORDER BY always says NULLS FIRST/LAST (sqlglot omits DuckDB's default)."""

    def ordered_sql(self, expression: exp.Ordered) -> str:
        this = self.sql(expression, "this")
        direction = "DESC" if expression.args.get("desc") else "ASC"
        nulls = "FIRST" if expression.args.get("nulls_first") else "LAST"
        return f"{this} {direction} NULLS {nulls}"


class _Dialect(DuckDB):
    Generator = _Generator


def _sql(node: exp.Expr) -> str:
    return node.sql(dialect=_Dialect)


@functools.cache
def _duckdb_aggregates() -> frozenset[str]:
    """Names DuckDB knows as aggregate functions: a function sqlglot does not know (Anonymous) may be one,
    and computing it per chunk would be wrong, so it must be recognised."""
    rows = duckdb.sql(
        "SELECT DISTINCT lower(function_name) FROM duckdb_functions() WHERE function_type = 'aggregate'"
    ).fetchall()
    return frozenset(r[0] for r in rows)


def _fname(node: exp.Expr) -> str:
    if isinstance(node, exp.Anonymous):
        return str(node.name).upper()
    try:
        return node.sql_name()
    except Exception:  # pragma: no cover - every Func has one; be safe for the log message
        return type(node).__name__.upper()


def _is_agg(node: exp.Expr) -> bool:
    if isinstance(node, exp.AggFunc):
        return True
    return isinstance(node, exp.Func) and _fname(node).lower() in _duckdb_aggregates()


def _outer(node: exp.Expr) -> Iterator[exp.Expr]:
    """The nodes of an expression that belong to this query level: subqueries are not entered."""
    stack = [node]
    while stack:
        n = stack.pop()
        yield n
        for child in n.iter_expressions():
            if not isinstance(child, exp.Query | exp.Subquery):
                stack.append(child)


def _has_agg(node: exp.Expr) -> bool:
    return any(_is_agg(n) for n in _outer(node))


def _needs_rows(node: exp.Expr) -> bool:
    """Whether an expression reads the rows (a column or a subquery), i.e. is not a constant."""
    return any(isinstance(n, exp.Column | exp.Query | exp.Subquery | exp.Exists) for n in node.walk())


def _norm(node: exp.Expr) -> str:
    """Comparison key: DuckDB identifiers are case-insensitive even when quoted."""
    c = node.copy()
    for ident in c.find_all(exp.Identifier):
        ident.set("this", str(ident.this).lower())
        ident.set("quoted", True)
    return _sql(c)


def _ident(name: str) -> exp.Identifier:
    return exp.to_identifier(name, quoted=True)


def _col(name: str) -> exp.Column:
    return exp.Column(this=_ident(name))


def _alias(node: exp.Expr, name: str) -> exp.Alias:
    return exp.Alias(this=node, alias=_ident(name))


def _check_args(node: exp.Expr, allowed: set[str], what: str) -> None:
    extra = sorted(
        CLAUSES.get(k, k.replace("_", " ").upper())
        for k, v in node.args.items()
        if v not in (None, [], False) and k not in allowed
    )
    if extra:
        raise NotDistributable(f"{what} uses {', '.join(extra)}, which the distributed planner cannot split")


def _int_literal(node: exp.Expr | None, what: str) -> int:
    if isinstance(node, exp.Literal) and not node.is_string and str(node.this).isdigit():
        return int(node.this)
    raise NotDistributable(f"{what} is not a plain non-negative integer")


# ---------------------------------------------------------------------------------------------------------
# where the partitioned relation is


class _Locator:
    """Checks that the single reference to the partitioned relation is row-local: in the FROM/JOIN tree of
    the top-level SELECT, through row-local derived tables only, never on a null-supplying join side."""

    def __init__(self, table: exp.Table, name: str) -> None:
        self.table = table
        self.name = name
        self.path: set[int] = set()
        node: exp.Expr | None = table
        while node is not None:
            self.path.add(id(node))
            node = node.parent

    def contains(self, node: exp.Expr) -> bool:
        return id(node) in self.path

    def select(self, sel: exp.Select, what: str) -> None:
        from_ = sel.args.get("from_")
        items = [from_, *(j.this for j in sel.args.get("joins") or [])] if from_ is not None else []
        if not any(self.contains(it) for it in items):
            raise NotDistributable(
                f"{self.name} is read inside a subquery or expression of {what}, not in its FROM clause: "
                "each task would see only part of it"
            )
        assert from_ is not None
        self.joined(from_.this, sel.args.get("joins") or [], base_self_only=False)

    def joined(self, base: exp.Expr, joins: list[exp.Join], base_self_only: bool) -> None:
        items = [base, *(j.this for j in joins)]
        hits = [i for i, it in enumerate(items) if (it is self.table if i == 0 and base_self_only
                                                     else self.contains(it))]
        if len(hits) != 1:
            raise NotDistributable(f"{self.name} is read in a join condition, not as a joined relation")
        k = hits[0]
        for i, j in enumerate(joins, start=1):
            _check_args(j, JOIN_ARGS, "a join")
            side = str(j.args.get("side") or "").upper()
            kind = str(j.args.get("kind") or "").upper()
            method = str(j.args.get("method") or "").upper()
            if method not in ("", "NATURAL") or kind not in ("", "INNER", "OUTER", "CROSS", "SEMI", "ANTI"):
                raise NotDistributable(f"{method or kind} JOIN is not distributable")
            if i == k and side in ("LEFT", "FULL"):
                raise NotDistributable(
                    f"{self.name} is on the null-supplying side of a {side} JOIN: a task would emit "
                    "unmatched rows of the other side that another task's chunk matches"
                )
            if i == k and kind in ("SEMI", "ANTI"):
                raise NotDistributable(f"{self.name} is the filtering side of a {kind} JOIN")
            if i > k and side in ("RIGHT", "FULL"):
                raise NotDistributable(
                    f"{self.name} is on the null-supplying side of a {side} JOIN: a task would emit "
                    "unmatched rows of the other side that another task's chunk matches"
                )
        self.item(items[k], nested_base=(k == 0 and base_self_only))

    def item(self, node: exp.Expr, nested_base: bool = False) -> None:
        if isinstance(node, exp.Table) and node.args.get("joins") and not nested_base:
            # the base of a parenthesised join `(b JOIN c ...)`: sqlglot hangs the joins on the first table
            self.joined(node, node.args["joins"], base_self_only=True)
            return
        if node is self.table:
            _check_args(node, TABLE_ARGS, f"the reference to {self.name}")
            if node.args.get("db") or node.args.get("catalog"):
                raise NotDistributable(f"{self.name} is referenced with a schema or catalog")
            return
        if isinstance(node, exp.Subquery):
            _check_args(node, SUBQUERY_ARGS, "a derived table")
            inner = node.this
            if isinstance(inner, exp.Select):
                _row_local(inner, self.name)
                self.select(inner, "a derived table")
                return
            if isinstance(inner, exp.Table | exp.Subquery):
                self.item(inner)
                return
            raise NotDistributable(f"{self.name} is read inside a {inner.key.upper()} in FROM")
        raise NotDistributable(f"{self.name} is read inside a {node.key.upper()} in FROM")


def _row_local(sel: exp.Select, name: str) -> None:
    """A derived table around the partitioned relation must keep each of its rows separate."""
    what = f"the derived table around {name}"
    _check_args(sel, ROW_LOCAL_ARGS, what)
    for e in sel.expressions:
        for n in _outer(e):
            if isinstance(n, exp.Window):
                raise NotDistributable(f"{what} uses a window function")
            if _is_agg(n):
                raise NotDistributable(f"{what} aggregates ({_fname(n)})")


def _locate(tree: exp.Select, name: str) -> None:
    key = name.lower()
    for cte in tree.find_all(exp.CTE):
        if cte.alias.lower() == key:
            raise NotDistributable(f"a WITH clause defines a query named {name}")
    refs = [
        t for t in tree.find_all(exp.Table) if isinstance(t.this, exp.Identifier) and t.name.lower() == key
    ]
    if not refs:
        raise NotDistributable(f"the query does not read {name}")
    if len(refs) > 1:
        raise NotDistributable(f"the query reads {name} {len(refs)} times (a self-join or subquery on it)")
    _Locator(refs[0], name).select(tree, "the query")


# ---------------------------------------------------------------------------------------------------------
# the three shapes


@dataclass
class _Out:
    name: str
    expr: exp.Expr


def _outputs(tree: exp.Select) -> list[_Out]:
    outs = []
    for p in tree.expressions:
        if isinstance(p, exp.Alias):
            outs.append(_Out(p.alias, p.this))
        elif isinstance(p, exp.Column) and not isinstance(p.this, exp.Star):
            outs.append(_Out(p.name, p))
        else:
            raise NotDistributable(f"the output column {_sql(p)} has no name (a star or unnamed expression)")
    seen: set[str] = set()
    for o in outs:
        low = o.name.lower()
        if low in seen:
            raise NotDistributable(f"two output columns are named {o.name}")
        if low.startswith(PREFIX):
            raise NotDistributable(f"the output column name {o.name} is reserved for the distributed planner")
        seen.add(low)
    return outs


def _limit_offset(tree: exp.Select) -> tuple[int | None, int]:
    limit = tree.args.get("limit")
    n = None
    if limit is not None:
        if not isinstance(limit, exp.Limit):
            raise NotDistributable("the row limit is not a plain LIMIT")
        _check_args(limit, {"expression"}, "LIMIT")
        n = _int_literal(limit.expression, "LIMIT")
    offset = tree.args.get("offset")
    m = 0
    if offset is not None:
        _check_args(offset, {"expression"}, "OFFSET")
        m = _int_literal(offset.expression, "OFFSET")
    return n, m


def _ordered(tree: exp.Select) -> list[exp.Ordered]:
    order = tree.args.get("order")
    if order is None:
        return []
    _check_args(order, {"expressions"}, "ORDER BY")
    for o in order.expressions:
        _check_args(o, ORDERED_ARGS, "an ORDER BY term")
    return list(order.expressions)


def _term_position(o: exp.Ordered, outs: list[_Out], by_expr: bool) -> int | None:
    """The output column a whole ORDER BY term denotes (DuckDB: a position, or a bare name is an alias
    first), or an identical projection expression when `by_expr`; None when it is another expression."""
    t = o.this
    if isinstance(t, exp.Literal):
        if t.is_string:
            raise NotDistributable("ORDER BY a string constant")
        p = _int_literal(t, "an ORDER BY position")
        if not 1 <= p <= len(outs):
            raise NotDistributable(f"ORDER BY position {p} is out of range")
        return p - 1
    if isinstance(t, exp.Column) and not t.table:
        for i, out in enumerate(outs):
            if out.name.lower() == t.name.lower():
                return i
    if by_expr:
        key = _norm(t)
        for i, out in enumerate(outs):
            if _norm(out.expr) == key:
                return i
    return None


def _ordered_by(this: exp.Expr, o: exp.Ordered) -> exp.Ordered:
    return exp.Ordered(this=this, desc=bool(o.args.get("desc")), nulls_first=bool(o.args.get("nulls_first")))


def _final_select(exprs: list[exp.Expr]) -> exp.Select:
    return exp.Select(expressions=exprs).from_(exp.Table(this=_ident(PARTIALS)))


def _set_limit(sel: exp.Select, limit: int | None, offset: int) -> None:
    sel.set("limit", exp.Limit(expression=exp.Literal.number(limit)) if limit is not None else None)
    sel.set("offset", exp.Offset(expression=exp.Literal.number(offset)) if offset else None)


def _split_rows(tree: exp.Select, outs: list[_Out], distinct: bool) -> SplitQuery:
    limit, offset = _limit_offset(tree)
    hidden: list[_Out] = []
    order: list[exp.Ordered] = []
    for o in _ordered(tree):
        i = _term_position(o, outs, by_expr=True)
        if i is None:
            if distinct:
                raise NotDistributable(
                    f"SELECT DISTINCT is ordered by {_sql(o.this)}, which is not an output column"
                )
            # evaluated in the partial's SELECT list: same binding as an ORDER BY expression (source
            # columns first, then the original aliases, which the partial keeps)
            hidden.append(_Out(f"{PREFIX}o{len(hidden)}", o.this))
            name = hidden[-1].name
        else:
            name = outs[i].name
        order.append(_ordered_by(_col(name), o))

    partial = tree.copy()
    partial.set("expressions", [_alias(o.expr.copy(), o.name) for o in (*outs, *hidden)])
    if order and limit is not None:  # a chunk's first limit+offset rows in the final order suffice
        partial.set("order", exp.Order(expressions=[o.copy() for o in order]))
    else:
        partial.set("order", None)
    _set_limit(partial, None if limit is None else limit + offset, 0)

    final = _final_select([_alias(_col(o.name), o.name) for o in outs])
    if distinct:
        final.set("distinct", exp.Distinct())
    if order:
        final.set("order", exp.Order(expressions=order))
    _set_limit(final, limit, offset)
    early = limit if limit is not None and not order and not offset and not distinct else None
    return SplitQuery(
        partial_sql=_sql(partial),
        final_sql=_sql(final),
        partial_columns=tuple(o.name for o in (*outs, *hidden)),
        kind="distinct" if distinct else "rows",
        early_stop_rows=early,
    )


class _Aggregates:
    """Builds the partial SELECT list of a two-phase aggregation and the final expressions over it."""

    def __init__(self, outs: list[_Out], group_names: set[str]) -> None:
        self.outs = outs
        self.group_names = group_names  # lower-cased names of GROUP BY terms that are bare columns
        self.items: list[exp.Alias] = []  # partial SELECT list
        self.pieces: dict[str, str] = {}  # normalized non-aggregate piece -> partial column
        self.aggs: dict[str, list[str]] = {}  # normalized aggregate -> partial columns

    def add(self, node: exp.Expr, name: str) -> str:
        self.items.append(_alias(node, name))
        return name

    def piece(self, node: exp.Expr) -> exp.Expr:
        """A non-aggregate subexpression that reads the rows: constant per group (the original query is
        only valid if so), evaluated in the partial, picked in the final."""
        key = _norm(node)
        if key not in self.pieces:
            self.pieces[key] = self.add(node.copy(), f"{PREFIX}p{len(self.pieces)}")
        return exp.AnyValue(this=_col(self.pieces[key]))

    def aggregate(self, node: exp.Expr) -> exp.Expr:
        agg, where = (node.this, node.expression) if isinstance(node, exp.Filter) else (node, None)
        fname = _fname(agg)
        if not isinstance(agg, exp.Count | exp.Sum | exp.Min | exp.Max | exp.Avg):
            raise NotDistributable(f"the aggregate {fname} cannot be computed chunk by chunk")
        # (MIN(x, n) / MAX(x, n) are DuckDB's top-n lists: the extra argument is refused here)
        _check_args(agg, {"this", "big_int"}, f"the aggregate {fname}")
        arg = agg.this
        if isinstance(arg, exp.Distinct):
            raise NotDistributable(f"{fname}(DISTINCT ...) cannot be computed chunk by chunk")
        if arg is None and not isinstance(agg, exp.Count):
            raise NotDistributable(f"{fname} without an argument")
        if arg is not None and _has_agg(arg):
            raise NotDistributable(f"nested aggregate in {fname}")

        def part(a: exp.Expr) -> exp.Expr:
            return exp.Filter(this=a, expression=where.copy()) if where is not None else a

        key = _norm(node)
        if key not in self.aggs:
            n = len(self.items)
            if isinstance(agg, exp.Avg):
                self.aggs[key] = [
                    self.add(part(exp.Sum(this=arg.copy())), f"{PREFIX}a{n}"),
                    self.add(part(exp.Count(this=arg.copy())), f"{PREFIX}a{n + 1}"),
                ]
            else:
                self.aggs[key] = [self.add(part(agg.copy()), f"{PREFIX}a{n}")]
        cols = self.aggs[key]
        if isinstance(agg, exp.Count):
            # SUM over no partial rows is NULL, a COUNT is 0; SUM of BIGINT is HUGEINT: back to BIGINT
            total = exp.Coalesce(this=exp.Sum(this=_col(cols[0])), expressions=[exp.Literal.number(0)])
            return exp.Cast(this=total, to=exp.DataType.build("BIGINT"))
        if isinstance(agg, exp.Avg):
            num = exp.Cast(this=exp.Sum(this=_col(cols[0])), to=exp.DataType.build("DOUBLE"))
            den = exp.Nullif(this=exp.Sum(this=_col(cols[1])), expression=exp.Literal.number(0))
            return exp.Div(this=num, expression=den)
        return type(agg)(this=_col(cols[0]))

    def rewrite(self, node: exp.Expr) -> exp.Expr:
        """The final-query form of an expression of the original SELECT list, HAVING or ORDER BY."""
        if isinstance(node, exp.Filter) or _is_agg(node):
            if isinstance(node, exp.Filter) and not _is_agg(node.this):
                raise NotDistributable("a FILTER clause on something that is not an aggregate")
            return self.aggregate(node)
        if isinstance(node, UNSUPPORTED_NODES):
            raise NotDistributable(f"{node.key.upper()} is not distributable")
        if not _has_agg(node):
            if not _needs_rows(node):
                return node.copy()
            return self.piece(node)
        new = node.copy()
        for k, v in node.args.items():
            if isinstance(v, exp.Expr):
                new.set(k, self.rewrite(v))
            elif isinstance(v, list) and any(isinstance(x, exp.Expr) for x in v):
                new.set(k, [self.rewrite(x) if isinstance(x, exp.Expr) else x for x in v])
        return new

    def expand(self, node: exp.Expr) -> exp.Expr:
        """A copy of `node` with bare names of aggregate output columns replaced by their expressions."""
        c = node.copy()
        for col in [n for n in _outer(c) if isinstance(n, exp.Column)]:
            repl = self._aggregate_alias(col)
            if repl is None:
                continue
            if col is c:
                return repl.copy()
            col.replace(repl.copy())
        return c

    def _aggregate_alias(self, node: exp.Expr) -> exp.Expr | None:
        """A bare name that denotes an aggregate output column (`HAVING "n" > 2` with `COUNT(*) AS n`):
        DuckDB takes a source column of that name first; one could only be valid here if grouped, so a
        grouped bare column of that name makes it ambiguous."""
        if not isinstance(node, exp.Column) or node.table:
            return None
        for out in self.outs:
            if out.name.lower() == node.name.lower() and _has_agg(out.expr):
                if node.name.lower() in self.group_names:
                    raise NotDistributable(
                        f"{node.name} is both an aggregate output column and a grouped column"
                    )
                return out.expr
        return None


def _split_aggregate(tree: exp.Select, outs: list[_Out]) -> SplitQuery:
    limit, offset = _limit_offset(tree)
    group = tree.args.get("group")
    terms: list[exp.Expr] = []
    if group is not None:
        _check_args(group, {"expressions"}, "GROUP BY")
        terms = list(group.expressions)
    group_names = {t.name.lower() for t in terms if isinstance(t, exp.Column)}
    ag = _Aggregates(outs, group_names)
    exprs = [ag.expand(o.expr) for o in outs]

    # the non-aggregate projections, under their own aliases: lateral aliases bind as in the original
    carried: dict[int, int] = {}  # output index -> partial position (1-based)
    carried_by_expr: dict[str, str] = {}  # normalized expression -> partial column
    for i, (out, e) in enumerate(zip(outs, exprs, strict=True)):
        if not _has_agg(e):
            ag.add(e.copy(), out.name)
            carried[i] = len(ag.items)
            carried_by_expr.setdefault(_norm(e), out.name)
    partial_group: list[exp.Expr] = []
    final_keys: list[str] = []
    for k, t in enumerate(terms):
        if _has_agg(t) or any(isinstance(n, exp.Window) for n in _outer(t)):
            raise NotDistributable("GROUP BY an aggregate or window")
        if isinstance(t, exp.Literal) and not t.is_string:
            p = _int_literal(t, "a GROUP BY position")
            if not 1 <= p <= len(outs) or p - 1 not in carried:
                raise NotDistributable(f"GROUP BY position {p} does not denote a non-aggregate output column")
            partial_group.append(exp.Literal.number(carried[p - 1]))
            final_keys.append(outs[p - 1].name)
            continue
        if isinstance(t, exp.Literal):
            raise NotDistributable("GROUP BY a string constant")
        partial_group.append(t.copy())
        # a term identical to a carried projection has its value already (same text, same context)
        same = carried_by_expr.get(_norm(t))
        final_keys.append(same if same is not None else ag.add(t.copy(), f"{PREFIX}g{k}"))

    final_exprs = []
    for i, (out, e) in enumerate(zip(outs, exprs, strict=True)):
        if i in carried:
            f = e.copy() if not _needs_rows(e) else exp.AnyValue(this=_col(out.name))
        else:
            f = ag.rewrite(e)
        final_exprs.append(_alias(f, out.name))
    final = _final_select(final_exprs)
    if final_keys:
        final.set("group", exp.Group(expressions=[_col(n) for n in dict.fromkeys(final_keys)]))
    having = tree.args.get("having")
    if having is not None:
        final.set("having", exp.Having(this=ag.rewrite(ag.expand(having.this))))
    order = []
    for o in _ordered(tree):
        i = _term_position(o, outs, by_expr=False)
        this = exp.Literal.number(i + 1) if i is not None else ag.rewrite(ag.expand(o.this))
        order.append(_ordered_by(this, o))
    if order:
        final.set("order", exp.Order(expressions=order))
    if tree.args.get("distinct") is not None:
        final.set("distinct", exp.Distinct())
    _set_limit(final, limit, offset)

    partial = tree.copy()
    for key in ("having", "order", "limit", "offset", "distinct"):
        partial.set(key, None)
    partial.set("expressions", ag.items)
    partial.set("group", exp.Group(expressions=partial_group) if partial_group else None)
    columns = tuple(a.alias for a in ag.items)
    _check_final(final, columns)
    return SplitQuery(
        partial_sql=_sql(partial),
        final_sql=_sql(final),
        partial_columns=columns,
        kind="aggregate",
        early_stop_rows=None,
    )


def _check_final(final: exp.Select, columns: tuple[str, ...]) -> None:
    """The final query reads only the partials: every column it names must be a partial column."""
    known = {c.lower() for c in columns}
    for c in final.find_all(exp.Column):
        if c.table or c.name.lower() not in known:
            raise NotDistributable(f"the final step would need the column {_sql(c)}, which no chunk returns")


# ---------------------------------------------------------------------------------------------------------


def split_query(sql: str, partitioned: str) -> SplitQuery:
    """Split `sql` (one DuckDB SELECT as the ADQL translator emits) for chunks of `partitioned`, or raise
    NotDistributable saying why it must run on one machine."""
    try:
        tree = sqlglot.parse_one(sql, dialect="duckdb")
    except ParseError as e:
        raise NotDistributable(f"the query could not be parsed for distribution: {e}") from e
    if not isinstance(tree, exp.Select):
        raise NotDistributable(f"the top level is a {tree.key.upper()}, not a plain SELECT")
    _check_args(tree, TOP_ARGS, "the query")
    _locate(tree, partitioned)
    outs = _outputs(tree)
    parts: list[exp.Expr] = [o.expr for o in outs] + [o.this for o in _ordered(tree)]
    if tree.args.get("having") is not None:
        parts.append(tree.args["having"].this)
    for p in parts:
        for n in _outer(p):
            if isinstance(n, exp.Window):
                raise NotDistributable("the query uses a window function")
    where = tree.args.get("where")
    if where is not None and _has_agg(where.this):
        raise NotDistributable("an aggregate in WHERE")
    distinct = tree.args.get("distinct")
    if distinct is not None and (distinct.args.get("on") or distinct.expressions):
        raise NotDistributable("SELECT DISTINCT ON is not distributable")
    grouped = tree.args.get("group") is not None or tree.args.get("having") is not None
    if grouped or any(_has_agg(p) for p in parts):
        return _split_aggregate(tree, outs)
    return _split_rows(tree, outs, distinct=distinct is not None)
