"""Settings: embedded defaults, environment prefix, TOML file, readable refusals."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from triage_node.config import CONFIG_FILE_ENV, DEV_SECRET, SettingsError, load_settings


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    import os

    for key in list(os.environ):
        if key.startswith("TRIAGE_"):
            monkeypatch.delenv(key)


def test_defaults_are_the_embedded_ones(tmp_path):
    settings = load_settings(data_dir=tmp_path)
    assert settings.effective_database_url == f"sqlite:///{tmp_path.resolve()}/triage.db"
    assert settings.effective_broker_url == "filesystem://"
    assert settings.inference_backend.value == "onnx"
    assert settings.spool_dir == tmp_path.resolve() / "spool"


def test_environment_prefix_overrides(monkeypatch):
    monkeypatch.setenv("TRIAGE_DICOM_PORT", "4242")
    monkeypatch.setenv("TRIAGE_ALLOWED_CALLERS", '["CT_ED_1@10.0.0.0/24"]')
    settings = load_settings()
    assert settings.dicom_port == 4242
    assert settings.allowed_callers == ["CT_ED_1@10.0.0.0/24"]


def test_settings_file_is_read_and_env_wins(monkeypatch, tmp_path):
    path = tmp_path / "node.toml"
    path.write_text('ae_title = "FROM_FILE"\ndicom_port = 5000\n')
    monkeypatch.setenv(CONFIG_FILE_ENV, str(path))
    monkeypatch.setenv("TRIAGE_DICOM_PORT", "6000")
    settings = load_settings()
    assert settings.ae_title == "FROM_FILE"
    assert settings.dicom_port == 6000


def test_bad_value_names_the_setting_and_what_is_allowed(monkeypatch):
    monkeypatch.setenv("TRIAGE_INFERENCE_BACKEND", "tensorflow")
    with pytest.raises(SettingsError) as info:
        load_settings()
    message = str(info.value)
    assert "TRIAGE_INFERENCE_BACKEND" in message
    assert "'onnx'" in message and "'triton'" in message


@pytest.mark.parametrize(
    ("field", "value", "needle"),
    [
        ("ae_title", "A" * 17, "1-16"),
        ("dicom_port", 70000, "65535"),
        ("allowed_callers", ["no-at-sign"], "AE@ip-or-cidr"),
        ("allowed_callers", ["CT@300.1.1.1"], "300.1.1.1"),
    ],
)
def test_invalid_values_are_refused(field, value, needle):
    with pytest.raises(SettingsError, match=needle):
        load_settings(**{field: value})


def test_production_refuses_the_default_secret():
    with pytest.raises(SettingsError, match="secret_key"):
        load_settings(environment="production")
    assert load_settings(environment="production", secret_key="s3cret-for-this-site")


@pytest.mark.parametrize("environment", ["development", "production"])
@pytest.mark.parametrize("secret", [DEV_SECRET, "replace-with-a-long-random-string", "short-secret"])
def test_no_environment_accepts_a_published_or_short_secret(environment, secret):
    with pytest.raises(SettingsError, match="TRIAGE_SECRET_KEY"):
        load_settings(environment=environment, secret_key=secret)


def test_there_is_no_default_secret_and_commands_that_use_one_refuse_to_start(tmp_path):
    settings = load_settings(data_dir=tmp_path)
    assert settings.secret_key is None
    with pytest.raises(SettingsError, match="TRIAGE_SECRET_KEY"):
        settings.require_secret()
    from triage_node.cli import build_app

    for argv in (["token", "create", "--role", "admin"], ["serve"], ["reconcile"]):
        result = CliRunner().invoke(build_app(), argv, env={"TRIAGE_DATA_DIR": str(tmp_path)})
        assert result.exit_code == 2, (argv, result.output)
        assert "TRIAGE_SECRET_KEY" in result.output
    assert not list(tmp_path.rglob("*.db"))  # refused before touching anything


def test_missing_settings_file_is_an_error(monkeypatch, tmp_path):
    monkeypatch.setenv(CONFIG_FILE_ENV, str(tmp_path / "absent.toml"))
    with pytest.raises(SettingsError, match="no such file"):
        load_settings()


def test_config_show_masks_secrets(monkeypatch):
    from triage_node.cli import app, basic  # noqa: F401

    monkeypatch.setenv("TRIAGE_SECRET_KEY", "very-secret-value")
    monkeypatch.setenv("TRIAGE_DATABASE_URL", "postgresql+psycopg2://triage:pw123@db:5432/triage")
    result = CliRunner().invoke(app, ["config", "show", "--json"])
    assert result.exit_code == 0, result.output
    shown = json.loads(result.output)
    assert "very-secret-value" not in result.output
    assert "pw123" not in result.output
    assert shown["secret_key"] == "********"
    assert shown["database_url"] == "postgresql+psycopg2://triage:********@db:5432/triage"


def test_config_show_refuses_bad_settings_with_exit_2(monkeypatch):
    from triage_node.cli import app, basic  # noqa: F401

    monkeypatch.setenv("TRIAGE_LOG_LEVEL", "LOUD")
    result = CliRunner().invoke(app, ["config", "show"])
    assert result.exit_code == 2
    assert "TRIAGE_LOG_LEVEL" in result.output
