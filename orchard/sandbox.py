"""Run untrusted Python (model-written code plus its tests) inside bubblewrap, with hard limits.

The sandbox: no network and no other namespace shared with the host (`--unshare-all`), a read-only
`/usr` and nothing else of the host filesystem (no /work, no /root, no home, no /etc), a private tmpfs
`/tmp` as the only writable place and the working directory, its own PID namespace (killing "every
process" reaches only the sandbox's own), a cleared environment, and rlimits on CPU time, address
space, file size, open files and processes. Output is read up to a cap and a wall-clock timeout
kills everything.

Why an unprivileged uid: RLIMIT_NPROC is never enforced for processes of the host's uid 0, and a user
namespace that maps its uid to host root still counts as uid 0. So when Orchard runs as root, bwrap
itself is started as `SandboxConfig.uid` (nobody by default); its user namespace then counts the
sandbox's processes on their own (kernels >= 5.14 count RLIMIT_NPROC per user namespace), and a fork
bomb stops at `max_processes`. The drop is done by util-linux's `setpriv`, which execs bwrap: Popen's own
`user=`/`group=` would make CPython fork() the whole parent instead of vfork() (see `run_sandboxed`).

There is no fallback: if bubblewrap is missing or cannot start, `SandboxUnavailable` is raised and no
code runs.
"""

from __future__ import annotations

import math
import os
import re
import select
import selectors
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pydantic.dataclasses
from pydantic import ConfigDict

from schemas.errors import OrchardError

# Where the program lies inside the sandbox; tracebacks name this file.
PROGRAM_PATH = "/tmp/solution.py"
_SYSTEM_PYTHON = "/usr/bin/python3"
PRLIMIT = "/usr/bin/prlimit"  # util-linux; inside the sandbox, so under /usr
# util-linux too, an Essential package in Debian (no `make sandbox` step needed): drops root before bwrap runs.
SETPRIV = "/usr/bin/setpriv"


class SandboxUnavailable(OrchardError):
    """bubblewrap (or the interpreter it should run) is missing or cannot start a sandbox here."""


# The config's [sandbox] section: a pydantic dataclass, checked like the config's other sections (orchard/config.py).
@pydantic.dataclasses.dataclass(frozen=True, config=ConfigDict(extra="forbid"))
class SandboxConfig:
    """Where bubblewrap and the sandbox's Python are, and the limits every sandboxed run gets."""

    bwrap: str = "bwrap"  # a name on PATH or a path
    python: str = ""  # "" = /usr/bin/python3 if present, else this interpreter's base executable
    wall_timeout_s: float = 10.0
    cpu_s: int = 5
    memory_mb: int = 512  # address space (RLIMIT_AS) of every sandboxed process
    max_processes: int = 32  # processes and threads in the sandbox, its init included
    output_bytes: int = 65536  # per stream; more and the run is killed
    tmp_mb: int = 16  # size of the private /tmp, and the largest file a program may write
    max_open_files: int = 64
    uid: int = 65534  # the unprivileged host uid the sandbox runs as when Orchard runs as root


@dataclass(frozen=True)
class SandboxResult:
    """How one sandboxed program ended."""

    exit_code: int  # the program's status; a death by signal N reads 128 + N (as bwrap reports it)
    stdout: str  # at most SandboxConfig.output_bytes bytes
    stderr: str
    timed_out: bool
    killed_reason: str | None  # None | "timeout" | "cpu limit" | "memory limit" | "output limit" | "signal N"
    wall_s: float


def resolve_bwrap(limits: SandboxConfig) -> str:
    """Return the bubblewrap executable's path, or raise SandboxUnavailable."""
    found = shutil.which(limits.bwrap)
    if not found:
        raise SandboxUnavailable(
            f"sandbox.bwrap: {limits.bwrap!r} not found; install bubblewrap (apt-get install -y bubblewrap). "
            "Code is never run without the sandbox."
        )
    return found


