"""A short chaos run (`bench/chaos.py`, about a minute of faults): three models of mixed families under mixed polite
clients, one random ready worker SIGKILLed or SIGSTOPped every 5 s. The invariants hold at any length: every answer
is a 200 or a coded refusal with Retry-After, every model serves again after the last fault, nothing is left stopped
or orphaned. The full run's timing targets (`make chaos`) are for a quiet machine; here the bars are looser."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.server import ROOT


@pytest.mark.slow
def test_a_short_chaos_run_answers_only_200_or_coded_refusals_and_recovers(tmp_path: Path) -> None:
    out = tmp_path / "chaos.json"
    done = subprocess.run([sys.executable, "bench/chaos.py", "--minutes", "0.5", "--interval", "5", "--warmup", "5",
                           "--baseline", "10", "--recovery-limit", "90", "--json", str(out)],
                          cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert out.exists(), done.stdout[-3000:] + done.stderr[-3000:]
    report = json.loads(out.read_text())
    assert report["chaos"]["faults"] >= 5, report["chaos"]
    assert report["uncoded"]["count"] == 0, report["uncoded"]
    assert report["refusals"], "the faults must have refused some requests"
    assert all(refusal.split()[0] in ("429", "503") for refusal in report["refusals"]), report["refusals"]
    assert report["longest_s"] <= 90
    assert report["recovery_s"] is not None and report["recovery_s"] <= 60, report["recovery_by_model"]
    assert report["goodput_ratio"] >= 0.3  # it kept serving while workers died; the full run's bar is 0.6
    assert report["leftovers"] == {"stopped": [], "orphaned": [], "alive_after_stop": []}
    assert report["router_rss_ratio"] <= 1.25
    assert sum(report["restarts"].values()) >= report["chaos"]["faults"] - 1  # each fault a restart (the last may lag)
