"""The code sandbox: hostile programs are contained and reported; correct code passes; no bubblewrap, no run.

Each hostile program is written as an answer that would pass its test (`add(2, 3) == 5`) only if its attack
worked; so a contained attack is a failed verdict, and its reason says why.
"""

from __future__ import annotations

import gzip
import json
import os
import random
import signal
import socket
import time
from pathlib import Path

import pytest

from builders import instruction
from orchard.sandbox import SandboxConfig, SandboxUnavailable, run_sandboxed, sandbox_self_check
from tasks.seed_files import humaneval_path
from tasks.seeds import load_humaneval
from tasks.verify import CORRECT, INCORRECT, Verifiers, check_code_answer

# A uid of its own for this session, so "no stray processes" means exactly: none of this uid is left.
TEST_UID = random.randint(200_000, 299_999)
LIMITS = SandboxConfig(wall_timeout_s=3.0, cpu_s=1, memory_mb=256, max_processes=16, output_bytes=4096, tmp_mb=8,
                       uid=TEST_UID)
SECRET = "orchard-fake-secret-4f1c9a"
TEST = "assert add(2, 3) == 5\n"


@pytest.fixture(scope="module", autouse=True)
def sandbox_works() -> None:
    """Fail (not skip) without a working sandbox: `make test` installs bubblewrap, and this suite guards it."""
    sandbox_self_check(LIMITS)


def _answer(body: str) -> str:
    return f"```python\n{body.strip()}\n```"


def _sandbox_processes() -> list[str]:
    """Live processes left by sandboxes of this session (zombies are reaped by the host's init, not ours)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            status = (entry / "status").read_text()
        except OSError:
            continue  # the process ended while we looked
        fields = dict(line.split(":", 1) for line in status.splitlines() if ":" in line)
        uid = int(fields["Uid"].split()[0])
        state = fields["State"].split()[0]
        ours = uid == TEST_UID if os.geteuid() == 0 else len(fields.get("NSpid", "").split()) > 1 and uid == os.getuid()
        if ours and state != "Z":
            found.append(f"{entry.name} {fields['Name'].strip()} {state}")
    return found


def _assert_no_strays() -> None:
    # Teardown of a killed PID namespace is asynchronous in the kernel: give it a moment, then insist.
    for _ in range(100):
        if not _sandbox_processes():
            return
        time.sleep(0.05)
    assert _sandbox_processes() == []


@pytest.fixture
def listener():
    """A TCP server on the host's loopback that a sandboxed program must not reach."""
    server = socket.create_server(("127.0.0.1", 0))
    server.settimeout(0.2)
    yield server
    server.close()


@pytest.fixture
def secret_env(monkeypatch):
    monkeypatch.setenv("ORCHARD_TEST_SECRET", SECRET)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", SECRET)