def resolve_python(limits: SandboxConfig) -> str:
    """Return the interpreter the sandbox runs: it must live under /usr, the only host tree bound inside."""
    if limits.python:
        candidates = [limits.python]
    else:
        base = getattr(sys, "_base_executable", None) or sys.executable
        candidates = [_SYSTEM_PYTHON, str(Path(base).resolve())]
    for candidate in candidates:
        path = Path(candidate)
        if path.is_file() and os.access(path, os.X_OK) and path.resolve().is_relative_to("/usr"):
            return str(path)
    raise SandboxUnavailable(
        f"sandbox.python: no Python interpreter under /usr among {candidates} (only /usr is visible in the "
        "sandbox); install python3 (apt-get install -y python3-minimal) or set sandbox.python"
    )


def _host_dirs() -> list[str]:
    """bwrap arguments that bind /usr read-only and recreate /bin, /lib, … as the host has them (links or dirs)."""
    args = ["--ro-bind", "/usr", "/usr"]
    for name in ("/bin", "/sbin", "/lib", "/lib64", "/lib32", "/libx32"):
        path = Path(name)
        if path.is_symlink():
            args += ["--symlink", os.readlink(path), name]
        elif path.is_dir():
            args += ["--ro-bind", name, name]
    return args


def _command(limits: SandboxConfig, bwrap: str, python: str, program_fd: int, info_fd: int) -> list[str]:
    tmp_bytes = limits.tmp_mb * 1024 * 1024
    return [
        bwrap,
        "--unshare-all",  # network, IPC, UTS, cgroup, PID and user namespaces: nothing shared with the host
        "--unshare-user",
        "--disable-userns",  # no nested user namespace to count processes in
        "--die-with-parent",
        "--new-session",  # no TIOCSTI into a terminal outside
        "--clearenv",
        "--setenv", "PATH", "/usr/bin:/bin",
        "--setenv", "HOME", "/tmp",
        "--setenv", "LANG", "C.UTF-8",
        "--setenv", "PYTHONDONTWRITEBYTECODE", "1",
        "--hostname", "sandbox",
        "--cap-drop", "ALL",
        "--info-fd", str(info_fd),  # tells us the sandbox init's pid: killing it tears the whole sandbox down
        *_host_dirs(),
        "--proc", "/proc",
        "--dev", "/dev",
        "--size", str(tmp_bytes), "--tmpfs", "/tmp",
        "--perms", "0444", "--ro-bind-data", str(program_fd), PROGRAM_PATH,
        "--remount-ro", "/",  # the sandbox's own root too: /tmp is the only writable place
        "--chdir", "/tmp",
        # Limits are set inside, on the program alone: RLIMIT_NPROC then counts only this sandbox's user
        # namespace, so concurrent sandboxes do not share one process budget. CPU: SIGXCPU at the soft
        # limit, SIGKILL a second later for a program that ignores it. No core files.
        PRLIMIT,
        f"--cpu={limits.cpu_s}:{limits.cpu_s + 1}",
        f"--as={limits.memory_mb * 1024 * 1024}",
        f"--nproc={limits.max_processes}",
        f"--fsize={tmp_bytes}",
        f"--nofile={limits.max_open_files}",
        "--core=0",
        "--",
        python, "-I", PROGRAM_PATH,
    ]


def _unprivileged(uid: int) -> list[str]:
    """setpriv arguments that run the rest of the command line as `uid`:`uid`, without groups or capabilities.

    The same drop as Popen's user=, group=, extra_groups=[], done after exec: setresuid and setresgid set the
    saved ids too, so nothing can switch back; the kernel clears the permitted and effective capabilities of a
    process that leaves uid 0, and the inheritable ones are cleared here. The process stays the one Popen
    started (setpriv execs bwrap), so its pid, process group and inherited descriptors are bwrap's.
    """
    return [SETPRIV, f"--reuid={uid}", f"--regid={uid}", "--clear-groups", "--inh-caps=-all", "--"]


def _memfd(name: str, content: bytes) -> int:
    """A file descriptor of an anonymous in-memory file holding `content`, positioned at its start."""
    fd = os.memfd_create(name)
    _write_all(fd, content)
    os.lseek(fd, 0, os.SEEK_SET)
    return fd


def _write_all(fd: int, content: bytes) -> None:
    view = memoryview(content)
    while view:
        view = view[os.write(fd, view):]


