"""Authentication and data-rights identity (api/auth.py) with real keys, real JWKS over HTTP and a real
FastAPI app served by uvicorn: every token here is signed by cryptography/PyJWT, never faked."""

import base64
import hashlib
import hmac
import json
import socket
import threading
import time
import tomllib
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Annotated

import httpx
import jwt
import pytest
import uvicorn
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from fastapi import Depends, FastAPI
from jwt.algorithms import ECAlgorithm, RSAAlgorithm

from api.auth import (
    Authenticator,
    AuthError,
    AuthSettings,
    Identity,
    auth_exception_handler,
    format_token_entry,
    hash_token,
    identity_dependency,
    load_auth_settings,
    new_token,
)

ISSUER = "https://idp.test.example/"
AUDIENCE = "dac-lake-test"
RSA_KEY = rsa.generate_private_key(public_exponent=65537, key_size=2048)
RSA_KEY_NEW = rsa.generate_private_key(public_exponent=65537, key_size=2048)
OTHER_KEY = rsa.generate_private_key(public_exponent=65537, key_size=2048)
EC_KEY = ec.generate_private_key(ec.SECP256R1())
ALICE_TOKEN = "dac_alice-static-token-0123456789abcdef"
SERVICE_TOKEN = "dac_service-token-with-all-groups"


def public_jwk(private_key, kid: str) -> dict:
    if isinstance(private_key, rsa.RSAPrivateKey):
        data = RSAAlgorithm.to_jwk(private_key.public_key(), as_dict=True)
        data["alg"] = "RS256"
    else:
        data = ECAlgorithm.to_jwk(private_key.public_key(), as_dict=True)
        data["alg"] = "ES256"
    return {**data, "kid": kid, "use": "sig"}


