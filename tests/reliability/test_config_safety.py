"""YAML is read with safe_load only: a config that asks for Python objects is refused and runs nothing."""

from __future__ import annotations

import pytest

from grpo_llm_eval.config.load import ConfigError, load_config
from tests.reliability.helpers import run_cli

PAYLOADS = [
    '!!python/object/apply:os.system ["touch {marker}"]',
    '!!python/object/apply:subprocess.check_call [["touch", "{marker}"]]',
    '!!python/object/new:os.system ["touch {marker}"]',
    '!!python/name:os.system',
]


def config_with(tmp_path, payload: str, where: str) -> str:
    marker = tmp_path / "pwned"
    value = payload.format(marker=marker)
    text = f"total_steps: 1\nrun_name: {value}\n" if where == "value" else f"{value}\n"
    path = tmp_path / "evil.yaml"
    path.write_text(text, encoding="utf-8")
    return str(path)


class TestYamlSafeLoad:
    @pytest.mark.parametrize("where", ["value", "document"])
    @pytest.mark.parametrize("payload", PAYLOADS)
    def test_python_tags_are_refused_and_nothing_runs(self, tmp_path, payload, where):
        with pytest.raises(ConfigError, match="invalid YAML"):
            load_config(config_with(tmp_path, payload, where))
        assert not (tmp_path / "pwned").exists()

    def test_a_python_tag_in_set_stays_inert_text(self, tmp_path):
        marker = tmp_path / "pwned"
        cfg = load_config(None, [f'run_name=!!python/object/apply:os.system ["touch {marker}"]'])
        assert isinstance(cfg.run_name, str) and "os.system" in cfg.run_name
        assert not marker.exists()

    def test_the_cli_exits_2_with_a_config_error_and_nothing_runs(self, tmp_path):
        result = run_cli(["--config", config_with(tmp_path, PAYLOADS[0], "value"), "--dry-run"])
        assert result.rc == 2
        assert result.err.startswith("config error: ") and "invalid YAML" in result.err
        assert not (tmp_path / "pwned").exists()
