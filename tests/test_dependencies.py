"""Every runtime dependency declared in pyproject.toml is one the package imports (or is named here with why)."""

import re
import tomllib
from pathlib import Path

ROOT = Path(__file__).parents[1]
INDIRECT = {"accelerate": "transformers needs it for load_model(device_map=...)"}
MODULE = {"prometheus-client": "prometheus_client"}


def test_declared_dependencies_are_imported():
    declared = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    names = [re.match(r"[A-Za-z0-9_.-]+", spec).group(0).lower() for spec in declared]
    source = "\n".join(p.read_text() for p in (ROOT / "src" / "personaxis").rglob("*.py"))
    unused = [
        name
        for name in names
        if name not in INDIRECT
        and not re.search(rf"^\s*(import|from) {MODULE.get(name, name.replace('-', '_'))}\b", source, re.M)
    ]
    assert unused == [], f"declared in pyproject.toml but never imported: {unused}"
