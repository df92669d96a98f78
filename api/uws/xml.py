"""UWS 1.1 XML documents: job list, job, results, parameters (namespace http://www.ivoa.net/xml/UWS/v1.0).

Element order and nil-ability follow the UWS 1.1 REC schema (UWS.xsd, version 1.1-REC-20161024):
`uws:job` = jobId, runId?, ownerId (nillable), phase, quote? (nillable), creationTime?, startTime (nillable),
endTime (nillable), executionDuration, destruction (nillable), parameters?, results, errorSummary?, jobInfo?;
`uws:jobref` = phase, runId?, ownerId? (nillable), creationTime?. Documents are written as text (not via
ElementTree) so the prefixes are the conventional `uws:`/`xlink:` that older clients grep for.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from datetime import UTC, datetime
from urllib.parse import quote
from xml.sax.saxutils import escape, quoteattr

from api.uws.store import ErrorSummary, Job, JobResult, Parameters

UWS_NS = "http://www.ivoa.net/xml/UWS/v1.0"
XLINK_NS = "http://www.w3.org/1999/xlink"
XSI_NS = "http://www.w3.org/2001/XMLSchema-instance"
#: the namespace UWS.xsd allows for extra attributes of uws:result (we put `rows` there)
UWSCUSTOM_NS = "urn:uwscustom"
UWS_VERSION = "1.1"
MEDIA_TYPE = "application/xml"

_NAMESPACES = f'xmlns:uws="{UWS_NS}" xmlns:xlink="{XLINK_NS}" xmlns:xsi="{XSI_NS}"'
_HEADER = '<?xml version="1.0" encoding="UTF-8"?>\n'
# characters XML 1.0 cannot carry at all, even escaped; a parameter value may contain them
_NOT_XML = re.compile("[^\u0009\u000a\u000d\u0020-\ud7ff\ue000-\ufffd\U00010000-\U0010ffff]")


def _text(value: str) -> str:
    return escape(_NOT_XML.sub("\ufffd", value))


def _attr(value: str) -> str:
    return quoteattr(_NOT_XML.sub("\ufffd", value))


def format_datetime(when: datetime) -> str:
    """xs:dateTime in UTC with milliseconds, as DALI timestamps are written (pyvo reads it as isot)."""
    when = when.astimezone(UTC) if when.tzinfo is not None else when
    return when.strftime("%Y-%m-%dT%H:%M:%S.") + f"{when.microsecond // 1000:03d}Z"


def _time_element(name: str, when: datetime | None) -> str:
    if when is None:
        return f'<uws:{name} xsi:nil="true"/>'
    return f"<uws:{name}>{format_datetime(when)}</uws:{name}>"


def _owner_element(owner: str | None) -> str:
    if owner is None:
        return '<uws:ownerId xsi:nil="true"/>'
    return f"<uws:ownerId>{_text(owner)}</uws:ownerId>"


def result_href(job_url: str, result: JobResult) -> str:
    """Where a client fetches a result: an external href as is, a stored file through the job's URL."""
    if result.path is None and result.href:
        return result.href
    return f"{job_url}/results/{quote(result.id, safe='')}"


def _results_body(job: Job, job_url: str) -> str:
    if not job.results:
        return "<uws:results/>"
    lines = ["<uws:results>"]
    for r in job.results:
        attrs = [f"id={_attr(r.id)}", 'xlink:type="simple"', f"xlink:href={_attr(result_href(job_url, r))}"]
        if r.size is not None:
            attrs.append(f'size="{int(r.size)}"')
        if r.mime_type:
            attrs.append(f"mime-type={_attr(r.mime_type)}")
        if r.rows is not None:
            attrs.append(f'uwscustom:rows="{int(r.rows)}"')
        lines.append(f"  <uws:result {' '.join(attrs)}/>")
    lines.append("</uws:results>")
    return "\n".join(lines)