def run_sandboxed(program: str, *, limits: SandboxConfig, stdin: str = "") -> SandboxResult:
    """Run the Python `program` in a fresh bubblewrap sandbox under `limits` and return how it ended."""
    bwrap = resolve_bwrap(limits)
    python = resolve_python(limits)
    if not os.access(PRLIMIT, os.X_OK):
        raise SandboxUnavailable(f"{PRLIMIT} (util-linux) not found: the sandbox cannot set its limits")
    as_root = os.geteuid() == 0
    if as_root and not os.access(SETPRIV, os.X_OK):
        raise SandboxUnavailable(f"{SETPRIV} (util-linux) not found: as root the sandbox cannot drop to "
                                 f"uid {limits.uid}, and RLIMIT_NPROC is not enforced for uid 0")
    program_fd = _memfd("orchard-program", program.encode())
    stdin_fd = _memfd("orchard-stdin", stdin.encode())
    info_read, info_write = os.pipe()
    try:
        command = _command(limits, bwrap, python, program_fd, info_write)
        if as_root:
            command = _unprivileged(limits.uid) + command
        started = time.monotonic()
        try:
            # No user=/group=/extra_groups= and no preexec_fn: any of them makes CPython fork() this whole
            # process (tens of ms of page-table copying per sandbox in a shard's ~1 GB parent) instead of
            # vfork(); pass_fds, cwd and process_group keep the vfork path (bench/verify_cost.py measures it).
            proc = subprocess.Popen(
                command, stdin=stdin_fd, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                pass_fds=(program_fd, info_write), env={"PATH": "/usr/bin:/bin"}, cwd="/", process_group=0,
            )
        except OSError as exc:
            os.close(info_read)
            raise SandboxUnavailable(f"sandbox.bwrap: cannot start {bwrap}: {exc}") from None
    finally:
        for fd in (program_fd, stdin_fd, info_write):
            os.close(fd)
    with _Sandbox(proc, info_read) as sandbox:
        return sandbox.collect(limits, started)


