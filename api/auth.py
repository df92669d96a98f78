"""Who is calling: turn an `Authorization` header into an `Identity` (a user name and data-rights groups).

Why this module exists: data rights (DESIGN §4) are decided by groups — `dac_lake.registry.readable()` shows a
caller only the catalogs that are public or share a group with them. This module is the one place that
decides which groups a request carries, so it is strict and small, and it never needs the lake.

Accepted credentials
--------------------
- No header: the anonymous identity (groups `{"public"}`), unless `allow_anonymous = false`, in which case
  401 with two challenges, `WWW-Authenticate: Bearer realm=...` and `WWW-Authenticate: Basic realm=...`, so
  TOPCAT, pyvo and browsers prompt for credentials.
- `Authorization: Bearer <token>`: a static API token from configuration, or an OIDC JWT. Static tokens are
  tried first (a hash comparison, cheap); a token shaped like a JWT (three base64url parts whose first part is
  a JSON header) is then verified against the identity provider's JWKS. A wrong or unknown token is always a
  401, even when anonymous access is allowed: a client that sent credentials wants to know they failed rather
  than silently seeing only public data.
- `Authorization: Basic base64(user:token)`, for clients that only do Basic: the *password* is the token
  (static or JWT) and the user part is ignored — the identity comes from the token alone, so a user may type
  any name (their own, or `x`) in TOPCAT's login dialog. If the password is empty the user part is taken as
  the token (`curl -u TOKEN:`).

Configuration (`[auth]` table of dac.toml; `DAC_AUTH_*` environment variables override it)
---------------------------------------------------------------------------------------------
```toml
[auth]
allow_anonymous = true                    # DAC_AUTH_ALLOW_ANONYMOUS
realm = "dac-lake"                        # DAC_AUTH_REALM, shown in WWW-Authenticate
tokens_file = "/etc/dac/tokens.toml"      # DAC_AUTH_TOKENS_FILE: more [[tokens]] (or [[auth.tokens]])
jwks_url = "https://idp.example.org/.well-known/jwks.json"   # DAC_AUTH_JWKS_URL
# jwks_file = "/etc/dac/jwks.json"        # DAC_AUTH_JWKS_FILE: offline deployments; re-read when it changes
issuer = "https://idp.example.org/"       # DAC_AUTH_ISSUER (required with a JWKS)
audience = "dac-lake"                     # DAC_AUTH_AUDIENCE (comma-separated for several; optional)
groups_claim = ["groups", "isMemberOf"]   # DAC_AUTH_GROUPS_CLAIM (comma-separated); default "groups"
username_claim = "preferred_username"     # DAC_AUTH_USERNAME_CLAIM; default "sub"
algorithms = ["RS256", "ES256"]           # DAC_AUTH_ALGORITHMS; asymmetric only, never "none" or HS*
leeway_seconds = 30                       # DAC_AUTH_LEEWAY: tolerated clock skew for exp/nbf/iat
jwks_cache_seconds = 300                  # DAC_AUTH_JWKS_CACHE_SECONDS: how long a fetched JWKS is trusted
jwks_refetch_cooldown_seconds = 10        # DAC_AUTH_JWKS_REFETCH_COOLDOWN: min gap between refetches

[auth.groups_map]                         # IdP group -> DAC group(s); see "Groups" below
"/lsst/members" = "lsst"
"cn=des,ou=groups" = ["des", "des-y6"]

[[auth.tokens]]                           # static API tokens: only a SHA-256 of the token is stored
user = "alice"
groups = ["lsst"]
token_sha256 = "9f86d0...(64 hex digits)"
expires = 2027-01-01                      # optional
```
`dac auth new-token USER --group G` (see `new_token()`) makes a token and prints the `[[auth.tokens]]` entry.

Groups
------
From a JWT the groups are read from each claim in `groups_claim` (union). A claim is looked up by its exact
name first (namespaced claims such as `https://example.org/groups` contain dots), else as a dotted path into
nested objects (`realm_access.roles` for Keycloak). Its value may be a list of names, a list of objects with a
`name` (the `isMemberOf` form of CILogon/COmanage and Rubin's Gafaelfawr), or one string of names separated by
spaces or commas (the OAuth `scope` style). Without `groups_map` the IdP's group names are used as they are,
except `"*"` (all catalogs), which an IdP can never grant. With a non-empty `groups_map` *only mapped groups
count* — list identity entries (`lsst = "lsst"`) for the ones to keep — so that an IdP with thousands of
groups cannot grant data rights by a coincidental name; a map target may be `"*"` on purpose. Static tokens
carry DAC groups directly (an operator may give a trusted service `"*"`). Every identity holds `"public"`.
"""

