"""Engine launchers: an engine entry's launch command is started where shards grow, answered, and stopped."""

from __future__ import annotations

import asyncio
import shlex
import sys
from pathlib import Path

import httpx
import pytest

from orchard import llama_build, services
from orchard.config import Config, ConfigError, EngineConfig, JudgeConfig, launch_argv, load_config
from orchard.engine import EngineClient, Sampling
from orchard.services import ServiceError, embedded_services, start_launched_engine

STORE_ELSEWHERE = {"ORCHARD__OBJECT_STORE__ENDPOINT_URL": "http://s3.example.invalid"}  # start no SeaweedFS


def llama_launch(alias: str) -> str:
    """A launch command for the packaged SmolLM2 on llama.cpp's server: any OpenAI-compatible server will do."""
    return (f"{shlex.quote(str(llama_build.find_binary()))} --model {shlex.quote(str(services.embedded_gguf()))} "
            f"--host {{host}} --port {{port}} --ctx-size 1024 --threads 1 --alias {shlex.quote(alias)}")


def config_file(tmp_path: Path, engine_toml: str) -> Path:
    path = tmp_path / "orchard.toml"
    path.write_text(f"[engines.gpu]\nmodel = \"m\"\n{engine_toml}\n[roles]\ngenerator = \"gpu\"\n")
    return path


# --- the command template --------------------------------------------------------------------------


def test_launch_template_fills_port_and_host_and_splits_like_a_shell() -> None:
    argv = launch_argv("/opt/vllm/bin/vllm serve 'My Model' --host {host} --port {port} --api-key=k{port}",
                       port=8123)
    assert argv == ["/opt/vllm/bin/vllm", "serve", "My Model", "--host", "127.0.0.1", "--port", "8123",
                    "--api-key=k8123"]


def test_launch_template_leaves_json_braces_alone() -> None:
    argv = launch_argv("""vllm serve m --port {port} --override-generation-config '{"temperature": 0}'""", port=1)
    assert argv[-1] == '{"temperature": 0}'


@pytest.mark.parametrize(
    "template, problem",
    [
        ("vllm serve m --port 8000", "put {port}"),
        ("vllm serve 'm --port {port}", "No closing quotation"),
        ("   ", "empty"),
        ("vllm serve {model} --port {port}", "unknown field {model}"),
    ],
)
def test_bad_launch_template_says_what_is_wrong(template: str, problem: str) -> None:
    with pytest.raises(ValueError, match=problem.replace("{", r"\{").replace("}", r"\}")):
        launch_argv(template, port=1)


# --- validation in load_config ---------------------------------------------------------------------


def test_launched_engine_needs_no_base_urls(tmp_path: Path) -> None:
    cfg = load_config(config_file(tmp_path, 'launch = "vllm serve m --port {port}"\nstartup_timeout_s = 300'),
                      environ={})
    engine = cfg.engine_for("generator")
    assert engine.launch == "vllm serve m --port {port}"
    assert engine.startup_timeout_s == 300.0
    assert engine.base_urls == ()


@pytest.mark.parametrize(
    "engine_toml, problem",
    [
        ('launch = "vllm serve m --port 8000"', "engines.gpu.launch: .*put {port}"),
        ('launch = "vllm serve \'m --port {port}"', "engines.gpu.launch: .*No closing quotation"),
        ('launch = "vllm serve m --port {port}"\nbase_urls = ["http://gpu-1:8000"]', "engines.gpu.launch: .*base_urls"),
        ('kind = "embedded"\nlaunch = "vllm serve m --port {port}"', "engines.gpu.launch: only an 'openai' engine"),
        ('launch = "vllm serve m --port {port}"\nstartup_timeout_s = 0', "engines.gpu.startup_timeout_s"),
        ("launch = 3", "engines.gpu.launch: expected a string"),
    ],
)
def test_bad_launch_config_names_the_key(tmp_path: Path, engine_toml: str, problem: str) -> None:
    with pytest.raises(ConfigError, match=problem.replace("{", r"\{").replace("}", r"\}")):
        load_config(config_file(tmp_path, engine_toml), environ={})


def test_where_an_engine_is_launched_does_not_change_the_content_hash() -> None:
    served = {"gpu": EngineConfig(model="m", base_urls=("http://gpu-1:8000",))}
    launched = {"gpu": EngineConfig(model="m", launch="/opt/vllm/bin/vllm serve m --port {port}",
                                    startup_timeout_s=30)}
    other_model = {"gpu": EngineConfig(model="other", launch="/opt/vllm/bin/vllm serve m --port {port}")}
    roles = {"generator": "gpu", "critic": "gpu", "refiner": "gpu"}
    jury = tuple(JudgeConfig(name=j.name, engine="gpu", rubric=j.rubric) for j in Config().jury)
    hash_of = {name: Config(engines=engines, roles=roles, jury=jury).content_hash()
               for name, engines in (("served", served), ("launched", launched), ("other", other_model))}
    assert hash_of["served"] == hash_of["launched"] != hash_of["other"]


# --- real launches ---------------------------------------------------------------------------------


@pytest.mark.integration
def test_launched_llama_server_answers_a_chat_and_stops_with_the_block(tmp_path: Path) -> None:
    path = config_file(tmp_path, f"launch = {llama_launch('m')!r}\nstartup_timeout_s = 120")
    config = load_config(path, environ={**STORE_ELSEWHERE, "ORCHARD__STATE_DIR": str(tmp_path / "state")})
    with embedded_services(config) as resolved:
        engine = resolved.engines["gpu"]
        (url,) = engine.base_urls
        assert url.startswith("http://127.0.0.1:") and engine.launch == ""
        assert config.engines["gpu"].base_urls == ()  # the caller's config is left as it was

        async def ask() -> list[str]:
            async with EngineClient(engine) as client:
                answers = await client.chat([{"role": "user", "content": "What is 2 + 3? Answer with a number."}],
                                            Sampling(temperature=0.0, max_tokens=8, seed=1))
            return [a.text for a in answers]

        (text,) = asyncio.run(ask())
        assert isinstance(text, str) and text
    with pytest.raises(httpx.ConnectError):
        httpx.get(f"{url}/v1/models", timeout=2)
    log = (tmp_path / "state" / "logs" / "engine-gpu.log").read_text()
    assert log.startswith(f"$ {llama_build.find_binary()} --model")


@pytest.mark.integration
def test_launched_server_that_serves_another_model_is_stopped_and_named(tmp_path: Path) -> None:
    engine = EngineConfig(model="wanted", launch=llama_launch("served"), startup_timeout_s=120)
    with pytest.raises(ServiceError, match=r"serves \['served'\], not the configured model 'wanted'"):
        start_launched_engine(engine, tmp_path, name="engine-gpu")


def test_launch_command_that_exits_is_reported_with_its_log(tmp_path: Path) -> None:
    engine = EngineConfig(model="m", launch=f"{shlex.quote(sys.executable)} -c 'import sys; sys.exit(3)' {{port}}")
    with pytest.raises(ServiceError, match=r"engine-gpu exited with code 3 while starting; log .*engine-gpu\.log"):
        start_launched_engine(engine, tmp_path, name="engine-gpu")
