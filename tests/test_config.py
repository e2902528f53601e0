from pathlib import Path

import pytest

from recsys_pipeline.config import ConfigError, load_config, parse_override


def test_default_config_is_valid_and_points_at_bundled_sample() -> None:
    config = load_config()
    assert config.source.path.is_file()
    assert config.mlflow.model_name == "recsys-als"
    assert config.spark.master == "local[*]"


def test_invalid_field_is_named_in_the_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"als\.factors"):
        load_config(overrides={"als.factors": -3})


def test_unknown_field_is_rejected() -> None:
    with pytest.raises(ConfigError, match=r"als\.factorz"):
        load_config(overrides={"als.factorz": 3})


def test_incomplete_column_mapping_is_rejected() -> None:
    with pytest.raises(ConfigError, match="mapping.user_id"):
        load_config(overrides={"source.mapping.user_id": None})


def test_missing_and_malformed_files_give_clear_errors(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "nope.yaml")
    broken = tmp_path / "broken.yaml"
    broken.write_text("als: [unclosed")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(broken)


def test_overrides_keep_yaml_types() -> None:
    assert parse_override("als.factors=8") == ("als.factors", 8)
    assert parse_override("spark.master=local[2]") == ("spark.master", "local[2]")
    assert load_config(overrides=dict([parse_override("als.factors=8")])).als.factors == 8
    with pytest.raises(ConfigError, match="section.key=value"):
        parse_override("factors")