from __future__ import annotations

import argparse
import base64
import binascii
import dataclasses
import hashlib
import hmac
import json
import logging
import os
import re
import secrets
import sys
import threading
import tomllib
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, date, datetime
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import jwt
from jwt import PyJWK, PyJWKClient, PyJWKSet
from jwt.exceptions import (
    DecodeError,
    ExpiredSignatureError,
    ImmatureSignatureError,
    InvalidAlgorithmError,
    InvalidAudienceError,
    InvalidIssuerError,
    InvalidSignatureError,
    InvalidTokenError,
    MissingRequiredClaimError,
    PyJWKClientConnectionError,
    PyJWKClientError,
    PyJWKSetError,
    PyJWTError,
)
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response

from dac_lake.settings import parse_bool

log = logging.getLogger(__name__)

PUBLIC_GROUP = "public"  # same meaning as dac_lake.registry.PUBLIC_GROUP
ALL_GROUPS = "*"  # dac_lake.registry.readable(): every catalog
DEFAULT_REALM = "dac-lake"
TOKEN_PREFIX = "dac_"  # makes a leaked token recognisable to people and secret scanners
# asymmetric only: with a symmetric (HS*) algorithm the "secret" would be the IdP's public key, which anyone
# can fetch — the classic algorithm-confusion forgery; "none" is no signature at all
ASYMMETRIC_ALGORITHMS = frozenset(
    {"RS256", "RS384", "RS512", "PS256", "PS384", "PS512", "ES256", "ES384", "ES512", "EdDSA"}
)
MAX_HEADER_CHARS = 16_384
_SHA256_HEX = re.compile(r"^[0-9a-f]{64}$")
_B64URL = re.compile(r"^[A-Za-z0-9_-]*$")


@dataclass(frozen=True)
class Identity:
    """The caller as data rights see it: a name for logs and job ownership, and the groups that decide
    which catalogs exist for them."""

    name: str | None
    groups: frozenset[str]
    method: str  # "anonymous", "token", "jwt" or "basic"

    def __post_init__(self) -> None:
        # "public" is always there so the rule "public catalogs are readable by everyone" never depends on
        # the caller having remembered it
        object.__setattr__(self, "groups", frozenset(self.groups) | {PUBLIC_GROUP})

    @property
    def anonymous(self) -> bool:
        return self.name is None

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "groups": sorted(self.groups), "method": self.method}


ANONYMOUS = Identity(name=None, groups=frozenset({PUBLIC_GROUP}), method="anonymous")


class AuthError(HTTPException):
    """A request whose credentials cannot be accepted. `message` is meant for the person at the client: it
    says what to do and never repeats the token. It is an HTTPException so that even without
    `auth_exception_handler` FastAPI answers with the right status and a WWW-Authenticate header."""

    def __init__(
        self,
        message: str,
        http_status: int = 401,
        www_authenticate: Sequence[str] | str | None = None,
    ):
        if isinstance(www_authenticate, str):
            challenges: tuple[str, ...] = (www_authenticate,)
        else:
            challenges = tuple(www_authenticate or ())
        # one header may carry several comma-separated challenges (RFC 9110 §11.6.1);
        # auth_exception_handler sends one header per challenge, which every client parses
        headers = {"WWW-Authenticate": ", ".join(challenges)} if challenges else None
        super().__init__(status_code=http_status, detail=message, headers=headers)
        self.message = message
        self.http_status = http_status
        self.www_authenticate = challenges

    def __str__(self) -> str:
        return self.message


async def auth_exception_handler(request: Request, exc: Exception) -> Response:
    """Starlette/FastAPI exception handler for AuthError: plain-text message, one WWW-Authenticate header
    per challenge. Register with `app.add_exception_handler(AuthError, auth_exception_handler)` (a TAP
    endpoint that prefers a DALI error VOTable can build its own body and copy `exc.www_authenticate`)."""
    if not isinstance(exc, AuthError):
        raise exc
    response = PlainTextResponse(exc.message + "\n", status_code=exc.http_status)
    for challenge in exc.www_authenticate:
        response.headers.append("WWW-Authenticate", challenge)
    return response


# ---------------------------------------------------------------------------------------------- settings


@dataclass(frozen=True)
class StaticToken:
    """One configured API token; only its SHA-256 is known to the service."""

    user: str
    groups: frozenset[str]
    token_sha256: str
    expires: datetime | None = None


