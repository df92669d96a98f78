"""dac_lake.distributed.split: the partial+final pair must give what the original SQL gives on all rows.

Equivalence harness with plain DuckDB: `__dac_t0` (demo.survey, the partitioned relation) is cut into
random disjoint chunks (1, 3 and 7 chunks, and 7 chunks plus empty ones); each chunk runs the partial SQL
with `__dac_t0` = that chunk and `__dac_t1` (demo.xmatch) whole; the concatenated partials run the final
SQL on a connection that holds nothing else, so it cannot read the source tables. The driver always runs at
least one chunk (see the module docstring); an all-empty run is tested as one empty chunk.
"""

from __future__ import annotations

import functools
import math

import duckdb
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pytest
from adql_support import DemoRegistry, catalog, uniform_sky

from dac_lake.adql import translate
from dac_lake.distributed.split import PARTIALS, NotDistributable, SplitQuery, split_query

N = 3000


def _with_nulls(t: pa.Table, rng: np.random.Generator, fractions: dict[str, float]) -> pa.Table:
    for name, frac in fractions.items():
        mask = pa.array(rng.random(len(t)) < frac)
        col = t[name]
        nulled = pc.if_else(mask, pa.nulls(len(t), col.type), col)
        t = t.set_column(t.schema.get_field_index(name), name, nulled)
    return t