# (name, the attack as an answer that passes only if it worked, the failure reasons that mean "contained")
ATTACKS = [
    ("fork bomb", """
import os
while True:
    try:
        os.fork()
    except OSError:
        pass
def add(a, b):
    return a + b
""", {"timeout", "cpu limit"}),
    ("fork bomb of spinning children", """
import os
for _ in range(1000):
    try:
        if os.fork() == 0:
            while True:
                pass
    except OSError:
        pass
while True:
    pass
def add(a, b):
    return a + b
""", {"timeout", "cpu limit"}),
    ("thread bomb", """
import threading, time
threads = [threading.Thread(target=time.sleep, args=(1000,)) for _ in range(10000)]
for t in threads:
    t.start()
def add(a, b):
    return a + b
""", {"RuntimeError", "timeout"}),
    ("memory bomb", """
hoard = bytearray(8 * 1024 ** 3)
def add(a, b):
    return a + b
""", {"memory limit"}),
    ("growing memory", """
hoard = []
while True:
    hoard.append("x" * 10 ** 6)
def add(a, b):
    return a + b
""", {"memory limit"}),
    ("infinite loop", """
def add(a, b):
    while True:
        pass
""", {"cpu limit", "timeout"}),
    ("infinite loop that ignores SIGXCPU", """
import signal
signal.signal(signal.SIGXCPU, signal.SIG_IGN)
def add(a, b):
    while True:
        pass
""", {"cpu limit", "timeout"}),
    ("sleep forever", """
import time
def add(a, b):
    time.sleep(10 ** 6)
""", {"timeout"}),
    ("huge print", """
def add(a, b):
    while True:
        print("flood" * 1000)
""", {"output limit"}),
    ("huge stderr", """
import sys
def add(a, b):
    while True:
        sys.stderr.write("flood" * 1000)
""", {"output limit"}),
    ("connection to the internet", """
import socket
def add(a, b):
    socket.create_connection(("1.1.1.1", 53), timeout=2).close()
    return a + b
""", {"OSError"}),
    ("name lookup", """
import socket
def add(a, b):
    socket.getaddrinfo("pypi.org", 443)
    return a + b
""", {"gaierror"}),
    ("write into the repository", """
def add(a, b):
    open("{repo}/SANDBOX_ESCAPE", "w").write("x")
    return a + b
""", {"FileNotFoundError", "PermissionError", "OSError"}),
    ("write into a host directory", """
def add(a, b):
    open("{host_dir}/escape.txt", "w").write("x")
    return a + b
""", {"FileNotFoundError", "PermissionError", "OSError"}),
    ("write into /etc and /root", """
def add(a, b):
    for path in ("/etc/orchard-escape", "/root/orchard-escape"):
        open(path, "w").write("x")
    return a + b
""", {"FileNotFoundError", "PermissionError", "OSError"}),
    ("write into the sandbox's own root", """
def add(a, b):
    open("/escape.txt", "w").write("x")
    return a + b
""", {"OSError"}),
    ("read the parent's environment", """
import os
def add(a, b):
    return a + b if "{secret}" in repr(dict(os.environ)) else None
""", {"AssertionError"}),
    ("read every visible process's environment", """
import os
def add(a, b):
    seen = ""
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            seen += open(f"/proc/{{pid}}/environ").read()
        except OSError:
            pass
    return a + b if "{secret}" in seen else None
""", {"AssertionError"}),
    ("read a host file", """
def add(a, b):
    open("{repo}/pyproject.toml").read()
    return a + b
""", {"FileNotFoundError"}),
    ("kill its parent", """
import os
def add(a, b):
    parent = os.getppid()
    os.kill(parent, 9)
    try:
        os.kill(parent, 0)
    except ProcessLookupError:
        return a + b
""", {"AssertionError"}),
    ("kill every process", """
import os
def add(a, b):
    os.kill(-1, 9)
    return a + b
""", {"ProcessLookupError"}),
    ("kill -9 -1 from a shell", """
import os
def add(a, b):
    os.system("kill -9 -1")
    return a + b
""", {"signal 9"}),
    ("a daemon that outlives the program", """
import os, time
if os.fork() == 0:
    os.setsid()
    time.sleep(10 ** 6)
def add(a, b):
    return None
""", {"AssertionError"}),
    ("fill the disk", """
def add(a, b):
    i = 0
    while True:
        open(f"/tmp/fill{{i}}", "wb").write(b"x" * 4 * 1024 * 1024)
        i += 1
""", {"OSError"}),
    ("a nested user namespace", """
import os
def add(a, b):
    return a + b if os.system("unshare --user --map-root-user true") == 0 else None
""", {"AssertionError"}),
]


@pytest.mark.parametrize("name, attack, contained", ATTACKS, ids=[a[0] for a in ATTACKS])
def test_hostile_program_is_contained_and_reported(name, attack, contained, tmp_path, secret_env):
    repo = Path(__file__).resolve().parent.parent
    program = attack.format(repo=repo, host_dir=tmp_path, secret=SECRET)
    parent = os.getppid()

    verdict = check_code_answer(_answer(program), TEST, LIMITS)

    assert verdict.verdict == INCORRECT, verdict
    assert verdict.failure_reason in contained, verdict
    assert verdict.exit_code != 0
    assert SECRET not in (verdict.stdout or "") + (verdict.stderr or "") + verdict.feedback
    # The machine is unharmed: this process and its parent live, nothing was written, nothing is left running.
    os.kill(os.getpid(), 0)
    os.kill(parent, 0)
    assert not (repo / "SANDBOX_ESCAPE").exists()
    assert list(tmp_path.iterdir()) == []
    assert not Path("/etc/orchard-escape").exists()
    assert not Path("/root/orchard-escape").exists()
    _assert_no_strays()


