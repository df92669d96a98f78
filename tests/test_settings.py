"""Settings: file, environment and overrides; secrets never printed."""

from __future__ import annotations

import json

from typer.testing import CliRunner

from dac_lake.cli import app
from dac_lake.settings import load_settings


def test_file_then_env_then_override(tmp_path):
    cfg = tmp_path / "dac.toml"
    cfg.write_text(
        'lake_url = "s3://from-file/x"\n[s3]\nendpoint_url = "http://10.0.0.1:7480"\nregion = "eu-1"\n'
    )
    env = {"DAC_CONFIG": str(cfg)}
    s = load_settings(env)
    assert (
        s.lake_url == "s3://from-file/x"
        and s.s3.endpoint_url == "http://10.0.0.1:7480"
        and s.s3.region == "eu-1"
    )
    env["DAC_LAKE_URL"] = "s3://from-env/y"
    env["AWS_ENDPOINT_URL"] = "http://127.0.0.1:9000"
    s = load_settings(env)
    assert s.lake_url == "s3://from-env/y" and s.s3.endpoint_url == "http://127.0.0.1:9000"
    env["DAC_S3_ENDPOINT_URL"] = "https://rgw.example.org"
    s = load_settings(env, lake_url="/data/lake")
    assert s.s3.endpoint_url == "https://rgw.example.org" and s.s3.use_ssl and s.lake_url == "/data/lake"
    assert s.s3.endpoint_host == "rgw.example.org"


def test_config_show_masks_secrets(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("DAC_CONFIG", raising=False)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIAEXAMPLEKEY123456")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "verysecretvalue-do-not-print")
    result = CliRunner().invoke(app, ["config", "show"])
    assert result.exit_code == 0, result.output
    assert "verysecretvalue" not in result.output
    assert "AKIAEXAMPLEKEY123456" not in result.output
    data = json.loads(result.output)
    assert data["s3"]["access_key_id"].startswith("AKIA") and data["s3"]["secret_access_key"] == "********"
