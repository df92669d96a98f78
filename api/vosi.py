"""VOSI 1.1 documents (tables, capabilities, availability) and DALI examples, as XML text (pure).

Built from the standards: VOSI 1.1 (tables with detail=min and per-table resources), VODataService 1.1
(`vs:Table`, `vs:TableParam` columns with `vs:VOTableType`), TAPRegExt 1.0 (`tr:TableAccess`: languages
and their features, output formats, upload methods, limits), DALI 1.1 examples (XHTML + RDFa).
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import UTC, datetime
from xml.sax.saxutils import escape, quoteattr

from api.config import ServiceSettings
from api.tap_schema import ColumnInfo, SchemaInfo, TableInfo

XSI = "http://www.w3.org/2001/XMLSchema-instance"
VS = "http://www.ivoa.net/xml/VODataService/v1.1"
VR = "http://www.ivoa.net/xml/VOResource/v1.0"
TR = "http://www.ivoa.net/xml/TAPRegExt/v1.0"
VOSI_TABLES = "http://www.ivoa.net/xml/VOSITables/v1.0"
VOSI_CAPS = "http://www.ivoa.net/xml/VOSICapabilities/v1.0"
VOSI_AVAIL = "http://www.ivoa.net/xml/VOSIAvailability/v1.0"
FEATURES = "ivo://ivoa.net/std/TAPRegExt#features-"

#: the ADQL 2.1 optional features the translator implements (dac_lake/adql), by TAPRegExt feature type
LANGUAGE_FEATURES: dict[str, list[tuple[str, str]]] = {
    "adqlgeo": [
        (f, "")
        for f in (
            "POINT",
            "CIRCLE",
            "BOX",
            "POLYGON",
            "CONTAINS",
            "INTERSECTS",
            "DISTANCE",
            "AREA",
            "COORD1",
            "COORD2",
            "COORDSYS",
            "CENTROID",
        )
    ],
    "adql-string": [("LOWER", ""), ("UPPER", ""), ("ILIKE", "case-insensitive LIKE")],
    "adql-offset": [("OFFSET", "")],
    "adql-type": [("CAST", "")],
    "adql-unit": [("IN_UNIT", "converts a column with a known unit (from the catalog definition)")],
    "adql-common-table": [("WITH", "")],
    "adql-sets": [("UNION", ""), ("EXCEPT", ""), ("INTERSECT", "")],
    "adql-bitwise": [("BIT_AND", "&"), ("BIT_OR", "|"), ("BIT_XOR", "^"), ("BIT_NOT", "~")],
    "udf": [
        (
            "ivo_healpix_index(order INTEGER, ra DOUBLE, dec DOUBLE) -> BIGINT",
            "the nested HEALPix index of a position (ICRS degrees) at the given order (0-29)",
        )
    ],
}


def _x(tag: str, text: str | None, **attrs: str) -> str:
    a = "".join(f" {k.replace('_', '-')}={quoteattr(v)}" for k, v in attrs.items() if v)
    return f"<{tag}{a}>{escape(text or '')}</{tag}>"


def _column(col: ColumnInfo) -> str:
    datatype, arraysize, xtype = col.votable
    dtype_attrs = f' xsi:type="vs:VOTableType"{f" arraysize={quoteattr(arraysize)}" if arraysize else ""}'
    if xtype:
        dtype_attrs += f" extendedType={quoteattr(xtype)}"
    parts = [_x("name", col.name), _x("description", col.description) if col.description else ""]
    parts += [_x("unit", col.unit) if col.unit else "", _x("ucd", col.ucd) if col.ucd else ""]
    parts += [_x("utype", col.utype) if col.utype else ""]
    parts.append(f"<dataType{dtype_attrs}>{escape(datatype)}</dataType>")
    if col.indexed:
        parts.append("<flag>indexed</flag>")
    if col.principal:
        parts.append("<flag>principal</flag>")
    std = ' std="true"' if col.std else ""
    return f"<column{std}>{''.join(parts)}</column>"


def _table(table: TableInfo, detail: bool = True, root: bool = False) -> str:
    tag = "vosi:table" if root else "table"
    ns = f' xmlns:vosi="{VOSI_TABLES}" xmlns:vs="{VS}" xmlns:xsi="{XSI}"' if root else ""
    body = [_x("name", table.qualified_name)]
    if table.description:
        body.append(_x("description", table.description))
    if detail:
        body.extend(_column(c) for c in table.columns)
        for target, src, dst in table.foreign_keys:
            body.append(
                f"<foreignKey>{_x('targetTable', target)}<fkColumn>{_x('fromColumn', src)}"
                f"{_x('targetColumn', dst)}</fkColumn></foreignKey>"
            )
    return f"<{tag}{ns}>{''.join(body)}</{tag}>"


def tableset_xml(schemas: Sequence[SchemaInfo], detail: bool = True) -> str:
    """`/tables`: every schema and table the caller may read (`detail=False`: VOSI 1.1 detail=min)."""
    out = [
        '<?xml version="1.0" encoding="UTF-8"?>',
        f'<vosi:tableset xmlns:vosi="{VOSI_TABLES}" xmlns:vs="{VS}" xmlns:xsi="{XSI}">',
    ]
    for schema in schemas:
        out.append("<schema>" + _x("name", schema.name))
        if schema.description:
            out.append(_x("description", schema.description))
        out.extend(_table(t, detail) for t in schema.tables)
        out.append("</schema>")
    out.append("</vosi:tableset>")
    return "\n".join(out)


def table_xml(table: TableInfo) -> str:
    """`/tables/<schema.table>`: one table with its columns (VOSI 1.1)."""
    return '<?xml version="1.0" encoding="UTF-8"?>\n' + _table(table, detail=True, root=True)


def _cap(standard_id: str, url: str, extra: str = "") -> str:
    return (
        f"<capability standardID={quoteattr(standard_id)}>"
        f'<interface xsi:type="vs:ParamHTTP"><accessURL use="full">{escape(url)}</accessURL></interface>'
        f"{extra}</capability>"
    )


def capabilities_xml(base: str, settings: ServiceSettings, formats: Sequence, scs: Sequence[str]) -> str:
    """`/tap/capabilities`: TAP 1.1 (TAPRegExt), VOSI, DALI examples and one SCS capability per catalog.

    `formats`: `api.formats.CapabilityFormat`s (mime, aliases, ivo_id); `scs`: catalogs served by /scs.
    """
    tap = f"{base}/tap"
    features = []
    for kind, items in LANGUAGE_FEATURES.items():
        feats = "".join(
            "<feature>" + _x("form", form) + (_x("description", d) if d else "") + "</feature>"
            for form, d in items
        )
        features.append(f'<languageFeatures type="{FEATURES}{kind}">{feats}</languageFeatures>')
    outputs = []
    for f in formats:
        ivo = f" ivo-id={quoteattr(f.ivo_id)}" if f.ivo_id else ""
        aliases = "".join(_x("alias", a) for a in f.aliases)
        outputs.append(f"<outputFormat{ivo}>{_x('mime', f.mime)}{aliases}</outputFormat>")
    retention = int(settings.destruction_days * 86400)
    tap_cap = (
        '<capability standardID="ivo://ivoa.net/std/TAP" xsi:type="tr:TableAccess">'
        '<interface xsi:type="vs:ParamHTTP" role="std" version="1.1">'
        f'<accessURL use="base">{escape(tap)}</accessURL></interface>'
        "<language><name>ADQL</name>"
        '<version ivo-id="ivo://ivoa.net/std/ADQL#v2.1">2.1</version>'
        '<version ivo-id="ivo://ivoa.net/std/ADQL#v2.0">2.0</version>'
        "<description>ADQL 2.1, translated to DuckDB SQL over HEALPix-partitioned Parquet; spatial "
        "constraints prune partitions</description>"
        + "".join(features)
        + "</language>"
        + "".join(outputs)
        + '<uploadMethod ivo-id="ivo://ivoa.net/std/TAPRegExt#upload-inline"/>'
        + '<uploadMethod ivo-id="ivo://ivoa.net/std/TAPRegExt#upload-http"/>'
        + f"<retentionPeriod><default>{retention}</default><hard>{retention}</hard></retentionPeriod>"
        + f"<executionDuration><default>{settings.async_duration_default_s}</default>"
        + f"<hard>{settings.async_duration_max_s}</hard></executionDuration>"
        + f'<outputLimit><default unit="row">{settings.maxrec_default}</default>'
        + f'<hard unit="row">{settings.maxrec_max}</hard></outputLimit>'
        + f'<uploadLimit><default unit="byte">{settings.upload_max_bytes}</default>'
        + f'<hard unit="byte">{settings.upload_max_bytes}</hard></uploadLimit>'
        + "</capability>"
    )
    caps = [
        tap_cap,
        _cap("ivo://ivoa.net/std/VOSI#capabilities", f"{tap}/capabilities"),
        _cap("ivo://ivoa.net/std/VOSI#availability", f"{tap}/availability"),
        _cap("ivo://ivoa.net/std/VOSI#tables-1.1", f"{tap}/tables"),
        _cap("ivo://ivoa.net/std/DALI#examples", f"{tap}/examples"),
    ]
    return (
        '<?xml version="1.0" encoding="UTF-8"?>\n'
        f'<vosi:capabilities xmlns:vosi="{VOSI_CAPS}" xmlns:vs="{VS}" xmlns:vr="{VR}" '
        f'xmlns:tr="{TR}" xmlns:xsi="{XSI}">\n' + "\n".join(caps) + "\n</vosi:capabilities>"
    )


def availability_xml(available: bool, up_since: float, note: str) -> str:
    since = datetime.fromtimestamp(up_since, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    return (
        '<?xml version="1.0" encoding="UTF-8"?>\n'
        f'<vosi:availability xmlns:vosi="{VOSI_AVAIL}">'
        f"<vosi:available>{'true' if available else 'false'}</vosi:available>"
        f"<vosi:upSince>{since}</vosi:upSince>"
        f"<vosi:note>{escape(note)}</vosi:note></vosi:availability>"
    )


def examples_xhtml(title: str, examples: Sequence[tuple[str, str, str, Sequence[str]]]) -> str:
    """DALI 1.1 examples: (id, name, ADQL, tables) each, as XHTML with the RDFa the standard defines."""
    items = []
    for ex_id, name, query, tables in examples:
        tables_html = "".join(f'<li><span property="table">{escape(t)}</span></li>' for t in tables)
        items.append(
            f'<div typeof="example" id={quoteattr(ex_id)} resource={quoteattr("#" + ex_id)}>'
            f'<h2 property="name">{escape(name)}</h2>'
            f'<pre class="dachs-ex-tapquery" property="query">{escape(query)}</pre>'
            f"<p>Tables:</p><ul>{tables_html}</ul></div>"
        )
    return (
        '<?xml version="1.0" encoding="UTF-8"?>\n'
        '<!DOCTYPE html PUBLIC "-//W3C//DTD XHTML+RDFa 1.1//EN" '
        '"http://www.w3.org/MarkUp/DTD/xhtml-rdfa-2.dtd">\n'
        '<html xmlns="http://www.w3.org/1999/xhtml" xml:lang="en">'
        f"<head><title>{escape(title)}: examples</title></head>"
        f'<body vocab="http://www.ivoa.net/rdf/examples#"><h1>{escape(title)}: example queries</h1>'
        + "".join(items)
        + "</body></html>"
    )