@dataclass(frozen=True)
class AuthSettings:
    """How callers authenticate. Build with `from_mapping()` (or `load_auth_settings()`); the constructor
    validates, so a service never starts with a half-configured or unsafe setup."""

    allow_anonymous: bool = True
    realm: str = DEFAULT_REALM
    tokens: tuple[StaticToken, ...] = ()
    jwks_url: str | None = None
    jwks_file: str | None = None
    issuer: str | None = None
    audience: tuple[str, ...] = ()
    groups_claim: tuple[str, ...] = ("groups",)
    username_claim: str = "sub"
    algorithms: tuple[str, ...] = ("RS256", "ES256")
    leeway_seconds: float = 30.0
    groups_map: Mapping[str, tuple[str, ...]] = field(default_factory=dict)
    jwks_cache_seconds: float = 300.0
    jwks_refetch_cooldown_seconds: float = 10.0
    jwks_timeout_seconds: float = 10.0

    def __post_init__(self) -> None:
        for alg in self.algorithms:
            if alg.lower() == "none" or alg.upper().startswith("HS"):
                raise ValueError(
                    f"auth.algorithms: {alg!r} is refused: JWTs must be signed with the identity provider's "
                    "private key (RS*, PS*, ES*, EdDSA); 'none' and HMAC (HS*) algorithms would let anyone "
                    "forge tokens"
                )
            if alg not in ASYMMETRIC_ALGORITHMS:
                raise ValueError(
                    f"auth.algorithms: unknown algorithm {alg!r}; choose from {sorted(ASYMMETRIC_ALGORITHMS)}"
                )
        if not self.algorithms:
            raise ValueError("auth.algorithms is empty: list at least one, e.g. ['RS256']")
        if self.jwks_url and self.jwks_file:
            raise ValueError("auth: give jwks_url or jwks_file, not both")
        if self.jwks_url:
            parsed = urlparse(self.jwks_url)
            if parsed.scheme not in ("http", "https") or not parsed.netloc:
                raise ValueError(f"auth.jwks_url must be an http(s) URL, not {self.jwks_url!r}")
            if parsed.scheme == "http" and parsed.hostname not in ("127.0.0.1", "localhost", "::1"):
                log.warning(
                    "auth.jwks_url %s is plain http: anyone on the path could substitute keys", self.jwks_url
                )
        if self.oidc_enabled and not self.issuer:
            raise ValueError(
                "auth: a JWKS is configured but no issuer: set auth.issuer (DAC_AUTH_ISSUER) to the `iss` "
                "of your identity provider's tokens, so tokens from other issuers are refused"
            )
        if self.issuer and not self.oidc_enabled:
            raise ValueError("auth.issuer is set but neither jwks_url nor jwks_file: JWTs cannot be verified")
        if not self.groups_claim:
            raise ValueError("auth.groups_claim is empty")
        if self.leeway_seconds < 0 or self.jwks_cache_seconds <= 0 or self.jwks_refetch_cooldown_seconds < 0:
            raise ValueError("auth: leeway and JWKS timings must be positive")
        seen: set[str] = set()
        for token in self.tokens:
            if token.token_sha256 in seen:
                raise ValueError(
                    f"auth.tokens: the same token_sha256 is configured twice (user {token.user!r})"
                )
            seen.add(token.token_sha256)

    @property
    def oidc_enabled(self) -> bool:
        return bool(self.jwks_url or self.jwks_file)

    def masked(self) -> dict[str, Any]:
        """The settings without token hashes, for `dac config show` and startup logs."""
        data = dataclasses.asdict(self)
        data["tokens"] = [
            {
                "user": t.user,
                "groups": sorted(t.groups),
                "expires": t.expires.isoformat() if t.expires else None,
            }
            for t in self.tokens
        ]
        data["groups_map"] = {k: list(v) for k, v in self.groups_map.items()}
        return data

    @classmethod
    def from_mapping(
        cls, mapping: Mapping[str, Any] | None, environ: Mapping[str, str] | None = None
    ) -> AuthSettings:
        """Settings from the `[auth]` table of the config file (a whole parsed config with an `auth` key is
        accepted too) overridden by `DAC_AUTH_*` environment variables (None: `os.environ`)."""
        env = os.environ if environ is None else environ
        table = dict(mapping or {})
        if isinstance(table.get("auth"), Mapping):
            table = dict(table["auth"])
        unknown = set(table) - _TABLE_KEYS
        if unknown:
            # a typo in security configuration must not silently fall back to a default
            raise ValueError(f"auth: unknown setting(s) {sorted(unknown)}; known: {sorted(_TABLE_KEYS)}")

        def pick(env_name: str, key: str) -> Any:
            value = env.get(env_name)
            return value if value not in (None, "") else table.get(key)

        kwargs: dict[str, Any] = {}
        value = pick("DAC_AUTH_ALLOW_ANONYMOUS", "allow_anonymous")
        if value is not None:
            kwargs["allow_anonymous"] = parse_bool(value, "auth.allow_anonymous")
        for env_name, key in (
            ("DAC_AUTH_REALM", "realm"),
            ("DAC_AUTH_JWKS_URL", "jwks_url"),
            ("DAC_AUTH_JWKS_FILE", "jwks_file"),
            ("DAC_AUTH_ISSUER", "issuer"),
            ("DAC_AUTH_USERNAME_CLAIM", "username_claim"),
        ):
            value = pick(env_name, key)
            if value is not None:
                kwargs[key] = str(value)
        for env_name, key in (
            ("DAC_AUTH_AUDIENCE", "audience"),
            ("DAC_AUTH_GROUPS_CLAIM", "groups_claim"),
            ("DAC_AUTH_ALGORITHMS", "algorithms"),
        ):
            value = pick(env_name, key)
            if value is not None:
                kwargs[key] = _as_str_tuple(value, key)
        for env_name, key in (
            ("DAC_AUTH_LEEWAY", "leeway_seconds"),
            ("DAC_AUTH_JWKS_CACHE_SECONDS", "jwks_cache_seconds"),
            ("DAC_AUTH_JWKS_REFETCH_COOLDOWN", "jwks_refetch_cooldown_seconds"),
            ("DAC_AUTH_JWKS_TIMEOUT", "jwks_timeout_seconds"),
        ):
            value = pick(env_name, key)
            if value is not None:
                try:
                    kwargs[key] = float(value)
                except (TypeError, ValueError):
                    raise ValueError(f"auth.{key} must be a number of seconds, not {value!r}") from None
        if table.get("groups_map") is not None:
            kwargs["groups_map"] = _parse_groups_map(table["groups_map"])

        tokens = _parse_tokens(table.get("tokens") or [], "[[auth.tokens]] in the config file")
        tokens_file = pick("DAC_AUTH_TOKENS_FILE", "tokens_file")
        if tokens_file:
            tokens += _read_tokens_file(Path(str(tokens_file)).expanduser())
        kwargs["tokens"] = tuple(tokens)
        return cls(**kwargs)


