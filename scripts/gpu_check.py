"""The first run on a GPU box (scripts/gpu-check.sh runs it with the venv's Python, right after `make install`).

Prints, within an overall deadline (8 minutes by default): the GPU, driver, torch and CUDA versions; the gpu-marked
tests' verdict; `make bench` throughput at c1, c32 and b256c1 against the bare model on CUDA, for the server's default
dtype and for fp16; two resident workers' VRAM as the server sees it against nvidia-smi's per-PID figures; one
out-of-memory provoked on purpose and split by the router; and, with time left, Infinity on the same GPU. Each step
has its own time cap; a step that fails or runs out of time says so and the next one runs. Needs only what
`make install` gives (it adds the test extra to the venv if pytest is missing; no Python 3.12, no npm).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PY = sys.executable
MINILM = "sentence-transformers/all-MiniLM-L6-v2"
COPY = "gpu-check/minilm-copy"
SHAPES = "c1,c32,b256c1"
MiB = 2**20
SPLIT_LOG = "running it in halves"  # the router's log line when a batch ran out of memory (router/pool/batcher.py)


@dataclass
class Step:
    name: str
    cap_s: float  # the most this step may take; less when the overall deadline is nearer
    run: Callable[[float], None]  # gets its own time limit in seconds
    optional: bool = False  # run only when its whole cap still fits before the deadline


def say(text: str = "") -> None:
    print(text, flush=True)


def run(command: list[str], limit_s: float) -> subprocess.CompletedProcess[str]:
    """A command's output; never raises for a non-zero exit. Past `limit_s` its whole process group is killed (a
    bench's servers and their workers with it, so none keeps the GPU) and TimeoutExpired is raised."""
    child = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT,
                             start_new_session=True)
    try:
        out, err = child.communicate(timeout=limit_s)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(child.pid, signal.SIGKILL)
        child.communicate()
        raise
    return subprocess.CompletedProcess(command, child.returncode, out, err)


# -- 1. versions ------------------------------------------------------------------------------------------------------


def versions(limit_s: float) -> None:
    if shutil.which("nvidia-smi"):
        smi = run(["nvidia-smi", "--query-gpu=index,name,driver_version,memory.total,compute_cap",
                   "--format=csv,noheader"], limit_s)
        for line in smi.stdout.strip().splitlines() or [smi.stderr.strip()]:
            say(f"  GPU (nvidia-smi): {line}")
    else:
        say("  nvidia-smi: not on PATH")
    code = ("import json, torch; c = torch.cuda.is_available(); print(json.dumps({'torch': torch.__version__, "
            "'cuda': torch.version.cuda, 'cudnn': torch.backends.cudnn.version(), 'available': c, "
            "'device': torch.cuda.get_device_name(0) if c else None, "
            "'bf16': torch.cuda.is_bf16_supported() if c else None}))")
    found = run([PY, "-c", code], limit_s)
    info = json.loads(found.stdout) if found.returncode == 0 else {"error": found.stderr.strip()[-300:]}
    say(f"  torch: {json.dumps(info)}")
    rev = run(["git", "describe", "--always", "--dirty"], limit_s).stdout.strip()
    say(f"  sie: {rev or 'unknown'}; python {sys.version.split()[0]}")
    if not info.get("available"):
        raise NoCuda("torch here has no usable CUDA: every later step would fail. On a GPU box, `make install` "
                     "installs the CUDA build (SIE_TORCH=cuda forces it); check nvidia-smi and the driver")


class NoCuda(RuntimeError):
    """The venv's torch cannot use a GPU: the check stops after the versions."""


# -- 2. the gpu-marked tests ------------------------------------------------------------------------------------------


def test_extra(limit_s: float) -> None:
    if run([PY, "-c", "import pytest, pytest_asyncio"], 60).returncode == 0:
        say("  pytest: installed")
        return
    say("  installing the test extra into .venv (pip install -e '.[router,worker,test]'; no compat venv, no npm)")
    done = run([PY, "-m", "pip", "install", "-q", "--disable-pip-version-check", "-e", ".[router,worker,test]"],
               limit_s)
    say(f"  pip: exit {done.returncode}{'' if done.returncode == 0 else ': ' + done.stderr.strip()[-500:]}")


def gpu_tests(limit_s: float) -> None:
    # The bench test is the quick form of step 3, which runs below with its own cap.
    done = run([PY, "-m", "pytest", "-m", "gpu", "tests/gpu", "-q", "-p", "no:cacheprovider", "-rfEs",
                "--deselect", "tests/gpu/test_server_cuda.py::test_bench_on_cuda"], limit_s)
    lines = done.stdout.strip().splitlines()
    for line in [line for line in lines if line.startswith(("FAILED", "ERROR", "SKIPPED"))][:20]:
        say(f"  {line}")
    say(f"  verdict: {lines[-1] if lines else done.stderr.strip()[-300:]} (exit {done.returncode})")


