"""The committed stubs in generated/ must match a fresh run over protos/."""

from __future__ import annotations

import filecmp
import importlib.util
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def _load_generator():  # type: ignore[no-untyped-def]
    spec = importlib.util.spec_from_file_location("gen_protos", ROOT / "tools" / "gen_protos.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["gen_protos"] = module
    spec.loader.exec_module(module)
    return module


def _files(root: Path) -> dict[str, Path]:
    return {
        str(p.relative_to(root)): p
        for p in root.rglob("*")
        if p.is_file() and "__pycache__" not in p.parts
    }


def test_generated_stubs_match_the_protos(tmp_path: Path) -> None:
    generator = _load_generator()
    generator.generate(tmp_path)
    fresh, committed = _files(tmp_path), _files(generator.OUT)
    assert sorted(fresh) == sorted(committed), (
        "generated/ has missing or extra files: run make proto"
    )
    stale = [name for name in fresh if not filecmp.cmp(fresh[name], committed[name], shallow=False)]
    assert not stale, f"generated/ is stale for {stale}: run `make proto` and commit the result"


@pytest.mark.parametrize("name", ["relay.proto", "admin.proto"])
def test_every_message_and_field_of_the_contract_is_documented(name: str) -> None:
    proto = (ROOT / "protos" / "tokenrelay" / "v1" / name).read_text().splitlines()
    undocumented = []
    for number, line in enumerate(proto):
        stripped = line.strip()
        starts_block = stripped.startswith(("message ", "enum ", "service ", "rpc "))
        is_field = (
            "=" in stripped
            and stripped.endswith(";")
            and not stripped.startswith(("option", "syntax", "package", "//"))
        )
        if not (starts_block or is_field):
            continue
        previous = proto[number - 1].strip()
        if not previous.startswith("//") and "_UNSPECIFIED" not in stripped:
            undocumented.append(f"line {number + 1}: {stripped}")
    assert not undocumented, "add a comment above:\n" + "\n".join(undocumented)


def test_the_reflection_v1_stubs_come_from_the_vendored_proto() -> None:
    """grpc.reflection.v1 (served beside grpcio-reflection's v1alpha) is
    generated like our own contract, so the freshness check above covers it."""
    generator = _load_generator()
    vendored = ROOT / "protos" / "tokenrelay" / "vendor" / "grpc_reflection" / "v1"
    assert vendored / "reflection.proto" in generator.proto_files()
    from tokenrelay.vendor.grpc_reflection.v1 import reflection_pb2

    assert reflection_pb2.DESCRIPTOR.package == "grpc.reflection.v1"
    assert "ServerReflection" in reflection_pb2.DESCRIPTOR.services_by_name
