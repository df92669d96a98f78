"""Annotations that external classifiers post about alert objects, kept in the lake (Lasair's annotations).

One small JSON object per annotation under `alerts/<stream>/annotations/<object>/<time>-<id>.json`:
written once (create-only), never modified, so concurrent classifiers never overwrite each other, and the
history of classifications is kept. Reading an object's annotations is one listing of its folder.
"""

from __future__ import annotations

import json
import math
import re
import uuid
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from typing import Any

from dac_lake.storage import LakeStorage

_SAFE = re.compile(r"^[A-Za-z0-9_.:+-]{1,128}$")
MAX_DATA_BYTES = 64 * 1024


class AnnotationError(ValueError):
    """An annotation that cannot be stored; the message says which field and why."""


@dataclass(frozen=True)
class Annotation:
    object_id: str
    classifier: str
    classification: str
    probability: float | None = None
    url: str | None = None
    data: dict[str, Any] = field(default_factory=dict)
    author: str | None = None
    time: str = ""
    id: str = ""

    @classmethod
    def from_request(cls, object_id: str, body: dict[str, Any], author: str | None) -> Annotation:
        """Validate a posted annotation (JSON object)."""
        if not isinstance(body, dict):
            raise AnnotationError("the body must be a JSON object")
        unknown = set(body) - {"classifier", "classification", "probability", "url", "data"}
        if unknown:
            raise AnnotationError(
                f"unknown fields {sorted(unknown)}; use classifier, classification, probability, url, data"
            )
        classifier = body.get("classifier")
        if not isinstance(classifier, str) or not _SAFE.match(classifier):
            raise AnnotationError("classifier: a name of 1-128 letters, digits or _ . : + -")
        classification = body.get("classification")
        if not isinstance(classification, str) or not classification.strip() or len(classification) > 256:
            raise AnnotationError("classification: a non-empty text of at most 256 characters")
        probability = body.get("probability")
        if probability is not None:
            if (
                not isinstance(probability, int | float)
                or not math.isfinite(probability)
                or not 0 <= probability <= 1
            ):
                raise AnnotationError("probability: a number between 0 and 1")
            probability = float(probability)
        url = body.get("url")
        if url is not None and (
            not isinstance(url, str) or not url.startswith(("http://", "https://")) or len(url) > 2048
        ):
            raise AnnotationError("url: an http(s) URL of at most 2048 characters")
        data = body.get("data") or {}
        if not isinstance(data, dict):
            raise AnnotationError("data: a JSON object")
        if len(json.dumps(data)) > MAX_DATA_BYTES:
            raise AnnotationError(f"data: at most {MAX_DATA_BYTES:,} bytes of JSON")
        now = datetime.now(UTC)
        return cls(
            object_id=object_id,
            classifier=classifier,
            classification=classification.strip(),
            probability=probability,
            url=url,
            data=data,
            author=author,
            time=now.strftime("%Y-%m-%dT%H:%M:%S.%fZ"),
            id=uuid.uuid4().hex[:12],
        )


def _folder(stream: str, object_id: str) -> str:
    if not _SAFE.match(stream) or not _SAFE.match(object_id):
        raise AnnotationError(f"bad stream or object id {stream!r}/{object_id!r}")
    return f"alerts/{stream}/annotations/{object_id}"


def post_annotation(storage: LakeStorage, stream: str, annotation: Annotation) -> str:
    """Store `annotation`; returns its lake path."""
    stamp = annotation.time.replace(":", "").replace("-", "").replace(".", "")
    path = f"{_folder(stream, annotation.object_id)}/{stamp}-{annotation.id}.json"
    if not storage.put_if_absent(path, json.dumps(asdict(annotation)).encode()):
        raise AnnotationError("an annotation with this id exists already; post again")
    return path


def annotations_of(storage: LakeStorage, stream: str, object_id: str) -> list[Annotation]:
    """All annotations of an object, oldest first."""
    folder = _folder(stream, object_id)
    try:
        names = sorted(n for n in storage.list_dir(folder) if n.endswith(".json"))
    except FileNotFoundError:
        return []
    out = []
    for name in names:
        data = json.loads(storage.read_text(f"{folder}/{name.rsplit('/', 1)[-1]}"))
        out.append(Annotation(**data))
    return out
