"""Config loading: YAML + --set overrides into JobConfig, errors that name the key, and the config hash."""

from __future__ import annotations

import pytest

from jobs.config import load_config_dict, load_job_config, parse_override
from stylid_core.config import ConfigError, JobConfig


def test_yaml_and_overrides_parse_into_job_config(tmp_path):
    path = tmp_path / "job.yaml"
    path.write_text(
        "name: mine\nfaces:\n  upsample: 1\nstylize:\n  engine: classical\n  options: {levels: 6}\n"
        "  mosaic: {max_face_px: 48}\nresources:\n  faces: {batch_size: 3}\n"
    )
    cfg = load_job_config(
        str(path), ["score.redetect=false", "stylize.mosaic.margin=0.25", "io.image_format=jpg", "faces.max_faces=5"]
    )
    assert isinstance(cfg, JobConfig)
    assert cfg.name == "mine"
    assert cfg.faces.upsample == 1 and cfg.faces.max_faces == 5
    assert cfg.stylize.options == {"levels": 6}
    assert cfg.stylize.mosaic.max_face_px == 48 and cfg.stylize.mosaic.margin == 0.25
    assert cfg.score.redetect is False and cfg.score.compare_without_mosaic is True
    assert cfg.io.image_format == "jpg"
    # a partial resources override keeps the stage's other defaults
    assert cfg.resources.faces.batch_size == 3 and cfg.resources.faces.num_cpus == 0.5


def test_parse_override_reads_yaml_values():
    assert parse_override("a.b=3") == (["a", "b"], 3)
    assert parse_override("x=true") == (["x"], True)
    assert parse_override("x=null") == (["x"], None)
    assert parse_override("x=[1, 2]") == (["x"], [1, 2])
    assert parse_override("x=hog") == (["x"], "hog")


def test_bundled_config_names_resolve():
    assert load_job_config("default").stylize.engine == "neural"
    with pytest.raises(ConfigError, match="not found"):
        load_job_config("no_such_config")


@pytest.mark.parametrize(
    "overrides, key",
    [
        (["faces.colour=1"], "faces.colour"),
        (["bogus=1"], "bogus"),
        (["stylize.mosaic.blur=2"], "stylize.mosaic.blur"),
        (["resources.faces.gpus=1"], "resources.faces"),
        (["faces.backend=opencv"], "faces.backend"),
        (["faces.upsample=9"], "faces.upsample"),
        (["stylize.mosaic.margin=5"], "stylize.mosaic.margin"),
        (["stylize.mosaic.feather=0"], "stylize.mosaic.feather"),
        (["io.image_format=gif"], "io.image_format"),
        (["faces.det_size=100"], "faces.det_size"),
        (["faces=3"], "faces"),
    ],
)
def test_unknown_keys_and_bad_values_raise_config_error_naming_the_key(overrides, key):
    with pytest.raises(ConfigError) as info:
        load_job_config("default", overrides)
    assert key in str(info.value)


def test_bad_override_syntax_raises_config_error():
    with pytest.raises(ConfigError, match="key=value"):
        load_config_dict(None, ["faces.upsample"])
    with pytest.raises(ConfigError, match="not a mapping"):
        load_config_dict(None, ["name=x", "name.y=1"])


def test_default_yaml_hashes_like_the_dataclass_defaults():
    from_yaml = load_job_config("default")
    assert from_yaml.config_hash() == JobConfig().config_hash()
    assert from_yaml.is_default()


@pytest.mark.parametrize(
    "override",
    ["faces.upsample=1", "stylize.mosaic.max_face_px=48", "stylize.options.style_strength=0.5", "io.max_pixels=10"],
)
def test_semantic_changes_change_the_hash(override):
    cfg = load_job_config("default", [override])
    assert cfg.config_hash() != JobConfig().config_hash()
    assert not cfg.is_default()


@pytest.mark.parametrize(
    "override",
    ["resources.faces.batch_size=8", "resources.score.num_cpus=0.25", "name=other",
     "io.storage_options.endpoint_url=http://127.0.0.1:1"],
)  # fmt: skip
def test_resources_name_and_credentials_do_not_change_the_hash(override):
    cfg = load_job_config("default", [override])
    assert cfg.config_hash() == JobConfig().config_hash()
    assert cfg.is_default()


def test_int_and_float_spellings_hash_the_same():
    assert load_job_config(None, ["stylize.mosaic.max_face_px=128"]).config_hash() == JobConfig().config_hash()
    assert load_job_config(None, ["stylize.mosaic.max_face_px=128.0"]).config_hash() == JobConfig().config_hash()


def test_layout_retry_and_credential_settings_leave_every_jobs_config_hash_alone():
    from stylid_core.config import ScoreJobConfig
    from stylid_core.customize.job_config import CustomizeJobConfig

    io = {"rows_per_shard": 7, "retries": 2, "retry_backoff_s": 1.0, "request_timeout_s": 5.0,
          "storage_options": {"key": "k"}}  # fmt: skip
    for cls in (JobConfig, ScoreJobConfig, CustomizeJobConfig):
        assert cls.from_dict({"io": io}).config_hash() == cls.from_dict({}).config_hash(), cls.__name__
        assert cls.from_dict({"io": {"max_bytes": 1000}}).config_hash() != cls.from_dict({}).config_hash()
