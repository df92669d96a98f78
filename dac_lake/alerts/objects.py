"""Per-object aggregates of an alert stream (the `objects` table). Pure: tables in, table out, no I/O.

`update_objects(previous, detections, batch_id)` folds a batch's *new* detections (already de-duplicated
against the lake, so each detection is counted once) into the objects' previous rows and returns one new row
per object of the batch. Every aggregate is chosen so that this incremental update gives exactly what a
computation over all detections at once would give (the tests compare with a brute-force pandas groupby):

- `ra`, `dec`: mean position, every detection weighted equally, averaged as unit vectors (so an object at
  RA 359.9/0.1 averages to ~0, not 180); the running sum is n * (unit vector of the previous mean).
- `first_mjd`, `last_mjd`, `n_detections`: over all detections, history included.
- per band b in u g r i z y, over detections with a finite magnitude: `mag_<b>_latest`, `mjd_<b>_latest`
  (the latest detection; latest = largest mjd, then largest detection_id), `mjd_<b>_prev` (the one before
  it) and `rate_<b>` = (mag_latest - mag_prev) / (mjd_latest - mjd_prev) in mag/day (positive: fading),
  null with fewer than two such detections. Keeping the previous epoch is what makes the rate exact under
  late or out-of-order history: a new detection changes the last two only if it is newer than `mjd_<b>_prev`.
- `n_bands`: bands (of the six) with at least one detection with a finite magnitude.
- `last_alert_id`, `last_alert_mjd`: the alert of the latest non-history detection (the newest alert).
- `updated_batch`: the batch that last changed the row.
Detections in other bands than u g r i z y count in the totals and the position only.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

BANDS: tuple[str, ...] = ("u", "g", "r", "i", "z", "y")
_INT_NULL = np.iinfo(np.int64).min


def band_columns(band: str) -> tuple[str, str, str, str]:
    return f"mag_{band}_latest", f"mjd_{band}_latest", f"mjd_{band}_prev", f"rate_{band}"


def objects_schema() -> pa.Schema:
    """Columns of the objects table as `update_objects` returns them (the lake adds `_healpix_29`)."""
    fields = [
        pa.field("object_id", pa.large_string(), nullable=False),
        pa.field("ra", pa.float64(), nullable=False),
        pa.field("dec", pa.float64(), nullable=False),
        pa.field("first_mjd", pa.float64(), nullable=False),
        pa.field("last_mjd", pa.float64(), nullable=False),
        pa.field("n_detections", pa.int32(), nullable=False),
        pa.field("n_bands", pa.int16(), nullable=False),
    ]
    for b in BANDS:
        mag, mjd, prev, rate = band_columns(b)
        fields += [
            pa.field(mag, pa.float32()),
            pa.field(mjd, pa.float64()),
            pa.field(prev, pa.float64()),
            pa.field(rate, pa.float32()),
        ]
    fields += [
        pa.field("last_alert_id", pa.int64()),
        pa.field("last_alert_mjd", pa.float64()),
        pa.field("updated_batch", pa.large_string(), nullable=False),
    ]
    return pa.schema(fields)


OBJECTS_SCHEMA = objects_schema()
DETECTION_INPUTS = ("detection_id", "object_id", "alert_id", "ra", "dec", "mjd", "band", "mag", "is_history")


def _floats(table: pa.Table, name: str) -> np.ndarray:
    col = table.column(name)
    return (
        pc.fill_null(col, np.nan).to_numpy().astype(np.float64)
        if col.null_count
        else (col.to_numpy().astype(np.float64))
    )


def _ints(table: pa.Table, name: str) -> np.ndarray:
    """int64 values with nulls as `_INT_NULL` (never through float64: survey ids exceed 2**53)."""
    col = table.column(name).cast(pa.int64())
    return pc.fill_null(col, _INT_NULL).to_numpy() if col.null_count else col.to_numpy()


def _codes(table: pa.Table, name: str) -> tuple[np.ndarray, pa.Array]:
    """A string column as integer codes and the distinct values (Arrow's dictionary encoding: no Python
    string objects, which would cost more than all the arithmetic below)."""
    enc = pc.dictionary_encode(table.column(name).combine_chunks())
    return enc.indices.to_numpy().astype(np.int64), enc.dictionary


def unit_vectors(ra_deg: np.ndarray, dec_deg: np.ndarray) -> np.ndarray:
    ra, dec = np.radians(ra_deg), np.radians(dec_deg)
    cd = np.cos(dec)
    return np.stack([cd * np.cos(ra), cd * np.sin(ra), np.sin(dec)], axis=1)


def vector_radec(v: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    ra = np.degrees(np.arctan2(v[:, 1], v[:, 0])) % 360.0
    dec = np.degrees(np.arctan2(v[:, 2], np.hypot(v[:, 0], v[:, 1])))
    return ra, dec


def _last_two(codes: np.ndarray, mjd: np.ndarray, tiebreak: np.ndarray, n: int):
    """Per group code (0..n-1): indices of the latest and the one-before-latest row by (mjd, tiebreak);
    -1 where there is none."""
    latest = np.full(n, -1, dtype=np.int64)
    before = np.full(n, -1, dtype=np.int64)
    if len(codes) == 0:
        return latest, before
    order = np.lexsort((tiebreak, mjd, codes))
    sc = codes[order]
    ends = np.flatnonzero(np.r_[sc[1:] != sc[:-1], True])
    latest[sc[ends]] = order[ends]
    # the row just before a group's last row belongs to the same group iff the group has 2+ rows
    prev = ends - 1
    same = prev >= 0
    same[same] = sc[prev[same]] == sc[ends[same]]
    before[sc[ends[same]]] = order[prev[same]]
    return latest, before


def update_objects(previous: pa.Table | None, detections: pa.Table, batch_id: str) -> pa.Table:
    """One new row per object that has a row in `detections` (new, de-duplicated detections), folding in
    the object's row of `previous` when it has one. Objects of `previous` without detections here are not
    returned (their rows do not change). `previous` may hold extra columns (e.g. `_healpix_29`)."""
    if detections.num_rows == 0:
        return OBJECTS_SCHEMA.empty_table()
    codes, uniques = _codes(detections, "object_id")
    n = len(uniques)
    ra, dec = _floats(detections, "ra"), _floats(detections, "dec")
    mjd = _floats(detections, "mjd")
    mag = _floats(detections, "mag")
    det_id = _ints(detections, "detection_id")
    alert_id = _ints(detections, "alert_id")
    band_codes, band_values = _codes(detections, "band")
    band_code = {v: i for i, v in enumerate(band_values.to_pylist())}
    history = detections.column("is_history").to_numpy(zero_copy_only=False).astype(bool)

    count = np.bincount(codes, minlength=n)
    vec = unit_vectors(ra, dec)
    vsum = np.stack([np.bincount(codes, weights=vec[:, k], minlength=n) for k in range(3)], axis=1)
    first = np.full(n, np.inf)
    np.minimum.at(first, codes, mjd)
    last = np.full(n, -np.inf)
    np.maximum.at(last, codes, mjd)

    # previous rows aligned to this batch's objects (NaN / _INT_NULL / False where the object is new)
    if previous is not None and previous.num_rows:
        found = pc.index_in(uniques, value_set=previous.column("object_id").combine_chunks())
        pos = pc.fill_null(found, -1).to_numpy().astype(np.int64)
    else:
        pos = np.full(n, -1, dtype=np.int64)
    known = pos >= 0

    def prev_f(name: str) -> np.ndarray:
        out = np.full(n, np.nan)
        if known.any():
            out[known] = _floats(previous, name)[pos[known]]
        return out

    def prev_i(name: str) -> np.ndarray:
        out = np.full(n, _INT_NULL, dtype=np.int64)
        if known.any():
            out[known] = _ints(previous, name)[pos[known]]
        return out

    n_prev = np.where(known, prev_i("n_detections"), 0)
    if known.any():
        vsum[known] += unit_vectors(prev_f("ra")[known], prev_f("dec")[known]) * n_prev[known, None]
    mean_ra, mean_dec = vector_radec(vsum)
    out: dict[str, object] = {
        "object_id": uniques.cast(pa.large_string()),
        "ra": mean_ra,
        "dec": mean_dec,
        "first_mjd": np.fmin(first, prev_f("first_mjd")),
        "last_mjd": np.fmax(last, prev_f("last_mjd")),
        "n_detections": (n_prev + count).astype(np.int32),
    }

    n_bands = np.zeros(n, dtype=np.int16)
    finite = np.isfinite(mag)
    for b in BANDS:
        cmag, cmjd, cprev, crate = band_columns(b)
        sel = np.flatnonzero((band_codes == band_code.get(b, -1)) & finite)
        i1, i2 = _last_two(codes[sel], mjd[sel], det_id[sel], n)
        n1_mjd = np.where(i1 >= 0, mjd[sel][i1], np.nan) if len(sel) else np.full(n, np.nan)
        n1_mag = np.where(i1 >= 0, mag[sel][i1], np.nan) if len(sel) else np.full(n, np.nan)
        n2_mjd = np.where(i2 >= 0, mjd[sel][i2], np.nan) if len(sel) else np.full(n, np.nan)
        n2_mag = np.where(i2 >= 0, mag[sel][i2], np.nan) if len(sel) else np.full(n, np.nan)
        l_mjd, l_mag, p_mjd, p_rate = prev_f(cmjd), prev_f(cmag), prev_f(cprev), prev_f(crate)
        # the stored last two stay the last two unless a new detection is at least as recent as the older
        keep = np.isfinite(p_mjd) & ~(n1_mjd >= p_mjd)
        cand_mjd = np.stack([l_mjd, n1_mjd, n2_mjd], axis=1)
        cand_mag = np.stack([l_mag, n1_mag, n2_mag], axis=1)
        key = np.where(np.isfinite(cand_mjd), cand_mjd, -np.inf)
        order = np.argsort(-key, axis=1, kind="stable")
        rows = np.arange(n)
        t1_mjd, t1_mag = cand_mjd[rows, order[:, 0]], cand_mag[rows, order[:, 0]]
        t2_mjd, t2_mag = cand_mjd[rows, order[:, 1]], cand_mag[rows, order[:, 1]]
        dt = t1_mjd - t2_mjd
        with np.errstate(invalid="ignore", divide="ignore"):
            rate = np.where(np.isfinite(dt) & (dt > 0), (t1_mag - t2_mag) / dt, np.nan)
        new_l_mjd = np.where(keep, l_mjd, t1_mjd)
        out[cmag] = np.where(keep, l_mag, t1_mag).astype(np.float32)
        out[cmjd] = new_l_mjd
        out[cprev] = np.where(keep, p_mjd, t2_mjd)
        out[crate] = np.where(keep, p_rate, rate).astype(np.float32)
        n_bands += np.isfinite(new_l_mjd).astype(np.int16)
    out["n_bands"] = n_bands

    sel = np.flatnonzero(~history)
    ia, _ = _last_two(codes[sel], mjd[sel], det_id[sel], n)
    new_a_mjd = np.where(ia >= 0, mjd[sel][ia], np.nan) if len(sel) else np.full(n, np.nan)
    new_a_id = np.where(ia >= 0, alert_id[sel][ia], _INT_NULL) if len(sel) else np.full(n, _INT_NULL)
    p_a_mjd, p_a_id = prev_f("last_alert_mjd"), prev_i("last_alert_id")
    take_new = np.isfinite(new_a_mjd) & ~(p_a_mjd > new_a_mjd)
    a_id = np.where(take_new, new_a_id, p_a_id)
    out["last_alert_id"] = pa.array(a_id, type=pa.int64(), mask=a_id == _INT_NULL)
    out["last_alert_mjd"] = np.where(take_new, new_a_mjd, p_a_mjd)
    out["updated_batch"] = pa.array([batch_id] * n, type=pa.large_string())

    arrays = []
    for f in OBJECTS_SCHEMA:
        value = out[f.name]
        if isinstance(value, pa.Array):
            arrays.append(value.cast(f.type))
        else:
            value = np.asarray(value)
            mask = ~np.isfinite(value) if value.dtype.kind == "f" else None
            arrays.append(pa.array(value, type=f.type, mask=mask))
    return pa.Table.from_arrays(arrays, schema=OBJECTS_SCHEMA)