class _Sandbox:
    """One running bwrap: its streams, and the pid of its init once bwrap reports it."""

    def __init__(self, proc: subprocess.Popen, info_fd: int) -> None:
        self.proc = proc
        # bwrap's own pidfd turns readable when it exits, before it is reaped: its process group id stays
        # reserved until then, so killing the group can never hit a stranger that reused the id.
        self.bwrap_pidfd = os.pidfd_open(proc.pid)
        self.info = os.fdopen(info_fd, "rb", buffering=0)
        self.info_text = b""
        self.init_pidfd: int | None = None

    def __enter__(self) -> "_Sandbox":
        return self

    def __exit__(self, *exc: object) -> None:
        # Whatever happened, nothing of this run may outlive it.
        if self.proc.returncode is None:
            if not self.exited(0):
                self.kill()
                self.exited(None)
            self.reap()
        for stream in (self.proc.stdout, self.proc.stderr, self.info):
            stream.close()
        for fd in (self.bwrap_pidfd, self.init_pidfd):
            if fd is not None:
                os.close(fd)

    def exited(self, timeout: float | None) -> bool:
        """Wait up to `timeout` seconds (None: for ever) for bwrap to exit, without reaping it."""
        # poll, not select: select() takes no descriptor above 1023, and a busy process holds more than that.
        waiting = select.poll()
        waiting.register(self.bwrap_pidfd, select.POLLIN)
        return bool(waiting.poll(None if timeout is None else math.ceil(timeout * 1000)))

    def reap(self) -> int:
        """Kill what is left of bwrap's process group while its id is still reserved, then reap bwrap."""
        _kill_group(self.proc.pid)
        return self.proc.wait()

    def on_info(self, chunk: bytes) -> None:
        self.info_text += chunk
        match = re.search(rb'"child-pid"\s*:\s*(\d+)', self.info_text)
        if match and self.init_pidfd is None:
            try:
                self.init_pidfd = os.pidfd_open(int(match.group(1)))
            except ProcessLookupError:
                pass  # the sandbox already ended on its own: nothing to hold on to

    def kill(self) -> None:
        """Kill the sandbox's init, which kills its PID namespace; bwrap then reaps it and exits.

        Killing bwrap itself instead would orphan the init, leaving its zombie to the host's init.
        """
        if self.init_pidfd is None:
            self.on_info(self._read_info_now())
        if self.init_pidfd is not None:
            try:
                signal.pidfd_send_signal(self.init_pidfd, signal.SIGKILL)
                return
            except ProcessLookupError:
                pass  # init already gone: bwrap is exiting by itself
        _kill_group(self.proc.pid)

    def _read_info_now(self) -> bytes:
        os.set_blocking(self.info.fileno(), False)
        try:
            return self.info.read() or b""
        except BlockingIOError:
            return b""

    def collect(self, limits: SandboxConfig, started: float) -> SandboxResult:
        """Read both streams up to the cap until they close or the deadline passes; then kill and reap."""
        proc = self.proc
        captured = {proc.stdout: bytearray(), proc.stderr: bytearray()}
        deadline = started + limits.wall_timeout_s
        reason: str | None = None
        with selectors.DefaultSelector() as selector:
            for stream in (*captured, self.info):
                selector.register(stream, selectors.EVENT_READ)
            while reason is None and any(stream in captured for stream in _open_streams(selector)):
                left = deadline - time.monotonic()
                if left <= 0:
                    reason = "timeout"
                    break
                for key, _ in selector.select(timeout=left):
                    chunk = os.read(key.fd, 65536)
                    if not chunk:
                        selector.unregister(key.fileobj)
                    elif key.fileobj is self.info:
                        self.on_info(chunk)
                    else:
                        captured[key.fileobj] += chunk
                        if len(captured[key.fileobj]) > limits.output_bytes:
                            reason = "output limit"
        if reason:
            self.kill()
        elif not self.exited(max(0.0, deadline - time.monotonic())):
            # Both streams closed, yet the program runs on past the deadline.
            reason = "timeout"
            self.kill()
        self.exited(None)
        wall_s = time.monotonic() - started
        self.reap()
        stdout = bytes(captured[proc.stdout][: limits.output_bytes]).decode("utf-8", errors="replace")
        stderr = bytes(captured[proc.stderr][: limits.output_bytes]).decode("utf-8", errors="replace")
        exit_code = proc.returncode if proc.returncode >= 0 else 128 - proc.returncode
        if reason is None and exit_code != 0:
            reason = _death_reason(exit_code, stderr, wall_s, limits)
        return SandboxResult(exit_code, stdout, stderr, reason == "timeout", reason, round(wall_s, 4))


def _open_streams(selector: selectors.BaseSelector) -> list:
    return [key.fileobj for key in selector.get_map().values()]


def _kill_group(pgid: int) -> None:
    try:
        os.killpg(pgid, signal.SIGKILL)
    except ProcessLookupError:
        pass  # the group is already gone: nothing left to kill


def _death_reason(exit_code: int, stderr: str, wall_s: float, limits: SandboxConfig) -> str | None:
    """Name the limit a failed program ran into, from its exit status, its stderr's last line and its run time."""
    last = next((line.strip() for line in reversed(stderr.splitlines()) if line.strip()), "")
    if last.startswith("MemoryError") or "Cannot allocate memory" in last:
        return "memory limit"
    if exit_code <= 128:
        return None
    signo = exit_code - 128
    if signo == signal.SIGXCPU:
        return "cpu limit"
    # A SIGKILL from inside is the hard CPU limit (a program that ignored SIGXCPU) or the program killing
    # itself. The hard limit needs cpu_s + 1 CPU seconds of one process, so at least as much wall time.
    if signo == signal.SIGKILL and wall_s >= limits.cpu_s + 1:
        return "cpu limit"
    return f"signal {signo}"


def sandbox_self_check(limits: SandboxConfig) -> None:
    """Raise SandboxUnavailable unless a sandboxed `print(6 * 7)` prints 42: bwrap is there and can start here."""
    result = run_sandboxed("print(6 * 7)", limits=limits)
    if result.exit_code != 0 or result.stdout.strip() != "42":
        raise SandboxUnavailable(
            f"sandbox.bwrap: bubblewrap cannot start a sandbox here (exit {result.exit_code}, "
            f"{result.killed_reason or 'no limit hit'}): {result.stderr.strip()[:500]}"
        )
