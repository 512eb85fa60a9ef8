"""The committed generated package must be exactly what `make proto` produces from protos/."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def _generate_module():
    spec = importlib.util.spec_from_file_location("protos_generate", REPO / "protos" / "generate.py")
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_generated_code_is_up_to_date(tmp_path: Path) -> None:
    pytest.importorskip("grpc_tools")
    gen = _generate_module()
    fresh = {p.relative_to(tmp_path): p.read_bytes() for p in gen.generate(tmp_path)}
    committed_root = REPO / "clients"
    committed = {p.relative_to(committed_root): p.read_bytes()
                 for p in committed_root.rglob("*_pb2*") if p.name.endswith(gen.GENERATED_SUFFIXES)}
    assert fresh.keys() == committed.keys(), "run `make proto`: generated files differ in names"
    stale = sorted(str(k) for k in fresh if fresh[k] != committed[k])
    assert not stale, f"run `make proto`: stale generated files {stale}"
    assert any(k.suffix == ".pyi" for k in fresh), "type stubs are generated"
