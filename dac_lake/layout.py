"""Names of things in the lake (DESIGN.md section 2). Pure: no I/O.

Keeping every path in one module means the CLI, ingest, gc and the query engine cannot disagree about
where a release or its pointer lives.
"""

from __future__ import annotations

import re

LAKE_FILE = "lake.json"
LAKE_FORMAT = "dac-lake"
LAKE_VERSION = 1

#: written first into a release prefix, removed only after the release is published (or found complete)
INCOMPLETE_MARKER = "_dac_incomplete.json"
#: written when a release has been fully validated: what it holds, per-partition counts, provenance
RELEASE_MANIFEST = "_dac_release.json"
#: the catalog definition (columns, units, UCDs, groups) the release was validated against
DEFINITION_FILE = "catalog_definition.json"

_NAME_RE = re.compile(r"^[a-z][a-z0-9_]{0,62}$")
_RELEASE_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,62}$")
_POINTER_RE = re.compile(r"^(\d{6,})\.json$")


def check_catalog_name(name: str) -> str:
    """Catalog names become SQL schema names and folder names: lowercase identifiers only."""
    if not _NAME_RE.match(name):
        raise ValueError(
            f"catalog name {name!r} is not valid: use 1-63 lowercase letters, digits or '_', "
            "starting with a letter"
        )
    return name


def check_release_name(name: str) -> str:
    """Release names (dr1, v2.0, 2026-11-25) become folder names; no '/' or leading dot."""
    if not _RELEASE_RE.match(name):
        raise ValueError(
            f"release name {name!r} is not valid: use 1-63 letters, digits, '.', '_' or '-', "
            "not starting with '.' or '-'"
        )
    return name


def catalogs_prefix() -> str:
    return "catalogs"


def catalog_prefix(catalog: str) -> str:
    return f"catalogs/{check_catalog_name(catalog)}"


def pointer_prefix(catalog: str) -> str:
    return f"{catalog_prefix(catalog)}/current"


def pointer_key(catalog: str, seq: int) -> str:
    return f"{pointer_prefix(catalog)}/{seq:06d}.json"


def pointer_seq(name: str) -> int | None:
    """The sequence number of a pointer object's file name, None for anything else."""
    m = _POINTER_RE.match(name)
    return int(m.group(1)) if m else None


def releases_prefix(catalog: str) -> str:
    return f"{catalog_prefix(catalog)}/releases"


def release_prefix(catalog: str, release: str) -> str:
    return f"{releases_prefix(catalog)}/{check_release_name(release)}"


def margin_name(catalog: str, margin_arcsec: float) -> str:
    """HATS margin catalog name, spelled as hats-import spells it: demo_10arcs, demo_2arcmin, demo_500msec."""
    if margin_arcsec >= 3600:
        text = f"{int(margin_arcsec / 3600)}deg"
    elif margin_arcsec >= 60:
        text = f"{int(margin_arcsec / 60)}arcmin"
    elif margin_arcsec >= 1:
        text = f"{int(margin_arcsec)}arcs"
    else:
        text = f"{int(margin_arcsec * 1000)}msec"
    return f"{catalog}_{text}"


def index_name(catalog: str, column: str) -> str:
    return f"{catalog}_{column}_index"


def pixel_file(order: int, pixel: int) -> str:
    """Path of a partition file relative to a catalog's `dataset/` folder (HATS 1.0 naming)."""
    return f"Norder={order}/Dir={(pixel // 10_000) * 10_000}/Npix={pixel}.parquet"