# -- 3. bench ---------------------------------------------------------------------------------------------------------


def bench(server_dtype: str | None, bare_dtype: str, infinity: bool = False) -> Callable[[float], None]:
    def step(limit_s: float) -> None:
        out = Path(tempfile.mkdtemp(prefix="sie-gpu-check-")) / "bench.json"
        command = [PY, "bench/run.py", "--device", "cuda", "--shapes", SHAPES, "--duration", "4", "--repeats", "1",
                   "--batch-sizes", "64,256", "--skip-cold-start", "--bare-dtype", bare_dtype, "--json", str(out)]
        if server_dtype:
            command.append(f"--server-arg=--dtype={server_dtype}")
        if not infinity:
            command.append("--skip-infinity")
        say(f"  $ {' '.join(command[1:])}")
        done = run(command, limit_s)
        table = [line for line in done.stdout.splitlines() if line.strip() and not line.startswith("# command")]
        for line in table[-40:]:
            say(f"  {line}")
        if done.returncode != 0:
            say(f"  bench: exit {done.returncode}: {done.stderr.strip()[-800:]}")
    return step


# -- 4. VRAM: the server against nvidia-smi ---------------------------------------------------------------------------


def smi_per_pid(text: str) -> dict[int, int]:
    """`nvidia-smi --query-compute-apps=pid,used_memory --format=csv,noheader,nounits` -> {pid: bytes}."""
    found: dict[int, int] = {}
    for line in text.strip().splitlines():
        pid, _, used = (part.strip() for part in line.partition(","))
        if pid.isdigit() and used.isdigit():
            found[int(pid)] = int(used) * MiB
    return found


def bundle_of_two(folder: Path, extra_loadtime: str = "") -> Path:
    """MiniLM and a copy of it under another name: two workers of one model, each loaded from the packaged weights."""
    folder.mkdir(parents=True, exist_ok=True)
    text = (ROOT / "bundles/default/all-minilm-l6-v2.yaml").read_text()
    if extra_loadtime:
        text = text.replace("loadtime: {}", f"loadtime: {{{extra_loadtime}}}")
    (folder / "minilm.yaml").write_text(text)
    (folder / "copy.yaml").write_text(text.replace(f"sie_id: {MINILM}", f"sie_id: {COPY}"))
    return folder


class Server:
    """`sie-server serve` on a free port with its log in a file; stopped with SIGTERM."""

    def __init__(self, args: list[str], log: Path) -> None:
        import socket

        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            self.port = probe.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = log
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HUB_DISABLE_PROGRESS_BARS": "1"}
        self.process = subprocess.Popen([PY, "-m", "sie_router", "serve", "--port", str(self.port), *args],
                                        cwd=ROOT, stdout=log.open("w"), stderr=subprocess.STDOUT, env=env)

    def wait_ready(self, limit_s: float) -> bool:
        import httpx

        deadline = time.monotonic() + limit_s
        while time.monotonic() < deadline and self.process.poll() is None:
            try:
                if httpx.get(f"{self.url}/readyz", timeout=2).status_code == 200:
                    return True
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        return False

    def embed(self, model: str, texts: list[str], timeout_s: float) -> int:
        import httpx

        response = httpx.post(f"{self.url}/v1/embeddings", json={"model": model, "input": texts}, timeout=timeout_s)
        return response.status_code

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(20)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


def vram(limit_s: float) -> None:
    import httpx

    deadline = time.monotonic() + limit_s
    folder = Path(tempfile.mkdtemp(prefix="sie-gpu-check-"))
    server = Server(["--bundle", str(bundle_of_two(folder / "bundle")), "--device", "cuda", "-m", MINILM, "-m", COPY],
                    folder / "server.log")
    try:
        if not server.wait_ready(deadline - time.monotonic() - 10):
            say(f"  the server was not ready in time; its log's end:\n{server.log.read_text()[-1500:]}")
            return
        for model in (MINILM, COPY):
            server.embed(model, ["a sentence to warm the worker up"] * 64, max(5.0, deadline - time.monotonic()))
        rows = httpx.get(f"{server.url}/admin/workers", timeout=10).json()["workers"]
        smi = run(["nvidia-smi", "--query-compute-apps=pid,used_memory", "--format=csv,noheader,nounits"], 30)
        per_pid = smi_per_pid(smi.stdout)
        say(f"  {'model':<40} {'pid':>8} {'server MiB':>11} {'nvidia-smi MiB':>15} {'ledger MiB':>11}")
        for row in rows:
            ours, theirs = row.get("memory_bytes"), per_pid.get(row.get("pid") or -1)
            ledger = row.get("memory_budget_bytes")
            say(f"  {row['model']:<40} {row.get('pid') or '-':>8} {fmt(ours):>11} {fmt(theirs):>15} {fmt(ledger):>11}")
        if not per_pid:
            say("  nvidia-smi lists no process of ours: a container without the host's PID namespace (hostPID); the "
                "server's figure is then torch's allocator plus the context each worker measured")
    finally:
        server.stop()