_TABLE_KEYS = {f.name for f in dataclasses.fields(AuthSettings)} | {"tokens_file"}


def load_auth_settings(environ: Mapping[str, str] | None = None) -> AuthSettings:
    """The `[auth]` table of the config file that `dac_lake.settings` finds, plus `DAC_AUTH_*`."""
    from dac_lake.settings import find_config_file

    env = dict(os.environ if environ is None else environ)
    path = find_config_file(env)
    data: dict[str, Any] = {}
    if path is not None:
        with path.open("rb") as fh:
            data = tomllib.load(fh)
    return AuthSettings.from_mapping(data.get("auth") or {}, env)


def _as_str_tuple(value: Any, key: str) -> tuple[str, ...]:
    if isinstance(value, str):
        return tuple(part.strip() for part in value.split(",") if part.strip())
    if isinstance(value, Sequence) and all(isinstance(v, str) for v in value):
        return tuple(value)
    raise ValueError(f"auth.{key} must be a string or a list of strings, not {value!r}")


def _parse_groups_map(value: Any) -> dict[str, tuple[str, ...]]:
    if not isinstance(value, Mapping):
        raise ValueError("auth.groups_map must be a table of IdP group = DAC group (or list of DAC groups)")
    return {str(k): _as_str_tuple(v, f"groups_map.{k}") for k, v in value.items()}


def _parse_tokens(entries: Any, source: str) -> list[StaticToken]:
    if not isinstance(entries, list):
        raise ValueError(f"{source}: expected an array of tables ([[tokens]])")
    out: list[StaticToken] = []
    for number, entry in enumerate(entries, 1):
        where = f"{source}, entry {number}"
        if not isinstance(entry, Mapping):
            raise ValueError(f"{where}: expected a table with user, groups, token_sha256")
        if "token" in entry:
            raise ValueError(
                f"{where}: plain `token` is refused — store `token_sha256` (the output of "
                "`dac auth new-token`, or api.auth.hash_token(token)) so the config file never holds a "
                "usable secret"
            )
        unknown = set(entry) - {"user", "groups", "token_sha256", "expires"}
        if unknown:
            raise ValueError(f"{where}: unknown key(s) {sorted(unknown)}")
        user = entry.get("user")
        if not isinstance(user, str) or not user.strip():
            raise ValueError(f"{where}: `user` must be a non-empty string")
        digest = str(entry.get("token_sha256", "")).strip().lower()
        if not _SHA256_HEX.match(digest):
            raise ValueError(f"{where} (user {user!r}): token_sha256 must be 64 hexadecimal digits")
        groups = _as_str_tuple(entry.get("groups") or (), "tokens.groups")
        out.append(StaticToken(user, frozenset(groups) | {PUBLIC_GROUP}, digest, _as_datetime(entry, where)))
    return out