def _parameters_body(parameters: Parameters) -> str:
    if not len(parameters):
        return "<uws:parameters/>"
    lines = ["<uws:parameters>"]
    for name, value in parameters:
        lines.append(f"  <uws:parameter id={_attr(name)}>{_text(value)}</uws:parameter>")
    lines.append("</uws:parameters>")
    return "\n".join(lines)


def render_error_summary(error: ErrorSummary) -> str:
    """The `uws:errorSummary` element (it only exists inside `uws:job`)."""
    kind = error.type if error.type in ("transient", "fatal") else "fatal"
    return (
        f'<uws:errorSummary type="{kind}" hasDetail="{"true" if error.has_detail else "false"}">'
        f"<uws:message>{_text(error.message)}</uws:message></uws:errorSummary>"
    )


def render_job(job: Job, job_url: str) -> str:
    """The full `uws:job` document of GET /{jobs}/{job-id}."""
    parts = [
        f"<uws:jobId>{_text(job.job_id)}</uws:jobId>",
        *([f"<uws:runId>{_text(job.run_id)}</uws:runId>"] if job.run_id is not None else []),
        _owner_element(job.owner_id),
        f"<uws:phase>{job.phase.value}</uws:phase>",
        _time_element("quote", job.quote),
        _time_element("creationTime", job.creation_time),
        _time_element("startTime", job.start_time),
        _time_element("endTime", job.end_time),
        f"<uws:executionDuration>{int(job.execution_duration)}</uws:executionDuration>",
        _time_element("destruction", job.destruction),
        _parameters_body(job.parameters),
        _results_body(job, job_url),
    ]
    if job.error is not None:
        parts.append(render_error_summary(job.error))
    if job.progress:
        parts.append(f"<uws:jobInfo><progress>{_text(job.progress)}</progress></uws:jobInfo>")
    body = "\n".join("  " + line for p in parts for line in p.split("\n"))
    return (f'{_HEADER}<uws:job {_NAMESPACES} xmlns:uwscustom="{UWSCUSTOM_NS}" version="{UWS_VERSION}">\n'
            f"{body}\n</uws:job>\n")


def render_job_list(jobs: Iterable[Job], list_url: str) -> str:
    """The `uws:jobs` document of GET /{jobs}: one `uws:jobref` per job, linking to it."""
    lines = [f'{_HEADER}<uws:jobs {_NAMESPACES} version="{UWS_VERSION}">']
    for job in jobs:
        href = f"{list_url}/{job.job_id}"
        lines.append(f'  <uws:jobref id={_attr(job.job_id)} xlink:type="simple" xlink:href={_attr(href)}>')
        lines.append(f"    <uws:phase>{job.phase.value}</uws:phase>")
        if job.run_id is not None:
            lines.append(f"    <uws:runId>{_text(job.run_id)}</uws:runId>")
        lines.append(f"    {_owner_element(job.owner_id)}")
        lines.append(f"    {_time_element('creationTime', job.creation_time)}")
        lines.append("  </uws:jobref>")
    lines.append("</uws:jobs>\n")
    return "\n".join(lines)


def _standalone(fragment: str, extra_ns: str = "") -> str:
    """A fragment made a document: the namespace declarations go on its root element."""
    head, sep, rest = fragment.partition(">")
    closing = head.endswith("/")
    head = head[:-1] if closing else head
    return f"{_HEADER}{head} {_NAMESPACES}{extra_ns}{'/' if closing else ''}{sep}{rest}\n"


def render_results(job: Job, job_url: str) -> str:
    """The `uws:results` document of GET /{jobs}/{job-id}/results."""
    return _standalone(_results_body(job, job_url), f' xmlns:uwscustom="{UWSCUSTOM_NS}"')


def render_parameters(job: Job) -> str:
    """The `uws:parameters` document of GET /{jobs}/{job-id}/parameters."""
    return _standalone(_parameters_body(job.parameters))