def fmt(nbytes: int | None) -> str:
    return "-" if nbytes is None else f"{nbytes / MiB:.0f}"


# -- 5. one out-of-memory, split by the router ------------------------------------------------------------------------

HOG = ("import sys, time, torch; free, _ = torch.cuda.mem_get_info(); "
       "x = torch.empty(max(0, free - int(sys.argv[1])), dtype=torch.uint8, device='cuda'); "
       "print('held', free // 2**20, flush=True); time.sleep(600)")


def out_of_memory(limit_s: float) -> None:
    """MiniLM with a token budget of 262144 (one forward of 512 texts of 256 tokens) and a small warm-up, then a hog
    process takes all but 256 MiB of the GPU: the large batch runs out of memory in the worker, the router runs it in
    halves until they fit, and the request still succeeds."""
    deadline = time.monotonic() + limit_s
    folder = Path(tempfile.mkdtemp(prefix="sie-gpu-check-"))
    bundle = bundle_of_two(folder / "bundle", "warm_up: small")
    (bundle / "copy.yaml").unlink()
    text = (bundle / "minilm.yaml").read_text().replace("max_batch_tokens: 16384", "max_batch_tokens: 262144")
    (bundle / "minilm.yaml").write_text(text)
    server = Server(["--bundle", str(bundle), "--device", "cuda", "-m", MINILM], folder / "server.log")
    hog = None
    try:
        if not server.wait_ready(deadline - time.monotonic() - 10):
            say(f"  the server was not ready in time; its log's end:\n{server.log.read_text()[-1500:]}")
            return
        server.embed(MINILM, ["warm"] * 8, max(5.0, deadline - time.monotonic()))
        hog = subprocess.Popen([PY, "-c", HOG, str(256 * MiB)], cwd=ROOT, stdout=subprocess.PIPE, text=True)
        assert hog.stdout is not None
        say(f"  hog: {hog.stdout.readline().strip()} MiB free before it took all but 256 MiB")
        long_text = " ".join(["the quick brown fox jumps over the lazy dog"] * 40)  # over 256 tokens: truncated
        started = time.monotonic()
        status = server.embed(MINILM, [f"{i} {long_text}" for i in range(512)], max(10.0, deadline - time.monotonic()))
        splits = [line for line in server.log.read_text().splitlines() if SPLIT_LOG in line]
        say(f"  512 x 256 tokens in one request: HTTP {status} in {time.monotonic() - started:.1f} s; "
            f"{len(splits)} split(s) logged")
        for line in splits[:4]:
            say(f"    {line.strip()[-160:]}")
        if not splits:
            say("  no out-of-memory happened (the GPU had room even so): nothing was split")
    finally:
        if hog is not None:
            hog.kill()
            hog.wait()
        server.stop()


# -- the plan ---------------------------------------------------------------------------------------------------------


def plan() -> list[Step]:
    return [
        Step("GPU, driver, torch and CUDA", 30, versions),
        Step("test dependencies", 90, test_extra),
        Step("gpu-marked tests (make test-gpu, less the bench test)", 140, gpu_tests),
        Step("bench on CUDA: our default dtype against the bare model in float32", 75, bench(None, "float32")),
        Step("bench on CUDA: float16, ours against the bare model in float16", 75, bench("float16", "float16")),
        Step("VRAM of two resident workers: the server against nvidia-smi", 45, vram),
        Step("one out-of-memory, split by the router", 45, out_of_memory),
        Step("Infinity on the same GPU (bench, float16 bare)", 150, bench("float16", "float16", infinity=True),
             optional=True),
    ]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--deadline", type=float, default=480.0, help="seconds for the whole check (default 480)")
    parser.add_argument("--plan", action="store_true", help="print the steps and their caps, run nothing")
    a = parser.parse_args(argv)
    steps = plan()
    if a.plan:
        for step in steps:
            say(f"{step.name}: at most {step.cap_s:.0f} s{' (if time is left)' if step.optional else ''}")
        say(f"total: at most {a.deadline:.0f} s")
        return 0
    started = time.monotonic()
    for number, step in enumerate(steps, 1):
        left = a.deadline - (time.monotonic() - started)
        if left < (step.cap_s if step.optional else 5):
            say(f"\n== {number}. {step.name}: skipped, {left:.0f} s left")
            continue
        say(f"\n== {number}. {step.name}")
        t0 = time.monotonic()
        try:
            step.run(min(step.cap_s, left - 2))
        except NoCuda as exc:
            say(f"  error: {exc}")
            return 1
        except subprocess.TimeoutExpired:
            say(f"  ran out of its {min(step.cap_s, left - 2):.0f} s")
        except Exception as exc:  # one broken step must not hide the others' figures
            say(f"  failed: {type(exc).__name__}: {exc}")
        say(f"  ({time.monotonic() - t0:.0f} s)")
    say(f"\ngpu-check done in {time.monotonic() - started:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
