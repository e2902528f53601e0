from pathlib import Path

import pytest
import yaml

from recsys_pipeline.config import SAMPLE_PROFILE_PATH, ConfigError, load_config, parse_override


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


def test_a_profile_of_ones_own_takes_the_defaults_and_nothing_of_the_sample(tmp_path: Path) -> None:
    profile = tmp_path / "mine.yaml"
    profile.write_text(
        "source:\n"
        "  name: mine\n"
        "  path: /data/ratings.csv\n"
        "  mapping: {user_id: userId, item_id: movieId, value: rating, timestamp: timestamp}\n"
        "  default_event_type: rating\n"
        "als:\n"
        "  factors: 32\n"
    )
    mine, sample = load_config(profile), load_config(SAMPLE_PROFILE_PATH)
    assert mine.source.name == "mine" and mine.source.header  # the field's default, not the sample's
    # The sample's item metadata does not come along: content is off until a profile describes items.
    assert sample.content.enabled and sample.content.source is not None
    assert not mine.content.enabled and mine.content.source is None
    # Sections merge key by key: the one field set here, every other from the defaults.
    assert mine.als.factors == 32 and mine.als.regularization == sample.als.regularization
    assert mine.als.sweep == sample.als.sweep and mine.evaluation == sample.evaluation


def test_a_profile_without_a_source_is_refused_naming_what_to_add(tmp_path: Path) -> None:
    profile = tmp_path / "no_source.yaml"
    profile.write_text("als:\n  factors: 32\n")
    with pytest.raises(ConfigError, match=r"no_source.yaml names no source: add a `source:` section"):
        load_config(profile)
    # null replaces a whole section of the defaults.
    sample = yaml.safe_load(SAMPLE_PROFILE_PATH.read_text())
    profile.write_text(yaml.safe_dump(sample | {"als": {"sweep": None}}))
    assert load_config(profile).als.sweep is None


def test_where_state_lives_and_how_it_is_locked_make_no_other_version() -> None:
    base = load_config()
    elsewhere = load_config(
        overrides={
            "state_dir": "/srv/recsys",
            "locks": {"backend": "postgres", "dsn": "postgresql://airflow@db/airflow"},
        }
    )
    assert elsewhere.fingerprint() == base.fingerprint()
    assert load_config(overrides={"als.factors": 8}).fingerprint() != base.fingerprint()
