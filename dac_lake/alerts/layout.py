"""Names of things in an alert stream's part of the lake (DESIGN.md section 2). Pure: no I/O.

```
alerts/<stream>/
  stream.json                          stream config: HEALPix order, groups, table definitions (create-only)
  snapshots/000123.json                create-only, sequence-numbered snapshots: newest wins
  <table>/                             a HATS catalog (detections, objects, upper_limits, alerts):
      hats.properties, properties      hats_npix_suffix=/ : each partition is a directory of files
      partition_info.csv
      dataset/_common_metadata
      dataset/Norder=5/Dir=0/Npix=N/<file>.parquet
      dataset/Norder=6/Dir=0/Npix=M/<file>.parquet   a crowded partition split by compaction (mixed orders)
```

Partitions are named by their NUNIQ key, `4 * 4**order + pixel` (`partition_key`): one integer that says
both the order and the pixel, so the partitions of a table may be at several orders (HATS-style: a crowded
order-5 pixel is replaced by its four order-6 children) without two partitions ever sharing a key.

One module for these names means the writer, gc, compaction and the query registry cannot disagree.
"""

from __future__ import annotations

import re

from dac_lake.layout import check_catalog_name, pointer_seq

ALERTS_PREFIX = "alerts"
STREAM_FILE = "stream.json"
SNAPSHOTS_DIR = "snapshots"

DETECTIONS = "detections"
OBJECTS = "objects"
UPPER_LIMITS = "upper_limits"
ALERTS = "alerts"
#: every table a stream may have, in the order they are written and listed
TABLES: tuple[str, ...] = (DETECTIONS, OBJECTS, UPPER_LIMITS, ALERTS)

#: default HEALPix order of a stream's partitions: ~1.8 deg pixels, 12,288 over the sky. A ZTF field
#: (47 deg^2) touches ~20 of them, a Rubin visit (9.6 deg^2) ~5: a batch writes few, fairly large files.
DEFAULT_ORDER = 5
#: the finest order a partition may have (a stream's order, or a split partition's): order-10 pixels are
#: ~3.4' wide, still larger than the order-11 cells the writer's neighbourhood look-ups are made of
MAX_ORDER = 10

_BATCH_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:=+-]{0,199}$")
_FILE_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,250}\.parquet$")


def check_stream_name(name: str) -> str:
    """Stream names become ADQL schema names (`ztf.detections`): the same rule as catalog names."""
    return check_catalog_name(name)


def check_table_name(name: str) -> str:
    if name not in TABLES:
        raise ValueError(f"unknown alert table {name!r}: one of {', '.join(TABLES)}")
    return name


def check_order(order: int) -> int:
    if not isinstance(order, int) or not 0 <= order <= MAX_ORDER:
        raise ValueError(f"HEALPix order {order!r} of an alert stream must be an integer in 0..{MAX_ORDER}")
    return order


def check_batch_id(batch_id: str) -> str:
    """Batch ids end up in file names and snapshots: letters, digits and `._:=+-`, at most 200 chars,
    starting with a letter or digit (a leading '.' or '_' would hide a file from pyarrow's readers)."""
    if not isinstance(batch_id, str) or not _BATCH_RE.match(batch_id):
        raise ValueError(
            f"batch id {batch_id!r} is not valid: use 1-200 letters, digits or '._:=+-', "
            "starting with a letter or digit"
        )
    return batch_id


def stream_prefix(stream: str) -> str:
    return f"{ALERTS_PREFIX}/{check_stream_name(stream)}"


def stream_file(stream: str) -> str:
    return f"{stream_prefix(stream)}/{STREAM_FILE}"


def snapshots_prefix(stream: str) -> str:
    return f"{stream_prefix(stream)}/{SNAPSHOTS_DIR}"


def snapshot_key(stream: str, seq: int) -> str:
    return f"{snapshots_prefix(stream)}/{seq:06d}.json"


def snapshot_seq(name: str) -> int | None:
    """The sequence number of a snapshot object's file name, None for anything else."""
    return pointer_seq(name)