def _as_datetime(entry: Mapping[str, Any], where: str) -> datetime | None:
    value = entry.get("expires")
    if value is None:
        return None
    if isinstance(value, str):
        try:
            value = datetime.fromisoformat(value)
        except ValueError:
            raise ValueError(f"{where}: expires {value!r} is not an ISO date or datetime") from None
    if isinstance(value, datetime):
        return value if value.tzinfo else value.replace(tzinfo=UTC)
    if isinstance(value, date):
        return datetime(value.year, value.month, value.day, tzinfo=UTC)
    raise ValueError(f"{where}: expires must be a date or datetime")


def _read_tokens_file(path: Path) -> list[StaticToken]:
    try:
        with path.open("rb") as fh:
            data = tomllib.load(fh)
    except FileNotFoundError:
        raise ValueError(
            f"tokens file {path} (DAC_AUTH_TOKENS_FILE / auth.tokens_file) does not exist"
        ) from None
    except tomllib.TOMLDecodeError as exc:
        raise ValueError(f"tokens file {path} is not valid TOML: {exc}") from None
    entries = data.get("tokens")
    if entries is None and isinstance(data.get("auth"), Mapping):
        entries = data["auth"].get("tokens")
    return _parse_tokens(entries or [], f"tokens file {path}")


# ---------------------------------------------------------------------------------------------- tokens


def hash_token(token: str) -> str:
    """The SHA-256 (hex) under which a static token is configured."""
    return hashlib.sha256(token.encode("utf-8")).hexdigest()


@dataclass(frozen=True)
class NewToken:
    token: str  # give to the user once; never stored by the service
    token_sha256: str
    config_entry: str  # the [[auth.tokens]] table to paste into the config or tokens file


def new_token(user: str, groups: Iterable[str] = ()) -> NewToken:
    """A fresh random API token (256 bits) and its configuration entry."""
    if not user.strip():
        raise ValueError("the user name must not be empty")
    token = TOKEN_PREFIX + secrets.token_urlsafe(32)
    digest = hash_token(token)
    return NewToken(token, digest, format_token_entry(user, groups, digest))


def format_token_entry(user: str, groups: Iterable[str], token_sha256: str) -> str:
    # JSON string escapes are valid TOML basic-string escapes for everything json.dumps emits here
    names = ", ".join(json.dumps(g) for g in sorted(set(groups)))
    return (
        f'[[auth.tokens]]\nuser = {json.dumps(user)}\ngroups = [{names}]\ntoken_sha256 = "{token_sha256}"\n'
    )


def main(argv: Sequence[str] | None = None) -> int:
    """`python -m api.auth new-token USER --group G`: the same as `dac auth new-token`."""
    parser = argparse.ArgumentParser(prog="python -m api.auth")
    sub = parser.add_subparsers(dest="command", required=True)
    make = sub.add_parser("new-token", help="make a static API token and print its config entry")
    make.add_argument("user")
    make.add_argument("--group", "-g", action="append", default=[], help="a DAC group (repeatable)")
    args = parser.parse_args(argv)
    made = new_token(args.user, args.group)
    print(f"# token for {args.user} (shown once; the service keeps only its hash):", file=sys.stderr)
    print(made.token, file=sys.stderr)
    print(made.config_entry, end="")
    return 0


# ---------------------------------------------------------------------------------------------- JWKS


class _KeysUnavailable(Exception):
    """The identity provider's keys could not be read: a service problem (503), not the caller's."""


class _UnknownKey(Exception):
    pass


