"""Bad input ends with an error naming the file, row or column, and publishes (and leaves) nothing."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq
import pytest
from typer.testing import CliRunner

from dac_lake.catalog_def import DefinitionError, load_definition
from dac_lake.cli import app
from ingest.readers import InputError
from ingest.release import IngestOptions, ingest_release
from tests.conftest import make_catalog

OPTS = IngestOptions(max_rows_per_partition=1000, highest_order=6, margin_arcsec=60, validate_with_lsdb=False)


def _with(table: pa.Table, name: str, values) -> pa.Table:
    return table.set_column(table.column_names.index(name), name, pa.array(values))


def _assert_nothing_published(lake, release="bad"):
    assert lake.current_release("testcat") in (None, "good")
    assert release not in lake.releases("testcat")


def _run(lake, definition_file, paths, **opts):
    options = IngestOptions(**{**OPTS.__dict__, **opts})
    return ingest_release(
        lake, "testcat", "bad", [str(p) for p in paths], load_definition(definition_file), options
    )


def _parquet(tmp_path, table, name="in.parquet"):
    path = tmp_path / name
    pq.write_table(table, path)
    return path


@pytest.mark.parametrize("column", ["ra", "dec", "object_id"])
def test_missing_position_or_id_column(column, lake, definition_file, tmp_path):
    path = _parquet(tmp_path, make_catalog(100).drop_columns([column]))
    with pytest.raises(InputError, match=rf"{path}.*column '{column}' is missing"):
        _run(lake, definition_file, [path])
    _assert_nothing_published(lake)


@pytest.mark.parametrize(
    ("column", "value", "reason"),
    [
        ("ra", 361.0, r"ra outside \[0, 360\)"),
        ("ra", -0.5, r"ra outside"),
        ("dec", 90.5, r"dec outside"),
        ("dec", float("nan"), "dec is NaN"),
        ("ra", float("inf"), "ra is NaN"),
    ],
)
def test_positions_out_of_range_name_the_row(column, value, reason, lake, definition_file, tmp_path):
    table = make_catalog(100)
    values = table[column].to_numpy().copy()
    values[41] = value
    path = _parquet(tmp_path, _with(table, column, values))
    with pytest.raises(InputError, match=rf"{path}: row 42: {reason}"):
        _run(lake, definition_file, [path])
    _assert_nothing_published(lake)


def test_skip_bad_rows_reports_count(lake, definition_file, tmp_path):
    table = make_catalog(500)
    ra = table["ra"].to_numpy().copy()
    dec = table["dec"].to_numpy().copy()
    ra[[3, 7, 9]] = np.nan
    dec[[100, 200]] = 95.0
    path = _parquet(tmp_path, _with(_with(table, "ra", ra), "dec", dec))
    summary = _run(lake, definition_file, [path], skip_bad_rows=True)
    assert summary.rows == 495 and summary.skipped_rows == 5
    assert summary.skipped_reasons == {"ra is NaN or null": 3, "dec outside [-90, 90]": 2}
    assert any("skipped" in line and "5 bad row" in line for line in summary.lines())


def test_duplicate_ids_across_files_name_both(lake, definition_file, tmp_path):
    a = make_catalog(300, seed=1)
    b = make_catalog(300, seed=2, id_offset=10_000_000)
    dup = a["object_id"][10].as_py()
    ids = b["object_id"].to_numpy().copy()
    ids[20] = dup
    pa_path, pb_path = (
        _parquet(tmp_path, a, "a.parquet"),
        _parquet(tmp_path, _with(b, "object_id", ids), "b.parquet"),
    )
    with pytest.raises(
        InputError, match=rf"duplicate id object_id={dup}: .*a.parquet row 11 and .*b.parquet row 21"
    ):
        _run(lake, definition_file, [pa_path, pb_path])
    _assert_nothing_published(lake)


def test_wrong_type_in_csv_names_row_and_column(lake, definition_file, tmp_path):
    table = make_catalog(50)
    path = tmp_path / "in.csv"
    pacsv.write_csv(table, path)
    lines = path.read_text().splitlines()
    fields = lines[8].split(",")
    fields[3] = "bright"  # the mag column
    lines[8] = ",".join(fields)
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(
        InputError, match=r"in.csv: row 8 \(line 9\), column 'mag': 'bright' is not a valid float"
    ):
        _run(lake, definition_file, [path])
    _assert_nothing_published(lake)


def test_wrong_type_in_parquet_names_column(lake, definition_file, tmp_path):
    table = make_catalog(50)
    path = _parquet(tmp_path, _with(table, "mag", [f"x{i}" for i in range(50)]))
    with pytest.raises(InputError, match=rf"{path}: column 'mag' holds text"):
        _run(lake, definition_file, [path])
    path = _parquet(tmp_path, _with(table, "object_id", table["ra"].to_numpy()), "float_ids.parquet")
    with pytest.raises(InputError, match="column 'object_id' is double but the definition says int64"):
        _run(lake, definition_file, [path])
    _assert_nothing_published(lake)


def test_empty_input(lake, definition_file, tmp_path):
    path = _parquet(tmp_path, make_catalog(10).slice(0, 0))
    with pytest.raises(InputError, match=rf"{path}: the file holds no rows"):
        _run(lake, definition_file, [path])
    _assert_nothing_published(lake)


def test_unreadable_file(lake, definition_file, tmp_path):
    path = tmp_path / "broken.parquet"
    path.write_bytes(b"this is not parquet at all")
    with pytest.raises(InputError, match=rf"{path}"):
        _run(lake, definition_file, [path])
    missing = tmp_path / "nope.parquet"
    with pytest.raises(InputError, match=rf"{missing}: no such input file"):
        _run(lake, definition_file, [missing])
    with pytest.raises(InputError, match="unknown input format"):
        (tmp_path / "x.dat").write_text("1 2 3")
        _run(lake, definition_file, [tmp_path / "x.dat"])
    _assert_nothing_published(lake)


def test_column_not_in_definition(lake, definition_file, tmp_path):
    table = make_catalog(50).append_column("surprise", pa.array(np.arange(50)))
    path = _parquet(tmp_path, table)
    with pytest.raises(
        InputError, match=rf"{path}: column\(s\) 'surprise' are not in the catalog definition"
    ):
        _run(lake, definition_file, [path])
    _assert_nothing_published(lake)


def test_null_id(lake, definition_file, tmp_path):
    table = make_catalog(50)
    ids = table["object_id"].to_pylist()
    ids[5] = None
    path = _parquet(tmp_path, table.set_column(0, "object_id", pa.array(ids, pa.int64())))
    with pytest.raises(InputError, match=rf"{path}: column 'object_id' must not be null but row 6 is"):
        _run(lake, definition_file, [path])


def test_bad_input_keeps_previous_release(lake, definition_file, tmp_path):
    good = _parquet(tmp_path, make_catalog(200), "good.parquet")
    ingest_release(lake, "testcat", "good", [str(good)], load_definition(definition_file), OPTS)
    bad = _parquet(tmp_path, make_catalog(100).drop_columns(["dec"]), "bad.parquet")
    with pytest.raises(InputError):
        _run(lake, definition_file, [bad])
    assert lake.current_release("testcat") == "good"
    assert lake.releases("testcat") == ["good"]


def test_cli_error_is_one_clear_line(lake, definition_file, tmp_path):
    path = _parquet(tmp_path, make_catalog(100).drop_columns(["ra"]))
    result = CliRunner().invoke(
        app,
        [
            "ingest",
            "release",
            "testcat",
            "bad",
            str(path),
            "--lake",
            lake.storage.url,
            "--definition",
            str(definition_file),
            "--no-progress",
        ],
    )
    assert result.exit_code == 1
    assert result.output.strip().splitlines()[-1].startswith(f"error: {path}: the RA column 'ra' is missing")
    assert "Traceback" not in result.output


def test_bad_definitions(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text(
        "name: x\nra_column: ra\ndec_column: dec\nid_column: id\ncolumns:\n  - {name: ra, datatype: float}\n"
    )
    with pytest.raises(DefinitionError, match="datatype 'float'"):
        load_definition(bad)
    header = "name: x\nra_column: ra\ndec_column: dec\nid_column: id\ncolumns:\n"
    bad.write_text(header + "  - {name: ra, datatype: float64}\n")
    with pytest.raises(DefinitionError, match="dec_column 'dec' is not among the columns"):
        load_definition(bad)
    with pytest.raises(DefinitionError, match="no catalog definition"):
        load_definition("no_such_catalog")


def test_shipped_definitions_load():
    for name in ("demo_survey", "demo_xmatch"):
        definition = load_definition(name)
        assert definition.column(definition.ra_column).ucd.startswith("pos.eq.ra")
        assert all(c.description for c in definition.columns)