@pytest.fixture(scope="module")
def data() -> dict[str, pa.Table]:
    rng = np.random.default_rng(7)
    survey = pa.Table.from_pandas(catalog(*uniform_sky(N, rng), seed=1), preserve_index=False)
    survey = _with_nulls(survey, rng, {"gmag": 0.1, "flags": 0.05, "pmra": 0.05, "name": 0.02})
    # xmatch: ids 0..N/2 only every other one, so joins by id leave survey rows unmatched
    xm = pa.Table.from_pandas(catalog(*uniform_sky(N // 2, rng), seed=2), preserve_index=False)
    xm = xm.set_column(0, "id", pa.array(np.arange(0, N, 2, dtype=np.int64)))
    return {"__dac_t0": survey, "__dac_t1": _with_nulls(xm, rng, {"pmra": 0.1})}


@functools.cache
def _chunked(t_id: int, k: int, seed: int, empty: int) -> list[pa.Table]:
    t = _TABLES[t_id]
    which = np.random.default_rng(seed).integers(0, k, len(t))
    return [t.filter(pa.array(which == i)) for i in range(k)] + [t.slice(0, 0)] * empty


_TABLES: dict[int, pa.Table] = {}


def chunked(t: pa.Table, k: int, seed: int, empty: int = 0) -> list[pa.Table]:
    """k random disjoint chunks of the rows (some may be empty by chance), plus `empty` empty ones."""
    _TABLES[id(t)] = t
    return _chunked(id(t), k, seed, empty)


def run_original(sql: str, data: dict[str, pa.Table]) -> pa.Table:
    con = duckdb.connect()
    for name, t in data.items():
        con.register(name, t)
    return con.execute(sql).to_arrow_table()


def run_split(split: SplitQuery, data: dict[str, pa.Table], chunks: list[pa.Table]) -> pa.Table:
    con = duckdb.connect()
    for name, t in data.items():
        con.register(name, t)
    parts = []
    for chunk in chunks:
        con.register("__dac_t0", chunk)
        part = con.execute(split.partial_sql).to_arrow_table()
        assert tuple(part.column_names) == split.partial_columns
        parts.append(part)
    final = duckdb.connect()  # holds only the partials
    final.register(PARTIALS, pa.concat_tables(parts))
    return final.execute(split.final_sql).to_arrow_table()


def _same(a: object, b: object) -> bool:
    if isinstance(a, float) and isinstance(b, float):
        return math.isclose(a, b, rel_tol=1e-9, abs_tol=1e-12) or (math.isnan(a) and math.isnan(b))
    return a == b


def _key(row: tuple) -> tuple:
    return tuple((v is None, round(v, 6) if isinstance(v, float) else v) for v in row)


def assert_equivalent(original: pa.Table, got: pa.Table, ordered: int, subset_of: pa.Table | None = None):
    """`ordered`: how many leading ORDER BY output columns must match in sequence (0: no order asserted).
    `subset_of`: an unordered LIMIT: only the row count is fixed, the rows must be rows of the full result."""
    assert got.column_names == original.column_names
    assert got.num_rows == original.num_rows
    a = [tuple(r.values()) for r in original.to_pylist()]
    b = [tuple(r.values()) for r in got.to_pylist()]
    if subset_of is not None:
        full = {_key(tuple(r.values())) for r in subset_of.to_pylist()}
        assert all(_key(r) in full for r in b)
        return
    for ra, rb in zip(a, b, strict=True):
        assert all(_same(x, y) for x, y in zip(ra[:ordered], rb[:ordered], strict=True)), (ra, rb)
    for ra, rb in zip(sorted(a, key=_key), sorted(b, key=_key), strict=True):
        assert all(_same(x, y) for x, y in zip(ra, rb, strict=True)), (ra, rb)
    assert got.schema.types == original.schema.types  # nice-to-have, holds for all shapes tested


CHUNKINGS = [(1, 0), (3, 0), (7, 0), (7, 4)]


def check(sql: str, data: dict[str, pa.Table], ordered: int = 0, kind: str | None = None) -> SplitQuery:
    split = split_query(sql, "__dac_t0")
    if kind is not None:
        assert split.kind == kind
    original = run_original(sql, data)
    for seed, (k, empty) in enumerate(CHUNKINGS):
        got = run_split(split, data, chunked(data["__dac_t0"], k, seed, empty))
        assert_equivalent(original, got, ordered)
    return split


def adql(text: str, maxrec: int | None = 1000) -> str:
    return translate(text, DemoRegistry(), maxrec).sql


# (ADQL, number of leading columns whose order is asserted, kind)
TRANSLATED = [
    ("SELECT COUNT(*) FROM demo.survey", 0, "aggregate"),
    ("SELECT COUNT(*), COUNT(gmag), SUM(gmag), AVG(flags), MIN(gmag), MAX(name) FROM demo.survey "
     "WHERE gmag > 100", 0, "aggregate"),
    ("SELECT COUNT(*) AS n, COUNT(gmag) AS ng, SUM(flags) AS sf, AVG(gmag) AS ag, AVG(flags) AS af, "
     "MIN(pmra) AS lo, MAX(name) AS hi FROM demo.survey", 0, "aggregate"),
    ("SELECT flags, COUNT(*) AS n, AVG(gmag) AS avg FROM demo.survey WHERE gmag < 20 GROUP BY flags "
     "HAVING COUNT(*) > 3 ORDER BY 2 DESC", 0, "aggregate"),
    ("SELECT flags, COUNT(*) AS n FROM demo.survey GROUP BY flags HAVING n > 150 ORDER BY flags DESC",
     1, None),
    ("SELECT flags, COUNT(gmag), SUM(gmag), AVG(pmra), MIN(gmag), MAX(name), SUM(id) FROM demo.survey "
     "GROUP BY flags ORDER BY flags", 1, None),
    ("SELECT FLOOR(gmag) AS b, COUNT(*) FROM demo.survey GROUP BY FLOOR(gmag) ORDER BY b", 1, None),
    ("SELECT FLOOR(gmag) AS b, COUNT(*) AS n FROM demo.survey GROUP BY b HAVING n > 2 ORDER BY b", 1, None),
    ("SELECT FLOOR(gmag) AS b, COUNT(*) FROM demo.survey GROUP BY 1", 0, None),
    ("SELECT t.b, COUNT(*), AVG(t.p) FROM (SELECT FLOOR(gmag) AS b, pmra AS p FROM demo.survey) AS t "
     "GROUP BY t.b ORDER BY t.b", 1, None),
    ("SELECT flags * 2 + 1 AS x, COUNT(*) * flags AS y, MAX(gmag) - MIN(gmag) AS r FROM demo.survey "
     "GROUP BY flags ORDER BY 1", 1, None),
    ("SELECT TOP 3 flags, COUNT(*) AS n FROM demo.survey GROUP BY flags ORDER BY flags DESC OFFSET 2",
     1, None),
    ("SELECT TOP 10 id, ra FROM demo.survey ORDER BY ra", 2, "rows"),
    ("SELECT TOP 25 id, gmag FROM demo.survey ORDER BY gmag DESC", 2, "rows"),
    ("SELECT TOP 10 id FROM demo.survey ORDER BY pmra", 1, "rows"),
    ("SELECT TOP 7 id, ra FROM demo.survey ORDER BY ra DESC OFFSET 5", 2, "rows"),
    ("SELECT TOP 5 id AS ra, dec FROM demo.survey ORDER BY ra", 1, "rows"),
    ("SELECT TOP 6 id, ra FROM demo.survey ORDER BY ra + 1 DESC, 2", 2, "rows"),
    ("SELECT id, ra, gmag FROM demo.survey WHERE ra < 20", 0, "rows"),
    ("SELECT DISTINCT flags FROM demo.survey", 0, "distinct"),
    ("SELECT DISTINCT TOP 5 flags FROM demo.survey ORDER BY flags DESC OFFSET 2", 1, "distinct"),
    ("SELECT DISTINCT Mixed_Case, flags FROM demo.survey WHERE gmag < 15", 0, "distinct"),
]


@pytest.mark.parametrize(("text", "ordered", "kind"), TRANSLATED, ids=[t[0][:50] for t in TRANSLATED])
def test_translated_queries(data, text, ordered, kind):
    check(adql(text, maxrec=None if text.startswith("SELECT id, ra, gmag") else 1000), data, ordered, kind)


HAND = [
    # NULLS FIRST explicit: ~300 NULL gmag, all of them within the 400 rows
    ('SELECT s.id AS id, s.gmag AS g FROM "__dac_t0" AS s ORDER BY s.gmag DESC NULLS FIRST LIMIT 400', 0),
    ('SELECT s.id AS id, s.gmag AS g FROM "__dac_t0" AS s ORDER BY g ASC NULLS FIRST, s.ra '
     "LIMIT 400 OFFSET 7", 0),
    ('SELECT s.id AS id, x.pmra AS xp FROM "__dac_t0" AS s JOIN "__dac_t1" AS x ON s.id = x.id', 0),
    ('SELECT s.id AS id, x.ra AS xra FROM "__dac_t0" AS s LEFT JOIN "__dac_t1" AS x ON s.id = x.id '
     "ORDER BY s.ra LIMIT 50", 1),
    ('SELECT s.id AS id FROM "__dac_t1" AS x RIGHT JOIN "__dac_t0" AS s ON s.id = x.id '
     "WHERE x.id IS NULL", 0),
    ('SELECT COUNT(*) AS n, COUNT(x.id) AS matched, AVG(x.pmra - s.pmra) AS d FROM "__dac_t0" AS s '
     'LEFT JOIN "__dac_t1" AS x ON s.id = x.id', 0),
    ('SELECT s.flags AS f, COUNT(*) AS n FROM ("__dac_t0" AS s JOIN "__dac_t1" AS y ON s.id = y.id) '
     'LEFT JOIN "__dac_t1" AS z ON z.id = s.id + 1 GROUP BY s.flags', 0),
    ('SELECT s.id AS id FROM "__dac_t0" AS s WHERE s.id IN (SELECT id FROM "__dac_t1" WHERE flags < 4)', 0),
    ('SELECT s.id AS id FROM "__dac_t0" AS s WHERE NOT EXISTS '
     '(SELECT 1 FROM "__dac_t1" AS x WHERE x.id = s.id) AND s.ra > (SELECT AVG(ra) FROM "__dac_t1")', 0),
    ('WITH c AS (SELECT id FROM "__dac_t1" WHERE flags < 3) '
     'SELECT COUNT(*) AS n, SUM(s.flags) AS sf FROM "__dac_t0" AS s JOIN c ON s.id = c.id', 0),
    ('SELECT flags AS f, COUNT(*) FILTER (WHERE gmag < 18) AS n18, AVG(gmag) FILTER (WHERE pmra > 0) AS a '
     'FROM "__dac_t0" GROUP BY flags', 0),
    ('SELECT flags AS f FROM "__dac_t0" GROUP BY flags ORDER BY COUNT(*) DESC, flags', 0),
    ('SELECT FLOOR(gmag) AS b, b + 1 AS c, COUNT(*) AS n FROM "__dac_t0" GROUP BY b', 0),
    ('SELECT 7 AS seven, COUNT(*) AS n FROM "__dac_t0" WHERE flags = 3', 0),
    ('SELECT "Mixed_Case" AS m, SUM(pmra) AS sp, COUNT(*) AS n FROM "__dac_t0" GROUP BY "Mixed_Case" '
     "HAVING SUM(pmra) > -1000 ORDER BY n DESC, m LIMIT 4", 2),
]


@pytest.mark.parametrize(("sql", "ordered"), HAND, ids=[h[0][:60] for h in HAND])
def test_hand_written_queries(data, sql, ordered):
    check(sql, data, ordered)


def test_unordered_limit_may_stop_early(data):
    sql = adql("SELECT TOP 50 id, ra FROM demo.survey WHERE gmag < 19")
    split = split_query(sql, "__dac_t0")
    assert split.early_stop_rows == 50 and split.kind == "rows"
    full = run_original(sql.replace("LIMIT 50", ""), data)
    got = run_split(split, data, chunked(data["__dac_t0"], 5, 0))
    assert_equivalent(run_original(sql, data), got, 0, subset_of=full)
    ordered = split_query(adql("SELECT TOP 50 id FROM demo.survey ORDER BY ra"), "__dac_t0")
    assert ordered.early_stop_rows is None
    assert split_query(adql("SELECT TOP 5 id FROM demo.survey OFFSET 3"), "__dac_t0").early_stop_rows is None


def test_partials_are_small(data):
    """Top-k keeps limit+offset rows per chunk; aggregates one row per group and chunk."""
    split = split_query(adql("SELECT TOP 7 id FROM demo.survey ORDER BY ra OFFSET 3"), "__dac_t0")
    con = duckdb.connect()
    con.register("__dac_t0", data["__dac_t0"])
    assert con.execute(split.partial_sql).to_arrow_table().num_rows == 10
    split = split_query(adql("SELECT flags, COUNT(*) FROM demo.survey GROUP BY flags"), "__dac_t0")
    assert con.execute(split.partial_sql).to_arrow_table().num_rows == 17  # 16 flags + NULL


def test_all_empty_chunks(data):
    """A WHERE matching nothing in any chunk, and a run whose only chunk is empty: COUNT is 0, not NULL."""
    empty = {**data, "__dac_t0": data["__dac_t0"].slice(0, 0)}
    for text in ("SELECT COUNT(*), SUM(gmag), AVG(gmag), MAX(id) FROM demo.survey",
                 "SELECT flags, COUNT(*) FROM demo.survey GROUP BY flags",
                 "SELECT TOP 3 id FROM demo.survey ORDER BY ra"):
        sql = adql(text)
        split = split_query(sql, "__dac_t0")
        got = run_split(split, empty, [empty["__dac_t0"]])
        assert_equivalent(run_original(sql, empty), got, 0)
    got = run_split(split_query(adql(TRANSLATED[0][0]), "__dac_t0"), empty, [empty["__dac_t0"]])
    assert got.to_pylist() == [{"count": 0}]


def test_shapes_of_generated_sql():
    text = "SELECT flags, COUNT(*) AS n, AVG(gmag) AS a, COUNT(*) + 1 AS m FROM demo.survey GROUP BY flags"
    split = split_query(adql(text), "__dac_t0")
    assert split.partial_columns.count("flags") == 1
    assert sum(c.startswith("__dac_a") for c in split.partial_columns) == 3  # COUNT(*) once, AVG twice
    assert "__dac_t0" not in split.final_sql and "__dac_partials" in split.final_sql
    assert "GROUP BY" in split.partial_sql and "LIMIT" not in split.partial_sql
    rows = split_query(adql("SELECT TOP 4 id FROM demo.survey ORDER BY gmag DESC"), "__dac_t0")
    assert "NULLS LAST" in rows.partial_sql and "NULLS LAST" in rows.final_sql
    assert rows.partial_columns == ("id", "__dac_o0")


REFUSED = [
    ('SELECT x.id AS id FROM "__dac_t1" AS x LEFT JOIN "__dac_t0" AS s ON s.id = x.id', "null-supplying"),
    ('SELECT s.id AS id FROM "__dac_t0" AS s RIGHT JOIN "__dac_t1" AS x ON s.id = x.id', "null-supplying"),
    ('SELECT s.id AS id FROM "__dac_t0" AS s FULL JOIN "__dac_t1" AS x ON s.id = x.id', "FULL"),
    ('SELECT x.id AS id FROM "__dac_t1" AS x LEFT JOIN ("__dac_t0" AS s JOIN "__dac_t1" AS y ON s.id = y.id) '
     "ON x.id = s.id", "null-supplying"),
    ('SELECT x.id AS id FROM "__dac_t1" AS x SEMI JOIN "__dac_t0" AS s ON s.id = x.id', "SEMI"),
    ('SELECT x.id AS id FROM "__dac_t1" AS x WHERE x.id IN (SELECT id FROM "__dac_t0")', "subquery"),
    ('SELECT x.id AS id, (SELECT MAX(ra) FROM "__dac_t0") AS m FROM "__dac_t1" AS x', "subquery"),
    ('SELECT id FROM "__dac_t0" UNION SELECT id FROM "__dac_t1"', "UNION"),
    ('SELECT id, ROW_NUMBER() OVER (ORDER BY ra) AS r FROM "__dac_t0"', "window"),
    ('SELECT COUNT(DISTINCT flags) AS n FROM "__dac_t0"', "DISTINCT"),
    ('SELECT STDDEV(gmag) AS sd FROM "__dac_t0"', "STDDEV"),
    ('SELECT MEDIAN(gmag) AS m FROM "__dac_t0"', "MEDIAN"),
    ('SELECT kurtosis(gmag) AS k FROM "__dac_t0"', "KURTOSIS"),
    ('SELECT string_agg(name, \',\') AS s FROM "__dac_t0"', "cannot be computed"),
    ('SELECT max(gmag, 3) AS top3 FROM "__dac_t0"', "MAX uses COUNT"),
    ('SELECT a.id AS id FROM "__dac_t0" AS a JOIN "__dac_t0" AS b ON a.id = b.id', "2 times"),
    ('SELECT b AS b, n AS n FROM (SELECT flags AS b, COUNT(*) AS n FROM "__dac_t0" GROUP BY flags) AS t',
     "GROUP BY"),
    ('SELECT t.id AS id FROM (SELECT id FROM "__dac_t0" LIMIT 5) AS t', "limit"),
    ('SELECT t.id AS id FROM (SELECT id FROM "__dac_t0" UNION ALL SELECT id FROM "__dac_t1") AS t', "UNION"),
    ('WITH p AS (SELECT * FROM "__dac_t0") SELECT COUNT(*) AS n FROM p', "subquery"),
    ('SELECT DISTINCT ON (flags) flags AS f, id AS id FROM "__dac_t0"', "DISTINCT ON"),
    ('SELECT * FROM "__dac_t0"', "no name"),
    ('SELECT id AS id FROM "__dac_t1"', "does not read"),
    ('SELECT COUNT(*) AS flags FROM "__dac_t0" GROUP BY flags HAVING flags > 2', "both"),
    ('SELECT id AS id FROM "__dac_t0" LIMIT 10%', "LIMIT OPTIONS"),
    ("SELECT id AS id FROM __dac_t0 AS s, LATERAL (SELECT s.id + 1 AS z) AS l QUALIFY z > 2", "qualify"),
]


@pytest.mark.parametrize(("sql", "reason"), REFUSED, ids=[r[0][:60] for r in REFUSED])
def test_not_distributable(sql, reason):
    with pytest.raises(NotDistributable, match=f"(?i){reason}"):
        split_query(sql, "__dac_t0")


def test_translator_refusals():
    with pytest.raises(NotDistributable, match="DISTINCT"):
        split_query(adql("SELECT COUNT(DISTINCT flags) FROM demo.survey"), "__dac_t0")
    # the cross-match anchors the other relation: reading __dac_t1 partitioned is fine, only one of each
    sql = adql("SELECT s.id, x.id FROM demo.survey AS s LEFT OUTER JOIN demo.xmatch AS x ON s.id = x.id")
    split_query(sql, "__dac_t0")
    with pytest.raises(NotDistributable, match="null-supplying"):
        split_query(sql, "__dac_t1")


def test_zero_chunks_global_aggregate(data):
    """Not a case the driver produces (it runs >= 1 chunk), but an aggregate without GROUP BY over an empty
    partials relation (of the partial schema) still gives its one row, with COUNT 0 rather than NULL."""
    split = split_query(adql("SELECT COUNT(*), COUNT(gmag) AS ng, SUM(gmag), AVG(gmag) FROM demo.survey"),
                        "__dac_t0")
    con = duckdb.connect()
    con.register("__dac_t0", data["__dac_t0"].slice(0, 0))
    empty_partials = con.execute(split.partial_sql).to_arrow_table().slice(0, 0)
    final = duckdb.connect()
    final.register(PARTIALS, empty_partials)
    assert final.execute(split.final_sql).fetchall() == [(0, 0, None, None)]