class _UrlKeys:
    """JWKS from the IdP through PyJWKClient: the set is cached for `jwks_cache_seconds`; an unknown `kid`
    forces one refetch (at most one per cooldown, so random kids cannot make us hammer the IdP)."""

    def __init__(self, settings: AuthSettings):
        assert settings.jwks_url
        self.where = settings.jwks_url
        self._client = PyJWKClient(
            settings.jwks_url,
            cache_jwk_set=True,
            lifespan=settings.jwks_cache_seconds,
            cooldown_duration=settings.jwks_refetch_cooldown_seconds,
            timeout=settings.jwks_timeout_seconds,
        )

    def key_for(self, kid: str | None) -> PyJWK:
        try:
            if kid is None:
                return _only_key(list(self._client.get_jwk_set()))
            return self._client.get_signing_key(kid)
        except PyJWKClientConnectionError as exc:
            raise _KeysUnavailable(
                f"could not fetch the identity provider's keys from {self.where} ({exc})"
            ) from None
        except (PyJWKSetError, ValueError) as exc:
            raise _KeysUnavailable(f"the key set at {self.where} is not a valid JWKS ({exc})") from None
        except PyJWKClientError:
            raise _UnknownKey from None


class _FileKeys:
    """JWKS from a local file, for deployments that cannot reach the IdP: re-read whenever it changes, so
    an operator rotates keys by replacing the file."""

    def __init__(self, settings: AuthSettings):
        assert settings.jwks_file
        self.path = Path(settings.jwks_file).expanduser()
        self.where = str(self.path)
        self._stamp: tuple[int, int] | None = None
        self._keys: list[PyJWK] = []
        self._lock = threading.Lock()

    def _current(self) -> list[PyJWK]:
        with self._lock:
            try:
                stat = self.path.stat()
                stamp = (stat.st_mtime_ns, stat.st_size)
                if stamp != self._stamp:
                    self._keys = list(PyJWKSet.from_json(self.path.read_text()))
                    self._stamp = stamp
            except OSError as exc:
                raise _KeysUnavailable(f"cannot read the JWKS file {self.path}: {exc.strerror}") from None
            except (PyJWTError, ValueError) as exc:
                raise _KeysUnavailable(f"the JWKS file {self.path} is not a valid key set ({exc})") from None
            return self._keys

    def key_for(self, kid: str | None) -> PyJWK:
        keys = [k for k in self._current() if k.public_key_use in ("sig", None)]
        if kid is None:
            return _only_key(keys)
        for key in keys:
            if key.key_id == kid:
                return key
        raise _UnknownKey


def _only_key(keys: list[PyJWK]) -> PyJWK:
    """A token without `kid` is accepted only when the key set leaves no choice."""
    signing = [k for k in keys if k.public_key_use in ("sig", None)]
    if len(signing) != 1:
        raise _UnknownKey
    return signing[0]


# ---------------------------------------------------------------------------------------------- identify


