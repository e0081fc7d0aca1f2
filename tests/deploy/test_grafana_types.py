"""The dashboards type-checked against Grafana's own schema types: each one becomes a TypeScript object literal
assigned to `Dashboard` from npm `@grafana/schema`, and `tsc` checks it (required fields, field types, enum values,
and no unknown field: an object literal gets TypeScript's excess property check). `scripts/install.sh test` installs
the two npm packages into .cache/grafana-types."""

from __future__ import annotations

import copy
import json
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[2]
DASHBOARDS = sorted((ROOT / "deploy" / "grafana").glob("*.json"))
TYPES = ROOT / ".cache" / "grafana-types"
TSC = TYPES / "node_modules" / ".bin" / "tsc"

# Fields Grafana itself writes into dashboard JSON that its TypeScript types leave out: (where, field, why). Each is
# removed where it appears before the check, and each must still appear somewhere, so the list cannot go stale.
ALLOWED_UNTYPED = [
    # Grafana's query-variable editor saves the query text again as `definition` (it shows it in the variables list);
    # VariableModel has no such field.
    ("templating.list[]", "definition", "written by the query variable editor, absent from VariableModel"),
]

TSCONFIG = {"compilerOptions": {"strict": True, "noEmit": True, "module": "esnext", "moduleResolution": "bundler",
                                "target": "es2022", "skipLibCheck": True, "types": []}}


def places(doc: Any, where: str) -> list[dict[str, Any]]:
    """The objects at a path such as `templating.list[]` (`[]`: every element of the list)."""
    found = [doc]
    for step in where.split("."):
        name, every = step.removesuffix("[]"), step.endswith("[]")
        found = [x[name] for x in found if isinstance(x, dict) and name in x]
        if every:
            found = [item for x in found for item in x]
    return [x for x in found if isinstance(x, dict)]


def without_allowed(dashboard: dict[str, Any]) -> tuple[dict[str, Any], set[str]]:
    """The dashboard without the allowed untyped fields, and which of them it had."""
    doc, used = copy.deepcopy(dashboard), set()
    for where, field, _ in ALLOWED_UNTYPED:
        for obj in places(doc, where):
            if obj.pop(field, None) is not None:
                used.add(f"{where}.{field}")
    return doc, used


def tsc(folder: Path, sources: dict[str, str]) -> subprocess.CompletedProcess[str]:
    for name, text in sources.items():
        (folder / name).write_text(text)
    (folder / "tsconfig.json").write_text(json.dumps({**TSCONFIG, "files": sorted(sources)}))
    node_modules = folder / "node_modules"
    if not node_modules.exists():
        node_modules.symlink_to(TYPES / "node_modules")
    return subprocess.run([str(TSC), "-p", str(folder / "tsconfig.json")], capture_output=True, text=True,
                          timeout=120, cwd=folder)


def typed_source(dashboard: dict[str, Any]) -> str:
    return f"import type {{ Dashboard }} from '@grafana/schema';\nexport const dashboard: Dashboard = " \
           f"{json.dumps(dashboard, indent=2)};\n"


@pytest.fixture(scope="module")
def checker() -> Path:
    if not TSC.exists() or shutil.which("node") is None:
        pytest.fail("no TypeScript compiler in .cache/grafana-types: run `make install-test` (needs node and npm)")
    return TSC


def test_every_dashboard_matches_grafanas_dashboard_type(checker: Path, tmp_path: Path) -> None:
    used: set[str] = set()
    sources = {}
    for path in DASHBOARDS:
        doc, found = without_allowed(json.loads(path.read_text()))
        used |= found
        sources[f"{path.stem}.ts"] = typed_source(doc)
    done = tsc(tmp_path, sources)
    assert done.returncode == 0, f"Grafana's types reject a dashboard:\n{done.stdout}{done.stderr}"
    stale = {f"{where}.{field}" for where, field, _ in ALLOWED_UNTYPED} - used
    assert not stale, f"allowed untyped fields no dashboard has any more: {stale}"


def test_the_check_rejects_what_grafana_would_not_load(checker: Path, tmp_path: Path) -> None:
    """The same check fails on a wrong type, a bad enum value, a missing required field and an unknown field."""
    base, _ = without_allowed(json.loads(DASHBOARDS[0].read_text()))
    broken = {"wrong_type": lambda d: d.update(schemaVersion="39"),
              "bad_enum": lambda d: d["templating"]["list"][0].update(type="dropdown"),
              "missing_required": lambda d: d["panels"][0].pop("type"),
              "unknown_field": lambda d: d["panels"][0].update(colour="red")}
    sources = {}
    for name, breaks in broken.items():
        doc = copy.deepcopy(base)
        breaks(doc)
        sources[f"{name}.ts"] = typed_source(doc)
    done = tsc(tmp_path, sources)  # one compiler run; it reports each file's errors under the file's name
    assert done.returncode != 0
    for name in sources:
        assert re.search(rf"^{re.escape(name)}\(\d+,\d+\): error TS", done.stdout, re.M), (name, done.stdout)
