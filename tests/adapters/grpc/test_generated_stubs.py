"""The committed gRPC stubs are exactly what tools/gen_protos.py makes from proto/."""

from __future__ import annotations

import filecmp
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[3]
GENERATED = ROOT / "meshca" / "adapters" / "grpc" / "_gen"


def _files(directory: Path) -> set[str]:
    return {
        p.relative_to(directory).as_posix()
        for p in directory.rglob("*")
        if p.is_file() and "__pycache__" not in p.parts
    }


def test_generated_stubs_are_fresh(tmp_path: Path) -> None:
    fresh = tmp_path / "_gen"
    subprocess.run([sys.executable, str(ROOT / "tools" / "gen_protos.py"), str(fresh)], check=True)
    committed, regenerated = _files(GENERATED), _files(fresh)
    assert committed == regenerated, "stub files differ: run `make proto`"
    _, mismatch, errors = filecmp.cmpfiles(GENERATED, fresh, sorted(committed), shallow=False)
    assert not mismatch and not errors, f"stale stubs {mismatch or errors}: run `make proto`"