class Authenticator:
    """Maps an Authorization header to an Identity. Thread-safe; one per service."""

    def __init__(self, settings: AuthSettings):
        self.settings = settings
        self._keys: _UrlKeys | _FileKeys | None = None
        if settings.jwks_url:
            self._keys = _UrlKeys(settings)
        elif settings.jwks_file:
            self._keys = _FileKeys(settings)

    # -- challenges

    def challenges(self, error: str | None = None, description: str | None = None) -> tuple[str, ...]:
        """WWW-Authenticate challenges: Bearer (RFC 6750, with `error` when a token was refused) and Basic."""
        realm = _quote(self.settings.realm)
        bearer = f'Bearer realm="{realm}"'
        if error:
            bearer += f', error="{error}"'
            if description:
                bearer += f', error_description="{_quote(description)}"'
        return bearer, f'Basic realm="{realm}", charset="UTF-8"'

    def _refuse(self, message: str, error: str | None = "invalid_token") -> AuthError:
        log.info("authentication refused: %s", message)
        return AuthError(message, 401, self.challenges(error, message if error else None))

    # -- entry point

    def identify(self, authorization_header: str | None) -> Identity:
        """The caller's identity; raises AuthError (401, or 503 if the IdP's keys are unreachable)."""
        header = (authorization_header or "").strip()
        if not header:
            if self.settings.allow_anonymous:
                return ANONYMOUS
            raise self._refuse(
                "This service requires authentication: send 'Authorization: Bearer <token>' with an API "
                "token or an access token from the identity provider, or log in with HTTP Basic using the "
                "token as password.",
                error=None,
            )
        if len(header) > MAX_HEADER_CHARS:
            raise self._refuse("The Authorization header is too long to be a token.", "invalid_token")
        scheme, _, credentials = header.partition(" ")
        credentials = credentials.strip()
        if scheme.lower() == "bearer":
            if not credentials:
                raise self._refuse("'Authorization: Bearer' carries no token.", "invalid_token")
            return self._identify_token(credentials, via_basic=False)
        if scheme.lower() == "basic":
            return self._identify_token(self._basic_password(credentials), via_basic=True)
        raise self._refuse(
            f"Authorization scheme {scheme[:20]!r} is not supported: use 'Bearer <token>' or 'Basic' with "
            "the token as password.",
            "invalid_token",
        )

    def _basic_password(self, credentials: str) -> str:
        try:
            decoded = base64.b64decode(credentials, validate=True).decode("utf-8")
        except (binascii.Error, UnicodeDecodeError):
            raise self._refuse(
                "The Basic credentials are not base64 of 'user:token' in UTF-8.", "invalid_token"
            ) from None
        user, sep, password = decoded.partition(":")
        if not sep:
            raise self._refuse("The Basic credentials have no ':' between user and token.", "invalid_token")
        # the user part is ignored: the token alone says who the caller is (see module docstring)
        token = password.strip() or user.strip()
        if not token:
            raise self._refuse("HTTP Basic login without a token: use your API token as the password.")
        return token

    def _identify_token(self, token: str, via_basic: bool) -> Identity:
        entry = self._static_match(token)
        if entry is not None:
            if entry.expires is not None and entry.expires <= datetime.now(UTC):
                raise self._refuse(
                    f"The API token of user {entry.user!r} expired on {entry.expires:%Y-%m-%d %H:%M} UTC: "
                    "ask the service operator for a new one."
                )
            return Identity(entry.user, entry.groups, "basic" if via_basic else "token")
        if _looks_like_jwt(token):
            if self._keys is None:
                raise self._refuse(
                    "This looks like an OIDC token (JWT), but this service is not configured to accept "
                    "tokens from an identity provider: use an API token issued by the service operator."
                )
            name, groups = self._verify_jwt(token)
            return Identity(name, groups, "basic" if via_basic else "jwt")
        raise self._refuse(
            "The token is not known to this service: check that your client sends the whole token, and ask "
            "the service operator if it was revoked or has not been configured yet."
        )

    def _static_match(self, token: str) -> StaticToken | None:
        # compare the hash against every entry without stopping early: the time taken says nothing about
        # which (if any) entry matched
        digest = hash_token(token)
        found: StaticToken | None = None
        for entry in self.settings.tokens:
            if hmac.compare_digest(digest, entry.token_sha256):
                found = entry
        return found

    def _verify_jwt(self, token: str) -> tuple[str, frozenset[str]]:
        settings = self.settings
        assert self._keys is not None
        try:
            header = jwt.get_unverified_header(token)
        except DecodeError:
            raise self._refuse("The token is not a well-formed JWT.") from None
        alg = header.get("alg")
        if alg not in settings.algorithms:
            raise self._refuse(
                f"The token is signed with algorithm {str(alg)[:16]!r}; this service accepts only "
                f"{', '.join(settings.algorithms)} tokens from {settings.issuer}."
            )
        kid = header.get("kid")
        if kid is not None and not isinstance(kid, str):
            raise self._refuse("The token's 'kid' header is not a string.")
        try:
            key = self._keys.key_for(kid)
        except _KeysUnavailable as exc:
            log.error("JWKS unavailable: %s", exc)
            raise AuthError(
                f"The service cannot check identity-provider tokens right now ({exc}). Try again later; if "
                "it persists, tell the service operator.",
                503,
            ) from None
        except _UnknownKey:
            which = f"key id {kid[:64]!r}" if kid else "no key id ('kid' header), and it holds several keys"
            raise self._refuse(
                f"The token names {which}, which the key set of {settings.issuer} ({self._keys.where}) does "
                "not contain, even after re-reading it: the token comes from another identity provider or "
                "from a key that was retired. Get a new token."
            ) from None
        require = ["exp", "iss"] + (["aud"] if settings.audience else [])
        try:
            claims = jwt.decode(
                token,
                key,
                algorithms=[alg],
                audience=list(settings.audience) or None,
                issuer=settings.issuer,
                leeway=settings.leeway_seconds,
                options={"require": require, "verify_aud": bool(settings.audience)},
            )
        except InvalidTokenError as exc:
            raise self._refuse(self._jwt_problem(token, exc)) from None
        return self._username(claims), self._groups(claims)

    def _jwt_problem(self, token: str, exc: InvalidTokenError) -> str:
        """A message for a refused JWT. Claims are read unverified only for the message; PyJWT checks the
        signature before the claims, so for claim errors they did come from the IdP."""
        settings = self.settings
        try:
            claims = jwt.decode(token, options={"verify_signature": False})
        except PyJWTError:
            claims = {}
        if isinstance(exc, ExpiredSignatureError):
            return f"The token expired at {_when(claims.get('exp'))}: get a new one from {settings.issuer}."
        if isinstance(exc, ImmatureSignatureError):
            claim = "nbf" if "nbf" in str(exc) else "iat"
            return (
                f"The token is not valid before {_when(claims.get(claim))} ({claim}); the clocks of this "
                "service and the identity provider may disagree, or the token was used too early."
            )
        if isinstance(exc, InvalidIssuerError):
            return (
                f"The token was issued by {_short(claims.get('iss'))}, but this service accepts tokens from "
                f"{settings.issuer!r} only."
            )
        if isinstance(exc, InvalidAudienceError):
            return (
                f"The token is meant for audience {_short(claims.get('aud'))}, but this service expects "
                f"{' or '.join(repr(a) for a in settings.audience)}: ask the identity provider for a token "
                "for this service."
            )
        if isinstance(exc, MissingRequiredClaimError):
            return f"The token has no {exc.claim!r} claim, which this service requires."
        if isinstance(exc, InvalidSignatureError):
            return (
                f"The token's signature does not verify with the keys of {settings.issuer}: it was not "
                "issued by that identity provider, or it was altered."
            )
        if isinstance(exc, InvalidAlgorithmError):
            return f"The token's algorithm does not match its key: {exc}."
        return f"The token was refused: {exc}."

    def _username(self, claims: Mapping[str, Any]) -> str:
        name = _claim(claims, self.settings.username_claim)
        if not isinstance(name, str) or not name:
            raise self._refuse(
                f"The token has no {self.settings.username_claim!r} claim to name the user; the service "
                "operator may need to set auth.username_claim."
            )
        return name

    def _groups(self, claims: Mapping[str, Any]) -> frozenset[str]:
        idp_groups: set[str] = set()
        for claim_name in self.settings.groups_claim:
            idp_groups |= _group_names(_claim(claims, claim_name))
        mapping = self.settings.groups_map
        if mapping:
            groups = {target for g in idp_groups for target in mapping.get(g, ())}
        else:
            groups = idp_groups - {ALL_GROUPS}
        return frozenset(groups) | {PUBLIC_GROUP}


