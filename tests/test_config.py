import pytest

from orchard.config import Config, ConfigError, load_config


def test_embedded_preset_needs_no_file_and_no_environment():
    cfg = load_config(None, environ={})
    assert cfg.engine_for("generator").kind == "embedded"
    assert cfg.object_store.endpoint_url == ""
    assert cfg.lake_catalog.endswith("lake.ducklake")
    assert cfg.lake_data_path == "s3://orchard/lake/"


def test_the_default_run_grows_nothing_from_an_evaluation_benchmark():
    kinds = [source.kind for source in load_config(None, environ={}).seeds]
    assert "humaneval" not in kinds and "code" in kinds
    assert sum(source.count for source in load_config(None, environ={}).seeds) == 16


def test_file_overrides_preset_and_environment_overrides_file(tmp_path):
    path = tmp_path / "orchard.toml"
    path.write_text(
        """
[run]
max_tokens = 64
strategies = ["plan_first"]

[object_store]
endpoint_url = "http://127.0.0.1:9000"
bucket = "mine"
"""
    )
    cfg = load_config(path, environ={"ORCHARD__RUN__MAX_TOKENS": "32", "ORCHARD__LAKE__CATALOG": "postgres:dbname=lake"})
    assert cfg.run.max_tokens == 32
    assert cfg.run.strategies == ("plan_first",)
    assert cfg.object_store.bucket == "mine"
    assert cfg.lake_data_path == "s3://mine/lake/"
    assert cfg.lake_catalog == "postgres:dbname=lake"


def test_external_engine_replaces_embedded_preset(tmp_path):
    path = tmp_path / "orchard.toml"
    path.write_text(
        """
[engines.gpu]
model = "Qwen/Qwen2.5-7B-Instruct"
base_urls = ["http://gpu-1:8000", "http://gpu-2:8000"]

[roles]
generator = "gpu"
"""
    )
    cfg = load_config(path, environ={})
    assert set(cfg.engines) == {"gpu"}
    assert cfg.engine_for("generator").base_urls == ("http://gpu-1:8000", "http://gpu-2:8000")


def test_config_round_trips_through_plain_values():
    cfg = load_config(None, environ={"ORCHARD__RUN__SEED": "5"})
    assert Config.from_dict(cfg.to_dict()) == cfg
    assert cfg.content_hash() == Config.from_dict(cfg.to_dict()).content_hash()


@pytest.mark.parametrize(
    "text, named",
    [
        ("[run]\nmax_tokens = 'many'", "run.max_tokens"),
        ("[run]\nmax_tokenz = 3", "run.max_tokenz"),
        ("[roles]\ngenerator = 'nowhere'", "roles.generator"),
        ("[engines.x]\nkind = 'openai'\n[roles]\ngenerator = 'x'", "engines.x.base_urls"),
        ("[run\n", "orchard.toml"),
    ],
)
def test_bad_config_names_the_key(tmp_path, text, named):
    path = tmp_path / "orchard.toml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=named.replace(".", r"\.")):
        load_config(path, environ={})


def test_content_hash_ignores_where_things_are_served():
    a = load_config(None, environ={})
    b = load_config(None, environ={"ORCHARD__OBJECT_STORE__ENDPOINT_URL": "http://127.0.0.1:1"})
    c = load_config(None, environ={"ORCHARD__RUN__TEMPERATURE": "0.1"})
    assert a.content_hash() == b.content_hash() != c.content_hash()


def test_roles_a_file_leaves_unnamed_are_played_by_its_generator(tmp_path):
    path = tmp_path / "orchard.toml"
    path.write_text(
        """
[engines.big]
model = "big"
base_urls = ["http://gpu-1:8000"]
[engines.small]
model = "small"
base_urls = ["http://gpu-2:8000"]
[roles]
generator = "big"
critic = "small"
"""
    )
    cfg = load_config(path, environ={})
    assert (cfg.engine_for("generator").model, cfg.engine_for("critic").model, cfg.engine_for("refiner").model) == (
        "big", "small", "big")