def test_connection_to_a_loopback_server_of_the_host_is_refused(listener):
    port = listener.getsockname()[1]
    program = f"import socket\nsocket.create_connection(('127.0.0.1', {port}), timeout=1)\nprint('connected')\n"
    result = run_sandboxed(program, limits=LIMITS)
    assert result.exit_code == 1
    assert "connected" not in result.stdout
    assert "ConnectionRefusedError" in result.stderr or "OSError" in result.stderr
    with pytest.raises(TimeoutError):
        listener.accept()


def test_sandbox_sees_only_its_own_files_and_a_clean_environment(secret_env):
    program = "import os, json\nprint(json.dumps([sorted(os.listdir('/')), os.getcwd(), dict(os.environ)]))"
    result = run_sandboxed(program, limits=LIMITS)
    root, cwd, environ = json.loads(result.stdout)
    assert set(root) <= {"usr", "bin", "sbin", "lib", "lib64", "lib32", "libx32", "proc", "dev", "tmp"}
    assert cwd == "/tmp"
    assert set(environ) <= {"PATH", "HOME", "LANG", "PYTHONDONTWRITEBYTECODE", "PWD"}


@pytest.mark.skipif(os.geteuid() != 0, reason="the drop to SandboxConfig.uid happens only when Orchard runs as root")
def test_as_root_the_sandbox_runs_as_the_unprivileged_uid_without_groups_or_capabilities():
    program = """
import json, os
status = dict(line.split(":", 1) for line in open("/proc/self/status").read().splitlines())
print(json.dumps([os.getresuid(), os.getresgid(), os.getgroups(),
                  {k: int(status[k], 16) for k in ("CapInh", "CapPrm", "CapEff", "CapAmb")}]))
"""
    result = run_sandboxed(program, limits=LIMITS)
    uids, gids, groups, caps = json.loads(result.stdout)
    # bwrap maps the host uid onto itself inside the sandbox's user namespace.
    assert uids == gids == [TEST_UID] * 3
    assert groups == []
    assert caps == {"CapInh": 0, "CapPrm": 0, "CapEff": 0, "CapAmb": 0}


def test_sandbox_is_spawned_without_arguments_that_make_cpython_fork_the_parent(monkeypatch):
    import subprocess

    given: list[dict] = []
    popen = subprocess.Popen

    def recording(*args, **kwargs):
        given.append(kwargs)
        return popen(*args, **kwargs)

    monkeypatch.setattr(subprocess, "Popen", recording)
    assert run_sandboxed("print(1)", limits=LIMITS).stdout == "1\n"
    # With any of these CPython fork()s the whole parent (page tables of a ~1 GB shard) instead of vfork().
    fork_only = {"user", "group", "extra_groups", "preexec_fn"}
    assert [sorted(fork_only & set(kwargs)) for kwargs in given] == [[]]
    assert given[0].get("close_fds", True)


def test_processes_are_capped_per_sandbox():
    program = """
import os, time
children = 0
while True:
    try:
        pid = os.fork()
    except OSError:
        break
    if pid == 0:
        time.sleep(60)
        os._exit(0)
    children += 1
print(children)
"""
    result = run_sandboxed(program, limits=LIMITS)
    assert result.exit_code == 0, result
    # The sandbox's init and the program itself count too.
    assert 0 < int(result.stdout) <= LIMITS.max_processes - 2
    _assert_no_strays()


def test_fork_bomb_does_not_starve_a_sandbox_beside_it():
    bomb = instruction("Write add(a, b).", TEST, domain="code")
    with Verifiers(workers=2, sandbox=LIMITS) as verifiers:
        verdicts = verifiers.check([
            (bomb, _answer(ATTACKS[0][1])),
            *[(bomb, _answer("def add(a, b):\n    return a + b"))] * 4,
        ])
    assert verdicts[0].failure_reason in {"timeout", "cpu limit"}
    assert [v.verdict for v in verdicts[1:]] == [CORRECT] * 4
    _assert_no_strays()


def test_program_reads_the_stdin_it_is_given():
    result = run_sandboxed("import sys\nprint(sys.stdin.read()[::-1])", limits=LIMITS, stdin="olleh")
    assert (result.exit_code, result.stdout, result.killed_reason) == (0, "hello\n", None)


