"""The real NVML path on a GPU machine (`make test-gpu`): readings, and a CUDA worker attributed by its PID."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest

from sie_router.devices import NvmlDevices

pytestmark = pytest.mark.gpu


def test_real_nvml_reads_memory_and_attributes_a_process() -> None:
    devices = NvmlDevices()
    readings = devices.snapshot()
    assert readings and all(d.total > d.used >= 0 for d in readings)
    code = "import torch, time; x = torch.empty(256 * 2**20, dtype=torch.uint8, device='cuda'); time.sleep(20)"
    child = subprocess.Popen([sys.executable, "-c", code], env={**os.environ, "CUDA_VISIBLE_DEVICES": "0"})
    try:
        deadline = time.monotonic() + 15
        used = None
        while used is None and time.monotonic() < deadline:
            used = devices.process_memory(child.pid, "cuda:0")
            time.sleep(0.5)
        assert used is not None and used >= 256 * 2**20
        print(f"NVML: {readings[0].name} total {readings[0].total / 2**30:.1f} GiB, child holds {used / 2**20:.0f} MiB")
    finally:
        child.kill()
