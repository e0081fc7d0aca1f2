"""OpenVINO's bf16 rate on MiniLM-L6's linear layers by call size: the four products of a layer (Q, K and V as one
384 x 1152, the output 384 x 384, the FFN's 384 x 1536 and 1536 x 384), float16 weights as the IR stores them, float32
activations in, on one thread. Whether bigger calls would run the linear layers faster.

    .venv/bin/python bench/fc_rate.py [--tokens 64,128,256,384,512,1024,2048] [--threads 1]

The rate counts the activations' conversion to bf16 at each call, which a whole graph does once per layer, so it
reads a little under the graph's own (bench/README.md, "Where the engine itself stops").
"""

from __future__ import annotations

import argparse
import time

import numpy as np

PRODUCTS = [(384, 1152), (384, 384), (384, 1536), (1536, 384)]  # (in, out) of one layer's linear layers


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tokens", default="64,128,256,384,512,1024,2048")
    p.add_argument("--threads", type=int, default=1)
    a = p.parse_args()
    import openvino as ov
    import openvino.opset13 as ops

    core, rng = ov.Core(), np.random.default_rng(0)
    config = {"INFERENCE_NUM_THREADS": a.threads, "NUM_STREAMS": 1, "INFERENCE_PRECISION_HINT": "bf16"}
    requests = {}
    for k, n in PRODUCTS:
        x = ops.parameter([-1, k], ov.Type.f32, name="x")
        weight = ops.convert(ops.constant(rng.standard_normal((n, k)).astype(np.float16)), ov.Type.f32)
        model = ov.Model([ops.matmul(x, weight, False, True)], [x])
        requests[k, n] = core.compile_model(model, "CPU", config).create_infer_request()
    flops_per_token = 2 * sum(k * n for k, n in PRODUCTS)
    for m in (int(t) for t in a.tokens.split(",")):
        feeds = {key: rng.standard_normal((m, key[0])).astype(np.float32) for key in PRODUCTS}
        for key, request in requests.items():
            request.infer([feeds[key]])
        best, layers = float("inf"), max(1, 4096 // m)
        for _ in range(5):  # the best of 5 windows: other tenants only ever slow a window down
            started = time.perf_counter()
            for _ in range(layers):
                for key, request in requests.items():
                    request.infer([feeds[key]])
            best = min(best, (time.perf_counter() - started) / layers)
        print(f"{m:5d} tokens a call: {flops_per_token * m / best / 1e9:6.1f} GFLOP/s on {a.threads} thread(s), "
              f"a layer's linear layers in {best * 1e3:.2f} ms")


if __name__ == "__main__":
    main()