def test_output_beyond_the_cap_is_cut_and_the_run_killed():
    result = run_sandboxed("print('y' * 100_000)", limits=LIMITS)
    assert result.killed_reason == "output limit"
    assert len(result.stdout) <= LIMITS.output_bytes


def test_exit_status_and_signal_death_are_told_apart():
    assert run_sandboxed("raise SystemExit(3)", limits=LIMITS).exit_code == 3
    killed = run_sandboxed("import os, signal\nos.kill(os.getpid(), signal.SIGSEGV)", limits=LIMITS)
    assert (killed.exit_code, killed.killed_reason) == (128 + signal.SIGSEGV, f"signal {int(signal.SIGSEGV)}")


def _humaneval_records(count: int) -> list[dict]:
    with gzip.open(humaneval_path(), "rt") as lines:
        return [json.loads(line) for line, _ in zip(lines, range(count))]


def test_humaneval_canonical_solutions_pass():
    instructions = load_humaneval(5)
    for record, problem in zip(_humaneval_records(5), instructions):
        verdict = check_code_answer(_answer(record["prompt"] + record["canonical_solution"]), problem.reference,
                                    LIMITS)
        assert verdict.verdict == CORRECT, (record["task_id"], verdict)
        assert verdict.exit_code == 0 and verdict.failure_reason is None


def test_wrong_solution_fails_with_the_failing_assertion_in_feedback():
    record, instruction = _humaneval_records(1)[0], load_humaneval(1)[0]
    wrong = record["prompt"] + "    return False\n"
    verdict = check_code_answer(_answer(wrong), instruction.reference, LIMITS)
    assert verdict.verdict == INCORRECT
    assert verdict.failure_reason == "AssertionError"
    assert "assert candidate([1.0, 2.0, 3.9, 4.0, 5.0, 2.2], 0.3) == True" in verdict.feedback
    # The next turn sees the failing test, not the hidden test suite.
    assert verdict.feedback.count("assert candidate") == 1


def test_missing_bubblewrap_raises_and_never_runs_the_code(tmp_path):
    marker = tmp_path / "ran"
    program = f"open({str(marker)!r}, 'w').write('ran')\n"
    missing = SandboxConfig(bwrap=str(tmp_path / "no-such-bwrap"))
    with pytest.raises(SandboxUnavailable, match="no-such-bwrap"):
        sandbox_self_check(missing)
    with pytest.raises(SandboxUnavailable):
        run_sandboxed(program, limits=missing)
    with pytest.raises(SandboxUnavailable):
        check_code_answer(_answer(program), TEST, missing)
    assert not marker.exists()


def test_missing_interpreter_raises(tmp_path):
    with pytest.raises(SandboxUnavailable, match="sandbox.python"):
        run_sandboxed("print(1)", limits=SandboxConfig(python=str(tmp_path / "python3")))


def test_verifiers_refuse_code_without_a_sandbox(tmp_path):
    marker = tmp_path / "ran"
    item = instruction("Write add(a, b).", TEST, domain="code")
    with Verifiers(workers=1, sandbox=SandboxConfig(bwrap=str(tmp_path / "no-such-bwrap"))) as verifiers:
        with pytest.raises(SandboxUnavailable):
            verifiers.check([(item, _answer(f"open({str(marker)!r}, 'w')\ndef add(a, b):\n    return a + b"))])
    assert not marker.exists()


def test_a_code_answer_is_verified_while_the_process_holds_more_than_1024_descriptors():
    """A process growing many shards holds many sockets and pipes: a sandbox's descriptors then lie above 1023, where
    select() cannot wait on them."""
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = 2048
    if hard != resource.RLIM_INFINITY and hard < wanted:
        pytest.fail(f"RLIMIT_NOFILE hard limit {hard} < {wanted}: this test cannot hold enough descriptors")
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, wanted), hard))
    held = [os.open(os.devnull, os.O_RDONLY) for _ in range(1100)]
    try:
        assert max(held) > 1024
        item = instruction("Write add(a, b).", TEST, domain="code")
        with Verifiers(workers=1, sandbox=LIMITS) as verifiers:
            verdict, = verifiers.check([(item, _answer("def add(a, b):\n    return a + b"))])
        assert (verdict.verdict, verdict.exit_code) == (CORRECT, 0)
    finally:
        for fd in held:
            os.close(fd)
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    _assert_no_strays()
