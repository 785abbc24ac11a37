import asyncio
import json

import pytest

from flows.cli import warn_of_literal_secrets
from orchard.config import Config, ConfigError, load_config, secret_value
from orchard.store import s3_client


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


def test_environment_overrides_the_file_which_overrides_the_preset(tmp_path):
    path = tmp_path / "orchard.toml"
    path.write_text('state_dir = "from-file"\n[run]\nmax_tokens = 64\nturns = 3\n')
    cfg = load_config(path, environ={
        "ORCHARD__RUN__MAX_TOKENS": "32",  # values read as TOML: a number ...
        "ORCHARD__STATE_DIR": '"from-env"',  # ... a quoted string (what `orchard up` writes) ...
        "ORCHARD__RUN__MCTS_DOMAINS": '["math"]',  # ... an array ...
        "ORCHARD__RUN__STRATEGIES": "plan_first, work_backwards",  # ... or, if not TOML, text (a list: split at commas)
        "ORCHARD__HYGIENE__DEDUP": "false",
    })
    assert (cfg.run.max_tokens, cfg.run.turns, cfg.run.samples_per_strategy) == (32, 3, 3)  # env, file, preset
    assert cfg.state_dir == "from-env" and cfg.hygiene.dedup is False
    assert cfg.run.mcts_domains == ("math",) and cfg.run.strategies == ("plan_first", "work_backwards")


def test_an_environment_variable_merges_into_the_preset_engine_and_a_file_replaces_it(tmp_path):
    env = {"ORCHARD__ENGINES__EMBEDDED__MAX_N": "2"}
    assert load_config(None, environ=env).engines["embedded"].kind == "embedded"
    path = tmp_path / "orchard.toml"
    path.write_text('[engines.gpu]\nmodel = "m"\nbase_urls = ["http://gpu-1:8000"]\n')
    with pytest.raises(ConfigError, match="ORCHARD__ENGINES__EMBEDDED__MAX_N: engines.embedded.base_urls"):
        load_config(path, environ=env)  # no preset engine left to merge into: a new 'openai' engine without URLs


def test_a_bad_value_in_the_file_names_the_file_and_the_key(tmp_path):
    path = tmp_path / "orchard.toml"
    path.write_text("[run]\nmax_tokens = 'many'\n")
    with pytest.raises(ConfigError, match=rf"^{path}: run\.max_tokens: expected a number, got 'many'"):
        load_config(path, environ={})


def test_a_bad_value_in_the_environment_names_the_variable_and_the_key(tmp_path):
    path = tmp_path / "orchard.toml"
    path.write_text("[run]\nmcts_lambda = 0.5\n")
    with pytest.raises(ConfigError, match=r"^ORCHARD__RUN__MCTS_LAMBDA: run\.mcts_lambda: must lie in \[0, 1\]"):
        load_config(path, environ={"ORCHARD__RUN__MCTS_LAMBDA": "1.5"})
    with pytest.raises(ConfigError, match=r"^ORCHARD__ENGINES__EMBEDDED__KIND: engines\.embedded\.kind: must be"):
        load_config(None, environ={"ORCHARD__ENGINES__EMBEDDED__KIND": '"vllm"'})
    with pytest.raises(ConfigError, match="ORCHARD__RUNS__SEED: unknown key"):
        load_config(None, environ={"ORCHARD__RUNS__SEED": "1"})  # a misspelt variable is not passed over


def test_a_secret_reference_is_resolved_when_the_client_is_built_and_never_travels(monkeypatch):
    environ = {"ORCHARD__OBJECT_STORE__ENDPOINT_URL": '"http://127.0.0.1:1"',
               "ORCHARD__OBJECT_STORE__SECRET_ACCESS_KEY": '"env:ORCHARD_TEST_SECRET"'}
    cfg = load_config(None, environ=environ)
    monkeypatch.setenv("ORCHARD_TEST_SECRET", "first-s3cr3t")
    client = s3_client(cfg.object_store)
    assert client._request_signer._credentials.secret_key == "first-s3cr3t"
    parameters = json.dumps(cfg.to_dict())  # what a flow run's parameters (and so the UI) hold
    assert "s3cr3t" not in parameters and "env:ORCHARD_TEST_SECRET" in parameters
    hash_before = cfg.content_hash()
    monkeypatch.setenv("ORCHARD_TEST_SECRET", "second-s3cr3t")  # a rotated secret is the same run
    assert load_config(None, environ=environ).content_hash() == hash_before
    monkeypatch.delenv("ORCHARD_TEST_SECRET")
    with pytest.raises(ConfigError, match="environment variable ORCHARD_TEST_SECRET is not set"):
        s3_client(cfg.object_store)


def test_a_secret_held_as_a_value_is_named_and_orchard_run_warns_of_it(tmp_path, capsys):
    assert load_config(None, environ={}).literal_secrets() == []  # the embedded servers' fixed loopback keys
    path = tmp_path / "orchard.toml"
    path.write_text(f'state_dir = "{tmp_path / "state"}"\n[object_store]\nendpoint_url = "http://127.0.0.1:9"\n'
                    'secret_access_key = "AKIA-literal"\n[engines.embedded]\nkind = "openai"\nmodel = "m"\n'
                    'base_urls = ["http://127.0.0.1:9"]\napi_key = "env:ORCHARD_TEST_KEY"\n')
    cfg = load_config(path, environ={})
    assert cfg.literal_secrets() == ["object_store.secret_access_key"]  # a reference is not named
    warn_of_literal_secrets(cfg)  # what `orchard run` does first
    assert ("orchard: warning: object_store.secret_access_key holds the secret itself, which travels with the config "
            "into flow parameters and the Prefect UI: write env:NAME or prefect-secret:BLOCK instead"
            in capsys.readouterr().err)


def test_a_secret_reference_must_name_its_source(tmp_path):
    path = tmp_path / "orchard.toml"
    path.write_text('[object_store]\nsecret_access_key = "env:"\n')
    with pytest.raises(ConfigError, match="object_store.secret_access_key: env: must be followed by a name"):
        load_config(path, environ={})


@pytest.mark.integration
def test_a_prefect_secret_block_is_resolved_inside_the_engine_clients_event_loop(prefect_api):
    from prefect.blocks.system import Secret

    Secret(value="blk-s3cr3t").save("orchard-test-key", overwrite=True)

    async def in_the_loop() -> str:  # where the engine client builds its session
        return secret_value("prefect-secret:orchard-test-key")

    assert secret_value("prefect-secret:orchard-test-key") == asyncio.run(in_the_loop()) == "blk-s3cr3t"
    with pytest.raises(ConfigError, match="no Prefect Secret block 'nope'"):
        secret_value("prefect-secret:nope")
