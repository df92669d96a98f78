"""One lake URL -> every filesystem object the lake's readers and writers need.

Why one module: pyarrow (writing Parquet), fsspec/UPath (the hats and lsdb libraries), boto3 (create-only
writes for release pointers) and DuckDB (queries) each want the S3 endpoint, keys and retry policy in their
own form. Building them all here from the same `Settings` means a lake that one of them can reach, all of
them can.

Paths handed to `LakeStorage` methods are *relative to the lake root* and always use '/'.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import tempfile
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

import pyarrow.fs as pafs

from dac_lake.settings import Settings, load_settings

log = logging.getLogger(__name__)

# pyarrow >= 26 (AWS SDK for C++) streams uploads as aws-chunked with checksum trailers, which Ceph RGW 16
# rejects with HTTP 411. The SDK reads these at client creation, so they are set before any S3 client
# exists. An operator can still override them in the environment.
os.environ.setdefault("AWS_REQUEST_CHECKSUM_CALCULATION", "when_required")
os.environ.setdefault("AWS_RESPONSE_CHECKSUM_VALIDATION", "when_required")
os.environ.setdefault("AWS_EC2_METADATA_DISABLED", "true")


class StorageError(RuntimeError):
    """A lake storage operation failed in a way an operator must look at."""


@dataclass(frozen=True)
class LakeLocation:
    """A parsed lake URL: either a local directory or an S3 bucket with an optional prefix."""

    scheme: str  # "file" or "s3"
    bucket: str | None
    prefix: str  # no leading or trailing '/'; for local: the absolute directory

    @classmethod
    def parse(cls, url: str) -> LakeLocation:
        if url.startswith("s3://"):
            rest = url[len("s3://") :].strip("/")
            if not rest:
                raise ValueError(f"lake URL {url!r} names no bucket")
            bucket, _, prefix = rest.partition("/")
            return cls("s3", bucket, prefix.strip("/"))
        if "://" in url and not url.startswith("file://"):
            raise ValueError(f"lake URL {url!r}: only s3://bucket[/prefix] and local paths are supported")
        path = url[len("file://") :] if url.startswith("file://") else url
        return cls("file", None, str(Path(path).expanduser().resolve()))

    @property
    def url(self) -> str:
        if self.scheme == "s3":
            return f"s3://{self.bucket}/{self.prefix}".rstrip("/")
        return self.prefix


class LakeStorage:
    """Storage access for one lake root, local or S3."""

    def __init__(self, url: str | None = None, settings: Settings | None = None):
        self.settings = settings or load_settings()
        self.location = LakeLocation.parse(url or self.settings.lake_url)

    def __repr__(self) -> str:
        return f"LakeStorage({self.url!r})"

    # ------------------------------------------------------------------ naming
    @property
    def is_s3(self) -> bool:
        return self.location.scheme == "s3"

    @property
    def url(self) -> str:
        return self.location.url

    def path(self, rel: str = "") -> str:
        """The path of `rel` for `self.pa_fs` (pyarrow) and `self.fsspec` ('bucket/prefix/rel' on S3)."""
        rel = rel.strip("/")
        if self.is_s3:
            base = "/".join(p for p in (self.location.bucket, self.location.prefix) if p)
        else:
            base = self.location.prefix
        return f"{base}/{rel}" if rel else base

    def url_of(self, rel: str = "") -> str:
        """A full URL of `rel` (s3://... or an absolute local path), for hats, lsdb and DuckDB."""
        return ("s3://" + self.path(rel)) if self.is_s3 else self.path(rel)

    def rel_of(self, path: str) -> str:
        """Inverse of `path`: a path as returned by a listing, relative to the lake root."""
        base = self.path("")
        path = path[len("s3://") :] if path.startswith("s3://") else path
        if path == base:
            return ""
        if not path.startswith(base + "/"):
            raise ValueError(f"{path} is not inside the lake {self.url}")
        return path[len(base) + 1 :]

    # ------------------------------------------------------------------ clients
    @cached_property
    def pa_fs(self) -> pafs.FileSystem:
        """A pyarrow filesystem (writes Parquet; reads datasets)."""
        if not self.is_s3:
            return pafs.LocalFileSystem()
        s3 = self.settings.s3
        kwargs: dict[str, Any] = {
            "region": s3.region,
            "retry_strategy": pafs.AwsStandardS3RetryStrategy(max_attempts=s3.retries),
            "force_virtual_addressing": not s3.path_style,
            "check_directory_existence_before_creation": False,
        }
        if s3.endpoint_host:
            # pyarrow ignores AWS_ENDPOINT_URL: always pass the endpoint explicitly.
            kwargs["endpoint_override"] = s3.endpoint_host
            kwargs["scheme"] = "https" if s3.use_ssl else "http"
        if s3.access_key_id:
            kwargs["access_key"] = s3.access_key_id
            kwargs["secret_key"] = s3.secret_access_key
        return pafs.S3FileSystem(**kwargs)

    @cached_property
    def storage_options(self) -> dict[str, Any]:
        """fsspec/s3fs storage options, as UPath, hats and lsdb take them."""
        if not self.is_s3:
            return {}
        s3 = self.settings.s3
        opts: dict[str, Any] = {
            "client_kwargs": {"region_name": s3.region},
            "config_kwargs": {
                "retries": {"max_attempts": s3.retries, "mode": "standard"},
                "s3": {"addressing_style": "path" if s3.path_style else "virtual"},
            },
        }
        if s3.endpoint_url:
            opts["endpoint_url"] = s3.endpoint_url
        if s3.access_key_id:
            opts["key"] = s3.access_key_id
            opts["secret"] = s3.secret_access_key
        return opts

    @cached_property
    def fsspec(self):  # -> fsspec.AbstractFileSystem
        """An fsspec filesystem on the lake."""
        import fsspec

        if not self.is_s3:
            return fsspec.filesystem("file")
        return fsspec.filesystem("s3", **self.storage_options)

    def upath(self, rel: str = ""):  # -> upath.UPath
        """A UPath of `rel` carrying the credentials: what hats.read_hats and lsdb.open_catalog accept."""
        from upath import UPath

        if not self.is_s3:
            return UPath(self.path(rel))
        return UPath(self.url_of(rel), **self.storage_options)

    @cached_property
    def boto3(self):
        """A boto3 S3 client: the one client that exposes conditional (create-only) PUTs."""
        import boto3
        from botocore.config import Config

        s3 = self.settings.s3
        return boto3.client(
            "s3",
            endpoint_url=s3.endpoint_url,
            aws_access_key_id=s3.access_key_id,
            aws_secret_access_key=s3.secret_access_key,
            region_name=s3.region,
            config=Config(
                retries={"max_attempts": s3.retries, "mode": "standard"},
                s3={"addressing_style": "path" if s3.path_style else "virtual"},
            ),
        )

    # ------------------------------------------------------------------ operations
    def ensure_root(self) -> None:
        """Create the local directory or the S3 bucket of the lake if missing."""
        if not self.is_s3:
            Path(self.location.prefix).mkdir(parents=True, exist_ok=True)
            return
        from botocore.exceptions import ClientError

        try:
            self.boto3.head_bucket(Bucket=self.location.bucket)
        except ClientError as exc:
            code = exc.response.get("Error", {}).get("Code")
            if code not in {"404", "NoSuchBucket", "NotFound"}:
                raise StorageError(f"cannot reach bucket {self.location.bucket}: {exc}") from exc
            self.boto3.create_bucket(Bucket=self.location.bucket)

    def exists(self, rel: str) -> bool:
        info = self.pa_fs.get_file_info(self.path(rel))
        return info.type != pafs.FileType.NotFound

    def is_file(self, rel: str) -> bool:
        return self.pa_fs.get_file_info(self.path(rel)).type == pafs.FileType.File

    def read_bytes(self, rel: str) -> bytes:
        try:
            with self.pa_fs.open_input_stream(self.path(rel)) as fh:
                return fh.read()
        except FileNotFoundError:
            raise
        except OSError as exc:
            if "NoSuchKey" in str(exc) or "not found" in str(exc).lower():
                raise FileNotFoundError(self.url_of(rel)) from exc
            raise

    def read_text(self, rel: str) -> str:
        return self.read_bytes(rel).decode("utf-8")

    def write_bytes(self, rel: str, data: bytes) -> None:
        """Write an object (overwriting). On a local disk the write is atomic (temp file + rename)."""
        if self.is_s3:
            with self.pa_fs.open_output_stream(self.path(rel)) as fh:
                fh.write(data)
            return
        target = Path(self.path(rel))
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=".tmp-", dir=target.parent)
        try:
            with os.fdopen(fd, "wb") as fh:
                fh.write(data)
                fh.flush()
                os.fsync(fh.fileno())
            os.replace(tmp, target)
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
            raise

    def write_text(self, rel: str, text: str) -> None:
        self.write_bytes(rel, text.encode("utf-8"))

    def put_if_absent(self, rel: str, data: bytes) -> bool:
        """Create `rel` with `data` only if nothing is there yet; False if it already exists.

        This is the lake's only synchronisation primitive: two writers racing for the same key cannot both
        win. S3: a PUT with `If-None-Match: *` (honoured by Ceph RGW and AWS). Local: a fully written temp
        file hard-linked to its name (link(2) fails if the name exists), so a reader never sees a partial
        object.
        """
        if self.is_s3:
            from botocore.exceptions import ClientError

            key = self.path(rel).split("/", 1)[1]
            try:
                self.boto3.put_object(Bucket=self.location.bucket, Key=key, Body=data, IfNoneMatch="*")
            except ClientError as exc:
                status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
                code = exc.response.get("Error", {}).get("Code")
                if status == 412 or code in {"PreconditionFailed", "ConditionalRequestConflict"}:
                    return False
                raise
            return True
        target = Path(self.path(rel))
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = target.parent / f".tmp-{uuid.uuid4().hex}"
        with open(tmp, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        try:
            os.link(tmp, target)
        except FileExistsError:
            return False
        finally:
            os.unlink(tmp)
        return True

    def list_dir(self, rel: str) -> list[str]:
        """Names (not paths) directly under `rel`, files and 'directories'; [] if it does not exist."""
        if not self.is_s3:
            # os.listdir, not pyarrow: pyarrow stats every entry and fails the whole listing with
            # ENOENT when a concurrent writer's `.tmp-` file vanishes between readdir and stat.
            try:
                entries = os.listdir(self.path(rel))
            except (FileNotFoundError, NotADirectoryError):
                return []
            return sorted(n for n in entries if not n.startswith(".tmp-"))
        selector = pafs.FileSelector(self.path(rel), recursive=False, allow_not_found=True)
        names = []
        for info in self.pa_fs.get_file_info(selector):
            name = info.path.rstrip("/").rsplit("/", 1)[-1]
            if name and not name.startswith(".tmp-"):
                names.append(name)
        return sorted(set(names))

    def walk_files(self, rel: str) -> Iterator[tuple[str, int]]:
        """(relative path, size) of every file under `rel` (writers' `.tmp-` files excluded)."""
        if not self.is_s3:
            # os.walk tolerates entries that vanish mid-walk (see list_dir); pyarrow does not.
            for folder, _dirs, files in os.walk(self.path(rel)):
                for name in files:
                    if name.startswith(".tmp-"):
                        continue
                    full = os.path.join(folder, name)
                    try:
                        size = os.stat(full).st_size
                    except FileNotFoundError:
                        continue
                    yield self.rel_of(full), size
            return
        selector = pafs.FileSelector(self.path(rel), recursive=True, allow_not_found=True)
        for info in self.pa_fs.get_file_info(selector):
            if info.type == pafs.FileType.File:
                yield self.rel_of(info.path), info.size or 0

    def delete_tree(self, rel: str) -> None:
        """Delete everything under `rel` (a release prefix, a temp folder). Missing is not an error."""
        if not rel.strip("/"):
            raise StorageError("refusing to delete the lake root")
        if not self.is_s3:
            shutil.rmtree(self.path(rel), ignore_errors=True)
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.path(rel))
            return
        # S3: delete keys in batches of 1000 (RGW returns at most 1000 keys a page anyway).
        prefix = self.path(rel).split("/", 1)[1].rstrip("/") + "/"
        paginator = self.boto3.get_paginator("list_objects_v2")
        for page in paginator.paginate(Bucket=self.location.bucket, Prefix=prefix):
            keys = [{"Key": obj["Key"]} for obj in page.get("Contents", [])]
            if keys:
                self.boto3.delete_objects(
                    Bucket=self.location.bucket, Delete={"Objects": keys, "Quiet": True}
                )
        # a zero-byte "dir" marker left by pyarrow's create_dir
        with contextlib.suppress(Exception):
            self.boto3.delete_object(Bucket=self.location.bucket, Key=prefix.rstrip("/"))

    def delete_file(self, rel: str) -> None:
        with contextlib.suppress(FileNotFoundError):
            self.pa_fs.delete_file(self.path(rel))

    def make_dirs(self, rel: str) -> None:
        """Local only (S3 has no directories; creating markers would confuse s3fs readers)."""
        if not self.is_s3:
            Path(self.path(rel)).mkdir(parents=True, exist_ok=True)


def open_lake_storage(url: str | None = None, settings: Settings | None = None) -> LakeStorage:
    """The storage of the lake at `url` (default: the configured lake)."""
    return LakeStorage(url, settings)
