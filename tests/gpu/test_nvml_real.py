"""The real NVML path on a GPU machine (`make test-gpu`): readings, a CUDA process attributed by its PID (or, in a
container without the host's PID namespace, by the device's growth), and the CUDA context a worker measures."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import pytest

from sie_router.pool.devices import NvmlDevices

pytestmark = pytest.mark.gpu

MiB = 2**20
HOLD = ("import torch, time; x = torch.ones(256 * 2**20, dtype=torch.uint8, device='cuda'); "
        "print('held', flush=True); time.sleep(30)")


def test_real_nvml_reads_memory_and_attributes_a_process_pinned_by_uuid() -> None:
    devices = NvmlDevices()
    readings = devices.snapshot()
    assert readings and all(d.total > d.used >= 0 and d.free > 0 and d.uuid.startswith(("GPU-", "MIG-"))
                            for d in readings)
    device = readings[0]
    child = subprocess.Popen([sys.executable, "-c", HOLD], stdout=subprocess.PIPE, text=True,
                             env={**os.environ, "CUDA_VISIBLE_DEVICES": devices.cuda_visible(device.name)})
    try:
        assert child.stdout is not None and child.stdout.readline().strip() == "held"
        deadline, used = time.monotonic() + 15, None
        while used is None and time.monotonic() < deadline:
            used = devices.process_memory(child.pid, device.name)
            time.sleep(0.5)
        grown = next(d for d in devices.snapshot() if d.name == device.name).used - device.used
        print(f"NVML: {device.name} {device.uuid} total {device.total / 2**30:.1f} GiB; the child holds "
              f"{'unknown (no per-PID figure here: run with hostPID)' if used is None else f'{used / MiB:.0f} MiB'}; "
              f"device use grew {grown / MiB:.0f} MiB")
        if used is not None:
            assert used >= 256 * MiB  # the tensor plus the CUDA context
        assert grown >= 256 * MiB  # whichever way, the card itself shows it
        # Where NVML has no figure, the worker's own figure plus its context stands in; never None, never 0.
        assert devices.process_memory(child.pid, device.name, reported=256 * MiB, context_bytes=300 * MiB) >= 256 * MiB
    finally:
        child.kill()
        child.wait()


def test_a_worker_measures_its_cuda_context_after_a_matmul_has_loaded_cublas() -> None:
    devices = NvmlDevices()
    device = devices.snapshot()[0]
    uuid = devices.cuda_visible(device.name)
    code = ("import json; from sie_worker import cuda; from sie_worker.protocol import WorkerSpec; "
            "spec = WorkerSpec(worker_id='w', model='m', adapter='dense', weights_dir='', to_worker_endpoint='', "
            f"from_worker_endpoint='', device='cuda:0', env={{'CUDA_VISIBLE_DEVICES': {uuid!r}}}); "
            "before = cuda.prepare_device(spec); import torch; a = torch.ones(512, 512, device='cuda'); a @ a; "
            "print(json.dumps([cuda.context_bytes(spec, before), spec.compute_precision, "
            "torch.backends.cuda.matmul.fp32_precision]))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "CUDA_VISIBLE_DEVICES": uuid})
    assert done.returncode == 0, done.stderr
    context, precision, matmul = json.loads(done.stdout.strip().splitlines()[-1])
    print(f"CUDA context with cuBLAS on {device.name}: {context / MiB:.0f} MiB")
    assert 100 * MiB < context < 4096 * MiB
    assert precision == "float16" and matmul == "tf32"  # the GPU defaults: a BERT-like model in fp16, TF32 for the rest