def table_prefix(stream: str, table: str) -> str:
    return f"{stream_prefix(stream)}/{check_table_name(table)}"


def dataset_prefix(stream: str, table: str) -> str:
    return f"{table_prefix(stream, table)}/dataset"


def partition_key(order: int, pixel: int) -> int:
    """The NUNIQ key of partition (order, pixel): `4 * 4**order + pixel`, unique across orders."""
    return (4 << (2 * int(order))) + int(pixel)


def order_pixel(key: int) -> tuple[int, int]:
    """(order, pixel) of a NUNIQ partition key (keys of order k lie in [4 * 4**k, 16 * 4**k))."""
    key = int(key)
    if key < 4:
        raise ValueError(f"{key} is not a NUNIQ partition key")
    order = (key.bit_length() - 3) // 2
    return order, key - (4 << (2 * order))


def key_name(key: int) -> str:
    """`order/pixel`: how snapshots and the query registry write a partition key."""
    order, pixel = order_pixel(key)
    return f"{order}/{pixel}"


def parse_key_name(text: str) -> int:
    order, pixel = text.split("/")
    return partition_key(int(order), int(pixel))


def children_keys(key: int) -> list[int]:
    """The keys of the four order+1 children of a partition (nested scheme: pixels 4p .. 4p+3)."""
    order, pixel = order_pixel(key)
    return [partition_key(order + 1, 4 * pixel + i) for i in range(4)]


def key_range29(key: int) -> tuple[int, int]:
    """The `_healpix_29` span [lo, hi) of a partition."""
    order, pixel = order_pixel(key)
    shift = 2 * (29 - order)
    return pixel << shift, (pixel + 1) << shift


def pixel_dir(order: int, pixel: int) -> str:
    """A partition directory relative to `dataset/` (HATS 1.0 names, `hats_npix_suffix=/`)."""
    return f"Norder={order}/Dir={(pixel // 10_000) * 10_000}/Npix={pixel}"


def data_file(stream: str, table: str, order: int, pixel: int, name: str) -> str:
    """The lake path of data file `name` of partition (order, pixel): HATS names at the partition's own
    order, so a split partition's children sit in `Norder=<order+1>` folders."""
    return f"{dataset_prefix(stream, table)}/{pixel_dir(order, pixel)}/{check_file_name(name)}"


def check_file_name(name: str) -> str:
    if not _FILE_RE.match(name):
        raise ValueError(f"{name!r} is not a data file name of an alert table")
    return name


def batch_file_name(seq: int, batch_id: str, token: str) -> str:
    """`000124-<batch-id>-<token>.parquet`: the snapshot it was written for (so a listing reads in commit
    order), the batch it holds, and a random token so that a retried or concurrent attempt of the same
    batch never overwrites a file another snapshot may reference."""
    safe = re.sub(r"[^A-Za-z0-9._-]", "_", check_batch_id(batch_id))[:120]
    return check_file_name(f"{seq:06d}-{safe}-{token}.parquet")


def key_file(stream: str, table: str, key: int, name: str) -> str:
    """The lake path of data file `name` of the partition with NUNIQ `key`."""
    return data_file(stream, table, *order_pixel(key), name)


def compacted_file_name(seq: int, token: str) -> str:
    """`000130-compact-<token>.parquet`: the merge of a partition's files, written for snapshot `seq`."""
    return check_file_name(f"{seq:06d}-compact-{token}.parquet")


def pixel_of_path(rel: str) -> tuple[int, int] | None:
    """(order, pixel) of a data file path `.../Norder=K/Dir=D/Npix=N/<file>`; None for anything else."""
    parts = rel.split("/")
    if len(parts) < 4:
        return None
    try:
        norder, ndir, npix = parts[-4], parts[-3], parts[-2]
        if not (norder.startswith("Norder=") and ndir.startswith("Dir=") and npix.startswith("Npix=")):
            return None
        return int(norder[7:]), int(npix[5:])
    except ValueError:
        return None
