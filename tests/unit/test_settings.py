"""Settings: one object, env/YAML/overrides precedence, unknown keys refused, README in sync."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from gateway.settings import load_settings, settings_reference
from tests.conftest import REPO_ROOT


def test_precedence_file_then_env_then_overrides(tmp_path) -> None:  # noqa: ANN001
    config = tmp_path / "protege.yaml"
    config.write_text("server:\n  port: 9000\n  host: 0.0.0.0\nteacher:\n  model: openai/x\n")
    env = {"PROTEGE_SERVER__PORT": "9100", "PROTEGE_AUTH__API_KEYS": '{"a": "sk-a"}'}
    settings = load_settings(config_file=config, overrides={"teacher": {"timeout_s": 5}}, environ=env)
    assert settings.server.port == 9100  # env beats file
    assert settings.server.host == "0.0.0.0"  # file beats default
    assert settings.teacher.model == "openai/x" and settings.teacher.timeout_s == 5
    assert settings.auth.api_keys["a"].get_secret_value() == "sk-a"
    assert "sk-a" not in repr(settings)


def test_config_file_from_environment(tmp_path) -> None:  # noqa: ANN001
    config = tmp_path / "c.yaml"
    config.write_text("log:\n  synchronous: FULL\n")
    assert load_settings(environ={"PROTEGE_CONFIG": str(config)}).log.synchronous == "FULL"


@pytest.mark.parametrize("values", [{"servr": {}}, {"server": {"prot": 1}}, {"teacher": {"api_bse": "x"}}])
def test_unknown_keys_are_rejected(values) -> None:  # noqa: ANN001
    with pytest.raises(ValidationError):
        load_settings(overrides=values, environ={})


def test_unknown_env_key_is_rejected() -> None:
    with pytest.raises(ValidationError):
        load_settings(environ={"PROTEGE_SERVER__PORTT": "1"})


def test_readme_configuration_table_is_current() -> None:
    readme = (REPO_ROOT / "README.md").read_text()
    start = readme.index("<!-- settings-reference:start -->") + len("<!-- settings-reference:start -->")
    end = readme.index("<!-- settings-reference:end -->")
    assert readme[start:end].strip() == settings_reference().strip(), (
        "README configuration table is stale: run `python -m gateway.settings --write-readme`"
    )
