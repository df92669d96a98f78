"""Helpers for the ADQL translator tests: a two-table registry, synthetic data and an executor that plays
the engine's part (one DuckDB view per table ref, named after `TableRef.relation`)."""

from __future__ import annotations

import duckdb
import numpy as np
import pandas as pd
from astropy import units as u
from astropy.coordinates import SkyCoord

from dac_lake import xmatch
from dac_lake.adql import ColumnMeta, TableMeta, Translation, translate
from dac_lake.healpix import healpix29

COLUMNS = (
    ColumnMeta("id", "int64", "", "meta.id;meta.main", "object id"),
    ColumnMeta("ra", "float64", "deg", "pos.eq.ra;meta.main", "right ascension"),
    ColumnMeta("dec", "float64", "deg", "pos.eq.dec;meta.main", "declination"),
    ColumnMeta("gmag", "float32", "mag", "phot.mag", "g magnitude"),
    ColumnMeta("pmra", "float64", "mas/yr", "pos.pm", "proper motion in RA"),
    ColumnMeta("flags", "int32", "", "meta.code", "quality flags"),
    ColumnMeta("name", "string", "", "meta.id", "designation"),
    ColumnMeta("Mixed_Case", "int16", "", "", "a column with capitals"),
)
SURVEY = TableMeta("demo", "survey", COLUMNS, "ra", "dec")
XMATCH = TableMeta("demo", "xmatch", COLUMNS, "ra", "dec")


class DemoRegistry:
    """The caller sees both demo tables."""

    def __init__(self, tables: list[TableMeta] | None = None) -> None:
        self._tables = tables if tables is not None else [SURVEY, XMATCH]

    def tables(self) -> list[TableMeta]:
        return list(self._tables)


def uniform_sky(n: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    ra = rng.uniform(0, 360, n)
    dec = np.degrees(np.arcsin(rng.uniform(-1, 1, n)))
    return ra, dec


def around(ra0: float, dec0: float, max_sep: float, n: int, rng: np.random.Generator):
    """Points scattered uniformly in separation up to `max_sep` degrees around a centre."""
    c = SkyCoord(ra0 * u.deg, dec0 * u.deg)
    pa = rng.uniform(0, 360, n) * u.deg
    sep = rng.uniform(0, max_sep, n) * u.deg
    p = c.directional_offset_by(pa, sep)
    return p.ra.deg, p.dec.deg


def catalog(ra: np.ndarray, dec: np.ndarray, seed: int = 0) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    n = len(ra)
    return pd.DataFrame(
        {
            "id": np.arange(n, dtype=np.int64),
            "ra": np.asarray(ra, dtype=np.float64) % 360.0,
            "dec": np.asarray(dec, dtype=np.float64),
            "gmag": rng.uniform(14, 24, n).astype(np.float32),
            "pmra": rng.normal(0, 20, n),
            "flags": rng.integers(0, 16, n).astype(np.int32),
            "name": [f"OBJ{i:05d}" for i in range(n)],
            "Mixed_Case": (np.arange(n) % 7).astype(np.int16),
            "_healpix_29": healpix29(np.asarray(ra) % 360.0, np.asarray(dec)),
        }
    )


def run(t: Translation, data: dict[str, pd.DataFrame], explain: bool = False) -> pd.DataFrame | str:
    """Execute a translation the way the engine does: one relation per table ref, and for a HEALPix
    neighbour cross-match (`CrossMatch.key`) the key columns: the anchor's own cell, the expanded side
    joined through the neighbour table (dac_lake.xmatch, the engine's own helpers)."""
    con = duckdb.connect()
    keys: dict[str, tuple[str, int, str | None]] = {}  # relation -> (key column, shift, neighbour table)
    frames = {ref.relation: data[ref.table.name] for ref in t.table_refs}
    for i, cm in enumerate(t.crossmatches):
        if cm.key is None:
            continue
        rows = {rel: len(df) for rel, df in frames.items()}
        anchor, expanded = xmatch.choose_anchor(cm.left, cm.right, cm.expandable, rows)
        shift = xmatch.key_shift(cm.order)
        cells = np.unique(frames[anchor]["_healpix_29"].to_numpy() >> shift)
        con.register(f"nb{i}", xmatch.neighbour_table(cells, cm.order))
        keys[anchor] = (cm.key, shift, None)
        keys[expanded] = (cm.key, xmatch.key_shift(xmatch.join_order(cm.order)), f"nb{i}")
    for i, ref in enumerate(t.table_refs):
        con.register(f"src{i}", frames[ref.relation])
        if ref.relation not in keys:
            con.execute(f'CREATE VIEW "{ref.relation}" AS SELECT * FROM src{i}')
            continue
        key, shift, nb = keys[ref.relation]
        if nb is None:
            con.execute(
                f'CREATE VIEW "{ref.relation}" AS SELECT *, _healpix_29 >> {shift} AS "{key}" FROM src{i}'
            )
        else:
            con.execute(
                f'CREATE VIEW "{ref.relation}" AS SELECT s.*, n.a AS "{key}" FROM src{i} AS s '
                f"JOIN {nb} AS n ON (s._healpix_29 >> {shift}) = n.e"
            )
    if explain:
        return "\n".join(row[1] for row in con.execute("EXPLAIN " + t.sql).fetchall())
    return con.execute(t.sql).df()


def query(adql: str, data: dict[str, pd.DataFrame], maxrec: int | None = None) -> pd.DataFrame:
    t = translate(adql, DemoRegistry(), maxrec)
    out = run(t, data)
    assert isinstance(out, pd.DataFrame)
    assert list(out.columns) == [c.name for c in t.columns]
    return out
