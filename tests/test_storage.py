"""Storage primitives on a local folder and on the real Ceph RGW."""

from __future__ import annotations

import threading

import pytest

from dac_lake.settings import load_settings
from dac_lake.storage import LakeLocation, LakeStorage, StorageError


def test_parse_urls(tmp_path):
    loc = LakeLocation.parse("s3://bucket/some/prefix/")
    assert (loc.scheme, loc.bucket, loc.prefix) == ("s3", "bucket", "some/prefix")
    assert LakeLocation.parse("s3://bucket").prefix == ""
    assert LakeLocation.parse(str(tmp_path)).prefix == str(tmp_path)
    with pytest.raises(ValueError, match="names no bucket"):
        LakeLocation.parse("s3://")
    with pytest.raises(ValueError, match="only s3://"):
        LakeLocation.parse("gs://bucket/x")


def test_read_write_list_delete(lake):
    st = lake.storage
    st.write_text("a/b/c.json", '{"x": 1}')
    st.write_bytes("a/b/d.bin", b"\x00\x01")
    assert st.read_text("a/b/c.json") == '{"x": 1}'
    assert st.list_dir("a/b") == ["c.json", "d.bin"]
    assert st.list_dir("does/not/exist") == []
    assert sorted(p for p, _ in st.walk_files("a")) == ["a/b/c.json", "a/b/d.bin"]
    with pytest.raises(FileNotFoundError):
        st.read_bytes("a/b/missing.json")
    st.delete_tree("a")
    assert not st.exists("a/b/c.json")
    with pytest.raises(StorageError):
        st.delete_tree("")


def test_put_if_absent_is_create_only(lake):
    st = lake.storage
    assert st.put_if_absent("p/000001.json", b"first")
    assert not st.put_if_absent("p/000001.json", b"second")
    assert st.read_bytes("p/000001.json") == b"first"


def test_put_if_absent_race_has_one_winner(lake):
    st = lake.storage
    wins: list[int] = []
    barrier = threading.Barrier(8)

    def racer(i: int) -> None:
        barrier.wait()
        if st.put_if_absent("race/key.json", f"writer {i}".encode()):
            wins.append(i)

    threads = [threading.Thread(target=racer, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(wins) == 1
    assert st.read_text("race/key.json") == f"writer {wins[0]}"


def test_same_settings_reach_lake_from_every_client(lake):
    """pyarrow, fsspec/UPath and DuckDB all see the object written through the storage layer."""
    import duckdb  # noqa: F401
    import pyarrow as pa
    import pyarrow.parquet as pq

    from dac_lake.duckdb_io import new_connection

    st = lake.storage
    st.make_dirs("t")
    pq.write_table(pa.table({"x": [1, 2, 3]}), st.path("t/x.parquet"), filesystem=st.pa_fs)
    assert st.upath("t/x.parquet").exists()
    assert st.fsspec.exists(st.path("t/x.parquet"))
    con = new_connection(st)
    assert con.execute("SELECT sum(x) FROM read_parquet(?)", [st.url_of("t/x.parquet")]).fetchone()[0] == 6


def test_s3_wrong_keys_give_clear_error(lake_url):
    if not lake_url.startswith("s3://"):
        pytest.skip("S3 only")
    settings = load_settings(s3_secret_access_key="wrong-secret")
    st = LakeStorage(lake_url, settings)
    with pytest.raises(Exception, match=r"(?i)signature|access denied|forbidden|403"):
        st.ensure_root()
        st.write_text("x.json", "{}")