def identity_dependency(authenticator: Authenticator) -> Callable[[Request], Identity]:
    """A FastAPI dependency: `identity: Identity = Depends(identity_dependency(auth))`. It is a plain
    function, so FastAPI runs it in its thread pool and a JWKS fetch never blocks the event loop. The
    identity is also left on `request.state.identity` for access logs."""

    def identity(request: Request) -> Identity:
        who = authenticator.identify(request.headers.get("authorization"))
        request.state.identity = who
        return who

    return identity


def _looks_like_jwt(token: str) -> bool:
    parts = token.split(".")
    if len(parts) != 3 or not all(parts[:2]) or not all(_B64URL.match(p) for p in parts):
        return False
    try:
        header = json.loads(base64.urlsafe_b64decode(parts[0] + "=" * (-len(parts[0]) % 4)))
    except (ValueError, binascii.Error):
        return False
    return isinstance(header, dict) and "alg" in header


def _claim(claims: Mapping[str, Any], name: str) -> Any:
    if name in claims:
        return claims[name]
    value: Any = claims
    for part in name.split("."):
        if not isinstance(value, Mapping) or part not in value:
            return None
        value = value[part]
    return value


def _group_names(value: Any) -> set[str]:
    if value is None:
        return set()
    if isinstance(value, str):
        return {g for g in re.split(r"[\s,]+", value) if g}
    names: set[str] = set()
    if isinstance(value, list):
        for item in value:
            if isinstance(item, str) and item:
                names.add(item)
            elif isinstance(item, Mapping) and isinstance(item.get("name"), str):
                names.add(item["name"])
    return names


def _when(value: Any) -> str:
    try:
        return datetime.fromtimestamp(float(value), UTC).strftime("%Y-%m-%d %H:%M:%S UTC")
    except (TypeError, ValueError, OverflowError, OSError):
        return "an unreadable time"


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 120 else text[:117] + "..."


def _quote(text: str) -> str:
    # RFC 6750 §3: error_description is printable ASCII without '"' and '\'
    cleaned = text.replace('"', "'").replace("\\", "/")
    return "".join(c if 0x20 <= ord(c) < 0x7F else "?" for c in cleaned)


if __name__ == "__main__":
    raise SystemExit(main())
