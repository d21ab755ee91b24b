"""Generate the Python stubs in generated/python from protos/.

Run it with `make proto` (or `python tools/gen_protos.py`). The output is
committed; tests/test_stubs_fresh.py regenerates into a temporary folder and
fails when anything differs, so a proto change without a regeneration is
caught. Generation is deterministic for a pinned grpcio-tools/mypy-protobuf.
"""

from __future__ import annotations

import shutil
import sys
import tempfile
from pathlib import Path

from grpc_tools import protoc

ROOT = Path(__file__).resolve().parent.parent
PROTOS = ROOT / "protos"
OUT = ROOT / "generated" / "python"


def _plugin(name: str) -> str:
    found = shutil.which(name, path=str(Path(sys.executable).parent)) or shutil.which(name)
    if found is None:
        raise SystemExit(f"{name} not found: install the dev extras (pip install -e '.[dev]')")
    return found


def proto_files() -> list[Path]:
    return sorted(PROTOS.rglob("*.proto"))


def generate(out: Path) -> None:
    """Write every stub for protos/ into `out` (created if missing)."""
    out.mkdir(parents=True, exist_ok=True)
    well_known = Path(protoc.__file__).parent / "_proto"
    files = [str(p.relative_to(PROTOS)) for p in proto_files()]
    args = [
        "grpc_tools.protoc",
        f"-I{PROTOS}",
        f"-I{well_known}",
        f"--plugin=protoc-gen-mypy={_plugin('protoc-gen-mypy')}",
        f"--plugin=protoc-gen-mypy_grpc={_plugin('protoc-gen-mypy_grpc')}",
        f"--python_out={out}",
        f"--grpc_python_out={out}",
        f"--mypy_out={out}",
        f"--mypy_grpc_out={out}",
        *files,
    ]
    if protoc.main(args) != 0:
        raise SystemExit("protoc failed")
    # Packages, so `from tokenrelay.v1 import relay_pb2` works once installed.
    for proto in files:
        package_dir = out / Path(proto).parent
        while package_dir != out:
            (package_dir / "__init__.py").touch()
            package_dir = package_dir.parent
    (out / "tokenrelay" / "py.typed").touch()


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        generate(Path(tmp))
        if OUT.exists():
            shutil.rmtree(OUT)
        shutil.copytree(tmp, OUT)
    print(f"stubs written to {OUT.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
