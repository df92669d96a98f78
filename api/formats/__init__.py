"""Output formats of the TAP service: streaming VOTable/CSV/TSV/JSON/FITS/Parquet writers, DALI error
documents, the RESPONSEFORMAT registry, and the parser of uploaded VOTables.

Every writer takes `(columns, schema, batches, *, overflow=None, infos=None, query=None)` and yields bytes;
`resolve_format(RESPONSEFORMAT)` picks one (with the Content-Type to send), `TapError` is what routers raise.
"""

from .dali import TapError, dali_error_votable
from .tabular import (
    ALIASES,
    FORMATS,
    CapabilityFormat,
    OutputFormat,
    accepted_values,
    capability_formats,
    csv_chunks,
    fits_chunks,
    json_chunks,
    parquet_chunks,
    resolve_format,
    tsv_chunks,
)
from .upload import UploadTable, guess_position, parse_votable_upload
from .votable import votable_chunks

__all__ = [
    "ALIASES",
    "FORMATS",
    "CapabilityFormat",
    "OutputFormat",
    "TapError",
    "UploadTable",
    "accepted_values",
    "capability_formats",
    "csv_chunks",
    "dali_error_votable",
    "fits_chunks",
    "guess_position",
    "json_chunks",
    "parquet_chunks",
    "parse_votable_upload",
    "resolve_format",
    "tsv_chunks",
    "votable_chunks",
]
