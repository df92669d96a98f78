"""DALI 1.1 error documents and the one exception the TAP routers raise.

DALI 1.1 and TAP 1.1 ('Errors'): an error is a VOTable whose `RESOURCE type="results"` carries
`<INFO name="QUERY_STATUS" value="ERROR">human message</INFO>`. The message is what a person reads in
TOPCAT or in pyvo's `DALQueryError`, so it is kept verbatim (only made XML-safe).

The XML helpers here (`xml_text`, `xml_attr`) are shared by the VOTable writer: one place decides how a
Python string becomes legal XML 1.0 (which cannot carry most C0 control characters even as references).
"""

from __future__ import annotations

import re

VOTABLE_VERSION = "1.4"
#: VOTable 1.4, document structure: "All VOTable 1.4 elements come from the namespace http://www.ivoa.net/xml/VOTable/v1.3"
VOTABLE_NS = "http://www.ivoa.net/xml/VOTable/v1.3"
VOTABLE_XSD = "http://www.ivoa.net/xml/VOTable/votable-1.4.xsd"

XML_DECL = '<?xml version="1.0" encoding="UTF-8"?>\n'
VOTABLE_OPEN = (
    f'<VOTABLE version="{VOTABLE_VERSION}" xmlns="{VOTABLE_NS}" '
    'xmlns:xsi="http://www.w3.org/2001/XMLSchema-instance" '
    f'xsi:schemaLocation="{VOTABLE_NS} {VOTABLE_XSD}">\n'
)

# Characters XML 1.0 forbids outright (not even as &#n; references): C0 controls except TAB/LF/CR, and the
# non-characters U+FFFE/U+FFFF. Lone surrogates cannot be encoded in UTF-8 at all.
_XML_ILLEGAL = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\ufffe\uffff\ud800-\udfff]")
_TEXT_ESCAPES = {"&": "&amp;", "<": "&lt;", ">": "&gt;", "\r": "&#13;"}
_ATTR_ESCAPES = {**_TEXT_ESCAPES, '"': "&quot;", "\n": "&#10;", "\t": "&#9;"}
_TEXT_RE = re.compile("[&<>\r]")
_ATTR_RE = re.compile('[&<>\r"\n\t]')


def xml_legal(text: str) -> str:
    """`text` with the characters XML 1.0 cannot carry replaced by U+FFFD (so a bad byte in the data never
    makes the whole document unparseable)."""
    return _XML_ILLEGAL.sub("\ufffd", text)


def xml_text(text: str) -> str:
    """Escape element content. CR is written as a reference because parsers normalise a literal CR away."""
    return _TEXT_RE.sub(lambda m: _TEXT_ESCAPES[m.group()], xml_legal(text))


def xml_attr(text: str) -> str:
    """Escape an attribute value (for use inside double quotes). TAB/LF are written as references because
    attribute-value normalisation would otherwise turn them into spaces (the QUERY text keeps its lines)."""
    return _ATTR_RE.sub(lambda m: _ATTR_ESCAPES[m.group()], xml_legal(text))


#: HTTP statuses the routers use, and why (TAP 1.1 and DALI 1.1, 'Errors').
HTTP_STATUS_REASONS = {
    400: "bad request (invalid parameter, ADQL error, unreadable upload)",
    401: "authentication required",
    403: "not allowed",
    404: "unknown job or resource",
    413: "upload too large",
    500: "server error",
    503: "service overloaded or unavailable",
}


class TapError(Exception):
    """A failure to report to the client as a DALI error document.

    `message` is for a person (what went wrong and, where possible, what to do about it); `http_status` is
    the status of a sync response: 400 bad input / ADQL errors, 401/403 auth, 404 unknown job, 413 upload
    too large, 500 server fault, 503 overloaded. (Async jobs serve the same document from /error with 200.)
    """

    def __init__(self, message: str, http_status: int = 400) -> None:
        if http_status not in HTTP_STATUS_REASONS:
            raise ValueError(f"unexpected HTTP status for a TAP error: {http_status}")
        super().__init__(message)
        self.message = message
        self.http_status = http_status

    def to_votable(self) -> bytes:
        """This error as a DALI error VOTable."""
        return dali_error_votable(self.message)

    def __repr__(self) -> str:
        return f"TapError({self.message!r}, http_status={self.http_status})"


def dali_error_votable(message: str, *, query_status: str = "ERROR") -> bytes:
    """A complete DALI error document: one `RESOURCE type="results"` whose `QUERY_STATUS` INFO carries the
    message as its content (DALI 'Use of VOTable': "the content of the INFO element conveying the status
    should be a message suitable for display to the user")."""
    doc = (
        XML_DECL
        + VOTABLE_OPEN
        + '<RESOURCE type="results">\n'
        + f'<INFO name="QUERY_STATUS" value="{xml_attr(query_status)}">{xml_text(message)}</INFO>\n'
        + "</RESOURCE>\n</VOTABLE>\n"
    )
    return doc.encode("utf-8")
