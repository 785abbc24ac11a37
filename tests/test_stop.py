"""How a process of Orchard's stops (orchard/stop.py): SIGTERM and SIGINT become RunStopped in the main thread, mark
the process as stopping, and whatever still runs after the deadline is killed with exit 128 + the signal."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from orchard.stop import RunStopped

REPO = Path(__file__).resolve().parents[1]

STOPPABLE = """
import sys, time
sys.path.insert(0, {repo!r})
from orchard.stop import RunStopped, stop_on_signals, stop_within
from schemas.stopping import stop_requested

def flows_own(signum, frame):  # what Prefect's bridge does inside a flow
    raise RuntimeError("the flow's own handler ran")

try:
    with stop_on_signals(deadline_s=3.0):
        import signal
        signal.signal(signal.SIGTERM, flows_own)
        with stop_within(deadline_s=3.0):
            print("ready", signal.getsignal(signal.SIGTERM) is flows_own, flush=True)  # Prefect's bridge stays
            while True:
                time.sleep(0.05)
except RuntimeError as exc:
    print(f"chained: {{exc}}; stopping: {{stop_requested()}}", flush=True)
except RunStopped as exc:
    print(f"stopped: {{exc.name}}; stopping: {{stop_requested()}}", flush=True)
time.sleep(60)  # a clean-up that hangs: the deadline ends the process
"""


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_a_signal_marks_the_process_stopping_reaches_the_flows_handler_and_the_deadline_ends_it(sig):
    child = subprocess.Popen([sys.executable, "-c", STOPPABLE.format(repo=str(REPO))], stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True)
    try:
        assert child.stdout.readline().strip() == "ready True"
        sent = time.monotonic()
        child.send_signal(sig)
        code = child.wait(timeout=30)
        took = time.monotonic() - sent
        out, err = child.communicate()
    finally:
        if child.poll() is None:
            child.kill()
    assert code == 128 + sig
    if sig == signal.SIGTERM:  # the flow's own SIGTERM handler runs after the stop is requested
        assert out.strip() == "chained: the flow's own handler ran; stopping: True"
    else:  # SIGINT goes on to the handler outside the flow (Prefect bridges SIGTERM alone): RunStopped
        assert out.strip() == "stopped: SIGINT; stopping: True"
    assert f"stopped by {sig.name}; what still ran 3 s later was killed" in err
    assert took >= 2.5  # the deadline, not a crash, ended it


def test_run_stopped_carries_the_shells_exit_code():
    assert RunStopped(signal.SIGTERM).code == 143 and RunStopped(signal.SIGINT).code == 130
    assert RunStopped(signal.SIGTERM).name == "SIGTERM"


@pytest.mark.integration
def test_sigterm_while_orchard_up_starts_undoes_the_start_and_exits_143(tmp_path):
    from orchard.services import free_ports

    (port,) = free_ports(1)
    config = tmp_path / "orchard.toml"
    config.write_text(f'state_dir = "{tmp_path / "state"}"\n[orchestration]\napi_port = {port}\ngpu_workers = 1\n')
    tag = f"ORCHARD_STOP_TEST={tmp_path.name}"
    env = {**os.environ, "ORCHARD_STOP_TEST": tmp_path.name}
    env.pop("PREFECT_API_URL", None)
    up = subprocess.Popen([sys.executable, "-m", "flows.cli", "--config", str(config), "up"], cwd=REPO, env=env,
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        said = []
        for line in up.stdout:  # once the store is up, mid-start: workers and model servers still to come
            said.append(line)
            if line.startswith("object store:"):
                break
        up.send_signal(signal.SIGTERM)
        code = up.wait(timeout=60)
        said += up.stdout.readlines()
    finally:
        if up.poll() is None:
            up.kill()
        time.sleep(1.0)
        left = [p for p in Path("/proc").iterdir() if p.name.isdigit() and _has(p, tag.encode())]
        for process in left:  # a failed check must not leave a cluster running
            with contextlib.suppress(ProcessLookupError, ValueError):
                os.kill(int(process.name), signal.SIGKILL)
    assert code == 143, "".join(said)
    assert said[-1].strip() == "orchard: stopped by SIGTERM"
    assert [p.name for p in left] == [], "processes of the stopped `up` still ran"


def _has(process: Path, needle: bytes) -> bool:
    try:
        return needle in (process / "environ").read_bytes().split(b"\0")
    except OSError:
        return False


def test_sigterm_while_orchard_down_stops_the_rest_without_its_grace_and_exits_143(tmp_path):
    """`down` gives each process STOP_GRACE_S after SIGTERM; asked to stop itself, it kills the rest at once instead of
    waiting out three processes that ignore SIGTERM, removes its record and says so."""
    import json

    from orchard.cluster import UP_FILE
    from orchard.services import start_time

    state = tmp_path / "state"
    state.mkdir()
    config = tmp_path / "orchard.toml"
    config.write_text(f'state_dir = "{state}"\n')
    stubborn = []
    for i in range(3):  # real processes, each its own group as `up` starts them, noting the SIGTERM it ignores
        noted = tmp_path / f"term-{i}"
        stubborn.append(subprocess.Popen(["sh", "-c", f"trap 'echo term > {noted}' TERM; while :; do sleep 0.1; done"],
                                         start_new_session=True))
    time.sleep(0.3)  # each shell has set its trap
    (state / UP_FILE).write_text(json.dumps({"api_url": "http://127.0.0.1:9/api", "ui_url": "http://127.0.0.1:9",
                                             "config": None, "processes": [
        {"name": f"stubborn-{i}", "pid": p.pid, "started": start_time(p.pid), "url": "-", "log": "-"}
        for i, p in enumerate(stubborn)]}))
    env = {k: v for k, v in os.environ.items() if k != "PREFECT_API_URL"}
    down = subprocess.Popen([sys.executable, "-m", "flows.cli", "--config", str(config), "down"], cwd=REPO, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 60
        while not (tmp_path / "term-2").exists() and time.monotonic() < deadline:  # the last started is stopped first
            time.sleep(0.05)
        down.send_signal(signal.SIGTERM)
        code = down.wait(timeout=60)
        said = down.stdout.read()
        for p in stubborn:
            p.wait(timeout=5)  # reaped here: killed, not merely signalled
    finally:
        for p in [down, *stubborn]:
            if p.poll() is None:
                p.kill()
    assert code == 143, said
    assert said.splitlines()[-1] == "orchard: stopped by SIGTERM", said
    assert [p.returncode for p in stubborn] == [-signal.SIGKILL] * 3
    assert not (state / UP_FILE).exists()