class JwksServer:
    """A JWKS endpoint on 127.0.0.1 whose key set a test can change (key rotation) and whose fetches it
    can count (refetch on unknown kid, cooldown)."""

    def __init__(self, keys: list[dict]):
        self.keys = keys
        self.hits = 0
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self):
                outer.hits += 1
                body = json.dumps({"keys": outer.keys}).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args):
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/.well-known/jwks.json"
        self.thread = threading.Thread(target=self.httpd.serve_forever, args=(0.05,), daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def jwks() -> Iterator[JwksServer]:
    server = JwksServer([public_jwk(RSA_KEY, "rsa-1"), public_jwk(EC_KEY, "ec-1")])
    yield server
    server.close()


def oidc_table(jwks_url: str, /, **extra) -> dict:
    table = {
        "jwks_url": jwks_url,
        "issuer": ISSUER,
        "audience": AUDIENCE,
        "jwks_refetch_cooldown_seconds": 0,
        "tokens": [
            {"user": "alice", "groups": ["lsst"], "token_sha256": hash_token(ALICE_TOKEN)},
            {"user": "portal", "groups": ["*"], "token_sha256": hash_token(SERVICE_TOKEN)},
        ],
    }
    table.update(extra)
    return table


def make_auth(jwks: JwksServer, **extra) -> Authenticator:
    return Authenticator(AuthSettings.from_mapping(oidc_table(jwks.url, **extra), {}))


def sign(key=RSA_KEY, kid: str | None = "rsa-1", alg: str = "RS256", **claims) -> str:
    now = int(time.time())
    payload = {
        "iss": ISSUER,
        "aud": AUDIENCE,
        "sub": "u-1234",
        "preferred_username": "bob",
        "groups": ["lsst", "des"],
        "iat": now,
        "exp": now + 300,
    }
    payload.update(claims)
    payload = {k: v for k, v in payload.items() if v is not None}
    headers = {"kid": kid} if kid else {}
    return jwt.encode(payload, key, algorithm=alg, headers=headers)


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def handmade(header: dict, claims: dict, signer) -> str:
    """A JWT assembled by hand, for the forgeries PyJWT refuses to produce."""
    signing_input = f"{b64url(json.dumps(header).encode())}.{b64url(json.dumps(claims).encode())}"
    return f"{signing_input}.{b64url(signer(signing_input.encode()))}"


def basic(user: str, password: str) -> str:
    return "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()


def refused(
    auth: Authenticator, header: str | None, secret: str | None = None, status: int = 401
) -> AuthError:
    """Expect a refusal; check it never echoes the secret and that a 401 carries both challenges."""
    with pytest.raises(AuthError) as info:
        auth.identify(header)
    err = info.value
    assert err.http_status == status
    if secret:
        assert secret not in err.message
        assert all(secret not in c for c in err.www_authenticate)
    if status == 401:
        schemes = [c.split(" ", 1)[0] for c in err.www_authenticate]
        assert schemes == ["Bearer", "Basic"]
        assert all('realm="dac-lake"' in c for c in err.www_authenticate)
    return err


# ------------------------------------------------------------------------------------------------ JWT


def test_valid_jwt_gives_user_and_groups(jwks):
    auth = make_auth(jwks)
    who = auth.identify(f"Bearer {sign()}")
    assert who == Identity("u-1234", frozenset({"public", "lsst", "des"}), "jwt")
    ec_token = sign(key=EC_KEY, kid="ec-1", alg="ES256", groups=["euclid"])
    assert auth.identify(f"bearer {ec_token}").groups == {"public", "euclid"}


def test_username_claim(jwks):
    auth = make_auth(jwks, username_claim="preferred_username")
    assert auth.identify(f"Bearer {sign()}").name == "bob"
    token = sign(preferred_username=None)
    err = refused(auth, f"Bearer {token}", token)
    assert "'preferred_username'" in err.message


def test_expired_jwt(jwks):
    auth = make_auth(jwks)
    token = sign(iat=int(time.time()) - 7200, exp=int(time.time()) - 3600)
    err = refused(auth, f"Bearer {token}", token)
    assert "expired" in err.message and ISSUER in err.message
    assert 'error="invalid_token"' in err.www_authenticate[0]


def test_leeway_tolerates_small_clock_skew(jwks):
    token = sign(exp=int(time.time()) - 5)
    assert make_auth(jwks, leeway_seconds=30).identify(f"Bearer {token}").name == "u-1234"
    refused(make_auth(jwks, leeway_seconds=0), f"Bearer {token}", token)


def test_not_yet_valid_jwt(jwks):
    token = sign(nbf=int(time.time()) + 3600)
    err = refused(make_auth(jwks), f"Bearer {token}", token)
    assert "not valid before" in err.message and "(nbf)" in err.message


def test_wrong_issuer_names_the_expected_one(jwks):
    token = sign(iss="https://elsewhere.example/")
    err = refused(make_auth(jwks), f"Bearer {token}", token)
    assert "https://elsewhere.example/" in err.message and repr(ISSUER) in err.message


def test_wrong_audience_names_the_expected_one(jwks):
    token = sign(aud="some-other-app")
    err = refused(make_auth(jwks), f"Bearer {token}", token)
    assert "'some-other-app'" in err.message and repr(AUDIENCE) in err.message
    token = sign(aud=None)
    assert "'aud'" in refused(make_auth(jwks), f"Bearer {token}", token).message


def test_signature_by_another_key_is_refused(jwks):
    token = sign(key=OTHER_KEY, kid="rsa-1")
    err = refused(make_auth(jwks), f"Bearer {token}", token)
    assert "signature does not verify" in err.message


def test_tampered_claims_are_refused(jwks):
    header, payload, signature = sign(groups=["public"]).split(".")
    claims = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
    claims["groups"] = ["lsst"]
    token = f"{header}.{b64url(json.dumps(claims).encode())}.{signature}"
    refused(make_auth(jwks), f"Bearer {token}", token)


def test_alg_none_is_refused(jwks):
    now = int(time.time())
    claims = {"iss": ISSUER, "aud": AUDIENCE, "sub": "mallory", "groups": ["lsst"], "exp": now + 300}
    token = handmade({"alg": "none", "typ": "JWT", "kid": "rsa-1"}, claims, lambda _: b"")
    err = refused(make_auth(jwks), f"Bearer {token}", token)
    assert "'none'" in err.message and "accepts only RS256, ES256" in err.message
    assert jwks.hits == 0  # refused before any key is looked up


def test_hs256_signed_with_the_public_key_is_refused(jwks):
    """The algorithm-confusion forgery: HMAC keyed with the IdP's (public) RSA key."""
    now = int(time.time())
    claims = {"iss": ISSUER, "aud": AUDIENCE, "sub": "mallory", "groups": ["lsst"], "exp": now + 300}
    pem = RSA_KEY.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    token = handmade(
        {"alg": "HS256", "typ": "JWT", "kid": "rsa-1"},
        claims,
        lambda data: hmac.new(pem, data, hashlib.sha256).digest(),
    )
    err = refused(make_auth(jwks), f"Bearer {token}", token)
    assert "'HS256'" in err.message and "accepts only RS256, ES256" in err.message


def test_token_alg_must_match_its_key(jwks):
    # ES256 is allowed, but the key named by the token is an RSA key
    token = handmade(
        {"alg": "ES256", "kid": "rsa-1"},
        {"iss": ISSUER, "aud": AUDIENCE, "sub": "x", "exp": int(time.time()) + 300},
        lambda data: ECAlgorithm(ECAlgorithm.SHA256).sign(data, EC_KEY),
    )
    err = refused(make_auth(jwks), f"Bearer {token}", token)
    assert "does not match" in err.message


@pytest.mark.parametrize("algorithms", [["none"], ["HS256"], ["RS256", "hs512"], ["XX999"], []])
def test_unsafe_algorithms_cannot_be_configured(jwks, algorithms):
    with pytest.raises(ValueError, match="algorithm"):
        AuthSettings.from_mapping(oidc_table(jwks.url, algorithms=algorithms), {})


def test_unknown_kid_refetches_once_then_key_rotation(jwks):
    auth = make_auth(jwks)
    assert auth.identify(f"Bearer {sign()}").name == "u-1234"
    assert jwks.hits == 1
    assert auth.identify(f"Bearer {sign()}").name == "u-1234"
    assert jwks.hits == 1  # cached

    rotated = sign(key=RSA_KEY_NEW, kid="rsa-2")
    err = refused(auth, f"Bearer {rotated}", rotated)
    assert "'rsa-2'" in err.message and jwks.url in err.message
    assert jwks.hits == 2  # exactly one refetch for the unknown kid

    jwks.keys = [public_jwk(RSA_KEY_NEW, "rsa-2")]  # the IdP rotates: old key retired
    assert auth.identify(f"Bearer {rotated}") == Identity("u-1234", frozenset({"lsst", "des"}), "jwt")
    assert jwks.hits == 3
    old = sign()
    refused(auth, f"Bearer {old}", old)
    assert jwks.hits == 4


def test_refetch_cooldown_protects_the_idp(jwks):
    auth = make_auth(jwks, jwks_refetch_cooldown_seconds=60)
    auth.identify(f"Bearer {sign()}")
    for kid in ("random-1", "random-2", "random-3"):
        token = sign(key=OTHER_KEY, kid=kid)
        refused(auth, f"Bearer {token}", token)
    assert jwks.hits == 1


def test_unreachable_jwks_is_a_503(jwks):
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    auth = make_auth(jwks, jwks_url=f"http://127.0.0.1:{port}/jwks.json", jwks_timeout_seconds=2)
    token = sign()
    err = refused(auth, f"Bearer {token}", token, status=503)
    assert "try again later" in err.message.lower()


def test_jwks_file_for_offline_deployments(tmp_path, jwks):
    path = tmp_path / "jwks.json"
    path.write_text(json.dumps({"keys": [public_jwk(RSA_KEY, "rsa-1")]}))
    table = oidc_table("unused", jwks_file=str(path))
    del table["jwks_url"]
    auth = Authenticator(AuthSettings.from_mapping(table, {}))
    assert auth.identify(f"Bearer {sign()}").method == "jwt"
    rotated = sign(key=RSA_KEY_NEW, kid="rsa-2")
    refused(auth, f"Bearer {rotated}", rotated)
    path.write_text(json.dumps({"keys": [public_jwk(RSA_KEY, "rsa-1"), public_jwk(RSA_KEY_NEW, "rsa-2")]}))
    assert auth.identify(f"Bearer {rotated}").name == "u-1234"


def test_token_without_kid_needs_a_single_key(tmp_path, jwks):
    path = tmp_path / "jwks.json"
    path.write_text(json.dumps({"keys": [public_jwk(EC_KEY, "ec-1")]}))
    table = {**oidc_table("unused", jwks_file=str(path)), "jwks_url": None}
    auth = Authenticator(AuthSettings.from_mapping({k: v for k, v in table.items() if v is not None}, {}))
    token = sign(key=EC_KEY, kid=None, alg="ES256")
    assert auth.identify(f"Bearer {token}").name == "u-1234"
    path.write_text(json.dumps({"keys": [public_jwk(EC_KEY, "ec-1"), public_jwk(RSA_KEY, "rsa-1")]}))
    assert "no key id" in refused(auth, f"Bearer {token}", token).message


def test_jwt_without_oidc_configuration_gets_a_clear_message():
    auth = Authenticator(AuthSettings.from_mapping({}, {}))
    token = sign()
    err = refused(auth, f"Bearer {token}", token)
    assert "not configured to accept" in err.message


# ------------------------------------------------------------------------------------------------ groups


def test_groups_map_keeps_only_mapped_groups(jwks):
    auth = make_auth(jwks, groups_map={"/lsst/members": "lsst", "cn=des": ["des", "des-y6"]})
    token = sign(groups=["/lsst/members", "cn=des", "lsst-admins", "*"])
    assert auth.identify(f"Bearer {token}").groups == {"public", "lsst", "des", "des-y6"}
    token = sign(groups=["unmapped"])
    assert auth.identify(f"Bearer {token}").groups == {"public"}


def test_idp_cannot_grant_all_catalogs_unless_mapped(jwks):
    token = sign(groups=["*", "lsst"])
    assert make_auth(jwks).identify(f"Bearer {token}").groups == {"public", "lsst"}
    trusted = make_auth(jwks, groups_map={"dac-admins": "*"})
    assert "*" in trusted.identify(f"Bearer {sign(groups=['dac-admins'])}").groups


def test_group_claim_shapes(jwks):
    auth = make_auth(jwks, groups_claim=["groups", "isMemberOf", "realm_access.roles", "scope"])
    token = sign(
        groups=None,
        isMemberOf=[{"name": "g-member", "id": 17}, {"id": 3}],
        realm_access={"roles": ["g-role"]},
        scope="g-scope1 g-scope2",
    )
    assert auth.identify(f"Bearer {token}").groups == {"public", "g-member", "g-role", "g-scope1", "g-scope2"}
    # a claim whose name contains dots is found by its exact name
    auth = make_auth(jwks, groups_claim="https://example.org/groups")
    token = sign(**{"https://example.org/groups": "a,b"})
    assert auth.identify(f"Bearer {token}").groups == {"public", "a", "b"}


# ---------------------------------------------------------------------------------------- static tokens


def test_static_token(jwks):
    auth = make_auth(jwks)
    assert auth.identify(f"Bearer {ALICE_TOKEN}") == Identity("alice", frozenset({"lsst"}), "token")
    assert "*" in auth.identify(f"Bearer {SERVICE_TOKEN}").groups
    wrong = ALICE_TOKEN[:-1] + "X"
    err = refused(auth, f"Bearer {wrong}", wrong)
    assert "not known" in err.message


def test_expired_static_token():
    table = {"tokens": [{"user": "old", "token_sha256": hash_token("dac_old"), "expires": "2020-01-01"}]}
    err = refused(Authenticator(AuthSettings.from_mapping(table, {})), "Bearer dac_old", "dac_old")
    assert "expired on 2020-01-01" in err.message


def test_plain_tokens_are_refused_in_configuration():
    with pytest.raises(ValueError, match="token_sha256"):
        AuthSettings.from_mapping({"tokens": [{"user": "a", "token": "dac_secret"}]}, {})
    with pytest.raises(ValueError, match="64 hexadecimal"):
        AuthSettings.from_mapping({"tokens": [{"user": "a", "token_sha256": "abc"}]}, {})
    with pytest.raises(ValueError, match="unknown setting"):
        AuthSettings.from_mapping({"alow_anonymous": False}, {})
    with pytest.raises(ValueError, match="issuer"):
        AuthSettings.from_mapping({"jwks_url": "https://idp.example/jwks"}, {})


def test_new_token_round_trip():
    made = new_token("carol", ["lsst", "des"])
    assert made.token.startswith("dac_") and made.token not in made.config_entry
    assert made.token_sha256 == hashlib.sha256(made.token.encode()).hexdigest()
    table = tomllib.loads(made.config_entry)
    auth = Authenticator(AuthSettings.from_mapping(table, {}))
    assert auth.identify(f"Bearer {made.token}") == Identity("carol", frozenset({"lsst", "des"}), "token")
    assert new_token("carol").token != made.token
    assert 'user = "we\\"ird"' in format_token_entry('we"ird', [], made.token_sha256)


# ------------------------------------------------------------------------------------- Basic, anonymous


def test_basic_with_token_as_password(jwks):
    auth = make_auth(jwks)
    assert auth.identify(basic("whoever", ALICE_TOKEN)) == Identity("alice", frozenset({"lsst"}), "basic")
    assert auth.identify(basic(ALICE_TOKEN, "")).name == "alice"  # curl -u TOKEN:
    who = auth.identify(basic("bob", sign()))
    assert (who.name, who.method, who.groups) == ("u-1234", "basic", {"public", "lsst", "des"})
    err = refused(auth, basic("alice", "not-the-token"), "not-the-token")
    assert "not known" in err.message
    refused(auth, "Basic !!!notbase64")
    refused(auth, "Basic " + base64.b64encode(b"no-colon").decode())


def test_anonymous_allowed_and_disallowed(jwks):
    assert make_auth(jwks).identify(None) == Identity(None, frozenset({"public"}), "anonymous")
    assert make_auth(jwks).identify("   ").anonymous
    closed = make_auth(jwks, allow_anonymous=False)
    err = refused(closed, None)
    assert err.www_authenticate == ('Bearer realm="dac-lake"', 'Basic realm="dac-lake", charset="UTF-8"')
    assert "requires authentication" in err.message
    assert closed.identify(f"Bearer {ALICE_TOKEN}").name == "alice"
    # a bad token is refused even where anonymous access is allowed
    refused(make_auth(jwks), "Bearer nonsense", "nonsense")
    refused(make_auth(jwks), "Digest username=x")


def test_settings_from_file_and_environment(tmp_path, jwks):
    tokens_file = tmp_path / "tokens.toml"
    tokens_file.write_text(format_token_entry("dave", ["des"], hash_token("dac_dave")).replace("auth.", ""))
    config = tmp_path / "dac.toml"
    config.write_text(
        f'lake_url = "./lake"\n[auth]\nallow_anonymous = true\njwks_url = "{jwks.url}"\n'
        f'issuer = "{ISSUER}"\naudience = "from-file"\n[auth.groups_map]\nidp-des = "des"\n'
    )
    env = {
        "DAC_CONFIG": str(config),
        "DAC_AUTH_TOKENS_FILE": str(tokens_file),
        "DAC_AUTH_ALLOW_ANONYMOUS": "false",
        "DAC_AUTH_AUDIENCE": f"{AUDIENCE},other",
        "DAC_AUTH_LEEWAY": "5",
    }
    settings = load_auth_settings(env)
    assert settings.allow_anonymous is False and settings.audience == (AUDIENCE, "other")
    assert settings.leeway_seconds == 5 and settings.groups_map == {"idp-des": ("des",)}
    assert "token_sha256" not in json.dumps(settings.masked())
    auth = Authenticator(settings)
    assert auth.identify("Bearer dac_dave").groups == {"public", "des"}
    assert auth.identify(f"Bearer {sign(groups=['idp-des', 'lsst'])}").groups == {"public", "des"}
    refused(auth, None)
    with pytest.raises(ValueError, match="true or false"):
        AuthSettings.from_mapping({}, {"DAC_AUTH_ALLOW_ANONYMOUS": "perhaps"})


# ------------------------------------------------------------------------------------------------ HTTP


@pytest.fixture
def whoami_url(jwks) -> Iterator[str]:
    open_auth = make_auth(jwks)
    closed_auth = make_auth(jwks, allow_anonymous=False)
    app = FastAPI()
    app.add_exception_handler(AuthError, auth_exception_handler)

    @app.get("/whoami")
    def whoami(identity: Annotated[Identity, Depends(identity_dependency(open_auth))]) -> dict:
        return identity.to_dict()

    @app.get("/private/whoami")
    def private_whoami(identity: Annotated[Identity, Depends(identity_dependency(closed_auth))]) -> dict:
        return identity.to_dict()

    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="off"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started:
        assert time.monotonic() < deadline, "uvicorn did not start"
        time.sleep(0.02)
    yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    server.should_exit = True
    thread.join(10)
    sock.close()


def test_identity_over_http(whoami_url):
    with httpx.Client(base_url=whoami_url, timeout=10) as client:
        assert client.get("/whoami").json() == {"name": None, "groups": ["public"], "method": "anonymous"}
        got = client.get("/whoami", headers={"Authorization": f"Bearer {ALICE_TOKEN}"}).json()
        assert got == {"name": "alice", "groups": ["lsst", "public"], "method": "token"}
        got = client.get("/whoami", headers={"Authorization": f"Bearer {sign()}"}).json()
        assert got == {"name": "u-1234", "groups": ["des", "lsst", "public"], "method": "jwt"}
        got = client.get("/whoami", auth=("alice", ALICE_TOKEN)).json()
        assert got == {"name": "alice", "groups": ["lsst", "public"], "method": "basic"}
        got = client.get("/whoami", auth=("me", sign(key=EC_KEY, kid="ec-1", alg="ES256"))).json()
        assert got["name"] == "u-1234" and got["method"] == "basic"

        bad = client.get("/whoami", headers={"Authorization": "Bearer dac_wrong-token"})
        assert bad.status_code == 401 and "dac_wrong-token" not in bad.text
        assert [c.split(" ")[0] for c in bad.headers.get_list("www-authenticate")] == ["Bearer", "Basic"]

        closed = client.get("/private/whoami")
        assert closed.status_code == 401 and "requires authentication" in closed.text
        assert closed.headers.get_list("www-authenticate") == [
            'Bearer realm="dac-lake"',
            'Basic realm="dac-lake", charset="UTF-8"',
        ]
        assert client.get("/private/whoami", auth=("x", ALICE_TOKEN)).json()["name"] == "alice"
        expired = sign(exp=int(time.time()) - 3600)
        late = client.get("/private/whoami", headers={"Authorization": f"Bearer {expired}"})
        assert late.status_code == 401 and "expired" in late.text and expired not in late.text
