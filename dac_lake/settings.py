"""Effective settings of a dac-lake process: a config file, overridden by environment variables.

Why one place: the CLI, the ingest pipelines, the query engine and the service must all reach the same lake
with the same credentials; reading them in one function keeps `dac config show` truthful.

Precedence (highest first): explicit keyword overrides, `DAC_*` environment variables, the standard AWS
environment variables (so `eval "$(scripts/ceph-s3 start ...)"` just works), the config file, defaults.
The config file is TOML, found at `$DAC_CONFIG`, else `./dac.toml`, else `~/.config/dac-lake/dac.toml`.

```toml
lake_url = "s3://dac-lake/prod"
[s3]
endpoint_url = "https://rgw.example.ac.uk"
access_key_id = "..."
secret_access_key = "..."
region = "us-east-1"
path_style = true
```
"""

from __future__ import annotations

import os
import tomllib
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

DEFAULT_LAKE_URL = "./lake"


@dataclass(frozen=True)
class S3Settings:
    """How to reach an S3 endpoint (Ceph RGW or any S3)."""

    endpoint_url: str | None = None
    access_key_id: str | None = None
    secret_access_key: str | None = None
    region: str = "us-east-1"
    path_style: bool = True
    retries: int = 5

    @property
    def endpoint_host(self) -> str | None:
        """`host:port` without the scheme, as pyarrow's endpoint_override and DuckDB's ENDPOINT want it."""
        if not self.endpoint_url:
            return None
        return self.endpoint_url.split("://", 1)[-1].rstrip("/")

    @property
    def use_ssl(self) -> bool:
        return not (self.endpoint_url or "https://").startswith("http://")


@dataclass(frozen=True)
class Settings:
    """Everything a dac-lake process needs to know about its environment."""

    lake_url: str = DEFAULT_LAKE_URL
    s3: S3Settings = field(default_factory=S3Settings)
    config_file: str | None = None
    #: the config file's other tables ([service], [auth], ...), read by the parts that own them
    sections: dict[str, Any] = field(default_factory=dict, compare=False, repr=False)

    def masked(self) -> dict[str, Any]:
        """The settings as a dict with secrets masked, for `dac config show` and logs."""
        data = asdict(self)
        data.pop("sections", None)
        for key in ("access_key_id", "secret_access_key"):
            value = data["s3"].get(key)
            if value:
                data["s3"][key] = mask_secret(value, keep=4 if key == "access_key_id" else 0)
        return data


def section_setting(
    settings: Settings, section: str, key: str, environ: dict[str, str] | None = None
) -> Any:
    """One setting of a config-file table: `DAC_<SECTION>_<KEY>` from the environment, else `key` in the
    `[section]` table, else None (e.g. `[ingest] dask = "tcp://..."` or `DAC_INGEST_DASK`)."""
    env = os.environ if environ is None else environ
    value = env.get(f"DAC_{section.upper()}_{key.upper()}")
    if value not in (None, ""):
        return value
    return (settings.sections.get(section) or {}).get(key)


def mask_secret(value: str, keep: int = 0) -> str:
    """Hide a secret but keep enough of an access key to tell which one is in use."""
    if keep and len(value) > keep * 2:
        return value[:keep] + "*" * 8
    return "*" * 8


def parse_bool(value: Any, what: str) -> bool:
    """A TOML boolean, or its spellings in environment variables and forms: 1/0, true/false, yes/no,
    on/off (any case). Anything else is a ValueError naming `what`, never a silent False."""
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in {"1", "true", "yes", "on"}:
        return True
    if text in {"0", "false", "no", "off"}:
        return False
    raise ValueError(f"{what} must be true or false, not {value!r}")


def _truthy(value: str) -> bool:
    return value.strip().lower() in {"1", "true", "yes", "on"}


def find_config_file(environ: dict[str, str] | None = None) -> Path | None:
    """The config file this process reads, or None."""
    env = os.environ if environ is None else environ
    if env.get("DAC_CONFIG"):
        path = Path(env["DAC_CONFIG"]).expanduser()
        if not path.is_file():
            raise FileNotFoundError(f"DAC_CONFIG names {path}, which is not a file")
        return path
    for candidate in (Path("dac.toml"), Path.home() / ".config" / "dac-lake" / "dac.toml"):
        if candidate.is_file():
            return candidate
    return None


def load_settings(environ: dict[str, str] | None = None, **overrides: Any) -> Settings:
    """Build the effective settings from file, environment and explicit overrides."""
    env = dict(os.environ if environ is None else environ)
    path = find_config_file(env)
    file_data: dict[str, Any] = {}
    if path is not None:
        with path.open("rb") as fh:
            file_data = tomllib.load(fh)
    s3_file = file_data.get("s3", {})

    def pick(env_names: tuple[str, ...], file_value: Any, default: Any = None) -> Any:
        for name in env_names:
            if env.get(name):
                return env[name]
        return default if file_value is None else file_value

    path_style = pick(("DAC_S3_PATH_STYLE",), s3_file.get("path_style"), True)
    s3 = S3Settings(
        endpoint_url=pick(
            ("DAC_S3_ENDPOINT_URL", "AWS_ENDPOINT_URL", "S3_ENDPOINT_URL"), s3_file.get("endpoint_url")
        ),
        access_key_id=pick(("DAC_S3_ACCESS_KEY_ID", "AWS_ACCESS_KEY_ID"), s3_file.get("access_key_id")),
        secret_access_key=pick(
            ("DAC_S3_SECRET_ACCESS_KEY", "AWS_SECRET_ACCESS_KEY"), s3_file.get("secret_access_key")
        ),
        region=pick(
            ("DAC_S3_REGION", "AWS_REGION", "AWS_DEFAULT_REGION"), s3_file.get("region"), "us-east-1"
        ),
        path_style=_truthy(path_style) if isinstance(path_style, str) else bool(path_style),
        retries=int(pick(("DAC_S3_RETRIES",), s3_file.get("retries"), 5)),
    )
    settings = Settings(
        lake_url=pick(("DAC_LAKE_URL",), file_data.get("lake_url"), DEFAULT_LAKE_URL),
        s3=s3,
        config_file=str(path) if path else None,
        sections={k: v for k, v in file_data.items() if isinstance(v, dict) and k != "s3"},
    )
    s3_overrides = {k[3:]: v for k, v in overrides.items() if k.startswith("s3_") and v is not None}
    top_overrides = {k: v for k, v in overrides.items() if not k.startswith("s3_") and v is not None}
    if s3_overrides:
        settings = replace(settings, s3=replace(settings.s3, **s3_overrides))
    if top_overrides:
        settings = replace(settings, **top_overrides)
    return settings
