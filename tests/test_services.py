"""The embedded servers: real SeaweedFS and llama.cpp processes, on loopback, stopped without leftovers."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from orchard import llama_build, services
from orchard.config import RUBRICS, Config, EngineConfig, JudgeConfig, ObjectStoreConfig
from orchard.services import Service, ServiceError, embedded_services, start_seaweedfs
from orchard.store import ObjectStore

STORE = ObjectStoreConfig(bucket="orchard", access_key_id="orchard", secret_access_key="orchard-test-secret")


def listening_addresses(pid: int) -> set[str]:
    """The local IPv4/IPv6 addresses (hex, as in /proc/net/tcp*) of the TCP sockets `pid` listens on."""
    inodes = set()
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        try:
            target = os.readlink(fd)
        except FileNotFoundError:
            continue  # closed between listing and reading
        if target.startswith("socket:["):
            inodes.add(target[len("socket:["):-1])
    addresses = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            fields = line.split()
            local, state, inode = fields[1], fields[3], fields[9]
            if state == "0A" and inode in inodes:  # 0A = LISTEN
                addresses.add(local.split(":")[0])
    return addresses


def process_group_is_gone(service: Service) -> bool:
    try:
        os.killpg(service.process.pid, 0)
    except ProcessLookupError:
        return True
    return False


def store_at(service: Service, bucket: str = "orchard") -> ObjectStore:
    return ObjectStore(dataclasses.replace(STORE, endpoint_url=service.url, bucket=bucket))


@pytest.mark.integration
def test_seaweedfs_listens_only_on_loopback_and_stops_without_leftovers(tmp_path: Path) -> None:
    service = start_seaweedfs(STORE, tmp_path)
    try:
        assert service.url.startswith("http://127.0.0.1:")
        assert listening_addresses(service.process.pid) == {"0100007F"}  # 127.0.0.1, nothing else
        assert store_at(service).put_new("hello.txt", b"hi")
        assert (tmp_path / "logs" / "seaweedfs.log").is_file()
        assert (tmp_path / "seaweedfs").is_dir()
    finally:
        service.stop()
    assert service.process.returncode is not None
    assert process_group_is_gone(service)


@pytest.mark.integration
def test_two_seaweedfs_run_side_by_side_with_separate_data(tmp_path: Path) -> None:
    first = start_seaweedfs(STORE, tmp_path / "a")
    try:
        second = start_seaweedfs(STORE, tmp_path / "b")
        try:
            assert first.url != second.url
            assert store_at(first).put_new("only-in-a.txt", b"a")
            assert store_at(second).put_new("only-in-b.txt", b"b")
            assert store_at(first).list_keys("") == ["only-in-a.txt"]
            assert store_at(second).list_keys("") == ["only-in-b.txt"]
        finally:
            second.stop()
    finally:
        first.stop()


@pytest.mark.integration
def test_bucket_contents_survive_a_restart_on_other_ports(tmp_path: Path) -> None:
    service = start_seaweedfs(STORE, tmp_path)
    try:
        assert store_at(service).put_new("runs/r1/kept.txt", b"still here")
    finally:
        service.stop()
    again = start_seaweedfs(STORE, tmp_path)
    try:
        assert store_at(again).get("runs/r1/kept.txt") == b"still here"
    finally:
        again.stop()


def test_a_server_that_exits_at_start_is_reported_with_its_log(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setattr(services, "weed_binary", lambda: Path("/bin/false"))
    with pytest.raises(ServiceError, match=r"seaweedfs exited with code 1 while starting; log .*seaweedfs\.log"):
        start_seaweedfs(STORE, tmp_path)


def test_embedded_model_server_and_store_binary_are_found_without_path_lookups() -> None:
    assert services.smollm2_gguf().name.endswith("SmolLM2-135M-Instruct.Q4_1.gguf")
    assert services.smollm2_gguf().stat().st_size > 50_000_000
    assert services.embedded_gguf().name.endswith(f"SmolLM2-135M-Instruct.{llama_build.EMBEDDED_QUANT}.gguf")
    assert services.embedded_gguf().read_bytes()[:4] == b"GGUF"
    assert os.access(llama_build.find_binary(), os.X_OK)
    assert os.access(services.weed_binary(), os.X_OK)


def test_the_llama_server_build_is_keyed_by_what_changes_the_binary(monkeypatch, tmp_path: Path) -> None:
    monkeypatch.setenv("ORCHARD_CACHE", str(tmp_path))
    monkeypatch.delenv("ORCHARD_LLAMA_SERVER", raising=False)
    key = llama_build.build_key()
    assert llama_build.build_dir() == tmp_path / "llama-server" / key and llama_build.find_binary() is None
    monkeypatch.setattr(llama_build, "CMAKE_FLAGS", (*llama_build.CMAKE_FLAGS, "-DGGML_AVX512=OFF"))
    assert llama_build.build_key() != key
    monkeypatch.setattr(llama_build, "_cpu_flags", lambda: "fpu sse")
    assert llama_build.build_key() != key
    monkeypatch.setenv("ORCHARD_LLAMA_SERVER", "/opt/llama/bin/llama-server")
    assert llama_build.find_binary() == Path("/opt/llama/bin/llama-server")


def test_an_x86_build_keeps_ggml_amx_out_and_other_machines_build_native(monkeypatch) -> None:
    monkeypatch.setattr(llama_build.platform, "machine", lambda: "x86_64")
    flags = llama_build.cmake_flags()
    assert "-DGGML_NATIVE=ON" in flags
    for language in ("C", "CXX"):
        assert any(f.startswith(f"-DCMAKE_{language}_FLAGS=") and "-mno-amx-int8" in f for f in flags)
    monkeypatch.setattr(llama_build.platform, "machine", lambda: "aarch64")
    assert llama_build.cmake_flags() == llama_build.CMAKE_FLAGS


def test_a_machine_without_the_embedded_engine_is_told_how_to_set_it_up(monkeypatch, tmp_path: Path) -> None:
    monkeypatch.setenv("ORCHARD_CACHE", str(tmp_path))
    monkeypatch.delenv("ORCHARD_LLAMA_SERVER", raising=False)
    with pytest.raises(ServiceError, match=r"llama-server is not built on this machine .*make setup"):
        services.start_llama_server(EngineConfig(kind="embedded", model="m"), tmp_path)
    with pytest.raises(ServiceError, match=r"not set up on this machine .*orchard.llama_build"):
        services.embedded_gguf()


def test_free_ports_are_distinct() -> None:
    ports = services.free_ports(10)
    assert len(set(ports)) == 10


def test_llama_server_answers_a_chat_under_the_configured_model_name(llama: EngineConfig) -> None:
    (url,) = llama.base_urls
    assert url.startswith("http://127.0.0.1:")
    response = httpx.post(
        f"{url}/v1/chat/completions",
        json={
            "model": llama.model,
            "messages": [{"role": "user", "content": "What is 2 + 3? Answer with a number."}],
            "max_tokens": 12,
            "temperature": 0.0,
        },
        timeout=120,
    )
    assert response.status_code == 200, response.text
    answer = response.json()
    assert answer["model"] == llama.model
    assert isinstance(answer["choices"][0]["message"]["content"], str)
    assert 0 < answer["usage"]["completion_tokens"] <= 12
    models = httpx.get(f"{url}/v1/models", timeout=10).json()
    assert [m["id"] for m in models["data"]] == [llama.model]


@pytest.mark.integration
def test_embedded_services_serve_the_config_and_stop_even_on_interrupt(tmp_path: Path) -> None:
    config = Config(state_dir=str(tmp_path / "state"))
    seen: dict[str, str] = {}
    with pytest.raises(KeyboardInterrupt):
        with embedded_services(config) as resolved:
            engine = resolved.engines["embedded"]
            assert engine.kind == "openai" and engine.model == config.engines["embedded"].model
            assert resolved.object_store.endpoint_url.startswith("http://127.0.0.1:")
            assert httpx.get(f"{engine.base_urls[0]}/v1/models", timeout=10).status_code == 200
            assert ObjectStore(resolved.object_store).put_new("probe.txt", b"ok")
            assert config.object_store.endpoint_url == ""  # the caller's config is left as it was
            seen = {"model": engine.base_urls[0], "store": resolved.object_store.endpoint_url}
            raise KeyboardInterrupt
    for url in seen.values():
        with pytest.raises(httpx.ConnectError):
            httpx.get(url, timeout=2)
    assert (tmp_path / "state" / "logs" / "llama-embedded.log").is_file()


def test_external_endpoints_start_nothing(tmp_path: Path) -> None:
    config = Config(
        state_dir=str(tmp_path / "state"),
        object_store=dataclasses.replace(STORE, endpoint_url="http://s3.example.invalid"),
        engines={"remote": EngineConfig(kind="openai", model="m", base_urls=("http://llm.example.invalid",))},
        roles={"generator": "remote"},
        jury=tuple(JudgeConfig(name=rubric, engine="remote", rubric=rubric) for rubric in RUBRICS),
    )
    with embedded_services(config) as resolved:
        assert resolved == config
    assert not (tmp_path / "state").exists()


def test_model_false_leaves_embedded_engines_unstarted(tmp_path: Path) -> None:
    config = Config(
        state_dir=str(tmp_path / "state"),
        object_store=dataclasses.replace(STORE, endpoint_url="http://s3.example.invalid"),
    )
    with embedded_services(config, model=False) as resolved:
        assert resolved.engines["embedded"].kind == "embedded"
        assert resolved.engines["embedded"].base_urls == ()
    assert not (tmp_path / "state").exists()


# --- no orphans -------------------------------------------------------------------------------------------

OWNER = """
import sys, threading, time
sys.path.insert(0, {repo!r})
from orchard.config import ObjectStoreConfig
from orchard.services import start_seaweedfs
store = ObjectStoreConfig(bucket="orchard", access_key_id="orchard", secret_access_key="orchard-test-secret")
started = []
# From a thread that ends at once: the server must still live as long as this process, and no longer.
worker = threading.Thread(target=lambda: started.append(start_seaweedfs(store, {state!r})))
worker.start()
worker.join()
print(started[0].process.pid, flush=True)
time.sleep(600)
"""


def _ended(pid: int, within_s: float) -> bool:
    deadline = time.monotonic() + within_s
    while time.monotonic() < deadline:
        if services.start_time(pid) is None:  # gone, or a zombie waiting for init
            return True
        time.sleep(0.2)
    return False


def test_a_server_dies_with_the_process_that_started_it_however_it_dies(tmp_path: Path) -> None:
    state = tmp_path / "state"
    code = OWNER.format(repo=str(Path(__file__).resolve().parents[1]), state=str(state))
    owner = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    try:
        weed = int(owner.stdout.readline())
        (record,) = services.services_of(state)
        assert (record["name"], record["pid"], record["owner"], record["owner_alive"]) == \
            ("seaweedfs", weed, owner.pid, True)
        # Another process may not open the same store while its owner runs: one line saying whose it is.
        with pytest.raises(ServiceError, match=rf"seaweedfs of {state} is running \(pid {weed}\) for orchard process "
                                               rf"{owner.pid}, which still runs"):
            start_seaweedfs(STORE, state)
        owner.kill()  # SIGKILL: no handler, no atexit
        owner.wait()
        assert _ended(weed, 15.0), "SeaweedFS outlived the process that started it"
        assert services.services_of(state) == []  # its record is dropped with it
    finally:
        if owner.poll() is None:
            owner.kill()


def test_a_server_left_by_a_process_that_is_gone_is_stopped_and_said(tmp_path: Path) -> None:
    state = tmp_path / "state"
    orphan = subprocess.Popen(["sleep", "600"], start_new_session=True)  # as if its parent-death signal were lost
    gone = subprocess.Popen(["true"])
    gone.wait()
    folder = services.pids_dir(state)
    folder.mkdir(parents=True)
    (folder / f"llama-embedded.{orphan.pid}.json").write_text(json.dumps({
        "name": "llama-embedded", "pid": orphan.pid, "started": services.start_time(orphan.pid), "owner": gone.pid,
        "owner_started": "1", "command": "sleep"}))
    said: list[str] = []
    try:
        (reaped,) = services.reap_stale(state, say=said.append)
        assert reaped["pid"] == orphan.pid and orphan.wait(timeout=15) is not None
        assert said == [f"stopped llama-embedded (pid {orphan.pid}), left running by orchard process {gone.pid}, "
                        "which is gone"]
        assert not list(folder.iterdir())
    finally:
        if orphan.poll() is None:
            orphan.kill()
