"""Generate the Python gRPC package (with .pyi stubs) from protos/ into clients/.

`make proto` runs this; tests/test_protos.py runs it into a temporary folder and fails when
the committed code differs, so generated code can never go stale silently.
"""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

from grpc_tools import protoc

PROTO_ROOT = Path(__file__).resolve().parent
DEFAULT_OUT = PROTO_ROOT.parent / "clients"
GENERATED_SUFFIXES = ("_pb2.py", "_pb2.pyi", "_pb2_grpc.py", "_pb2_grpc.pyi")


def proto_files() -> list[Path]:
    return sorted(PROTO_ROOT.rglob("*.proto"))


def generate(out: Path) -> list[Path]:
    """Compile every .proto under protos/ into `out`; returns the files written."""
    out.mkdir(parents=True, exist_ok=True)
    for stale in out.rglob("*_pb2*"):
        if stale.name.endswith(GENERATED_SUFFIXES):
            stale.unlink()
    grpc_include = Path(protoc.__file__).parent / "_proto"
    plugin = shutil.which("protoc-gen-mypy_grpc", path=str(Path(sys.executable).parent))
    if plugin is None:
        raise SystemExit("protoc-gen-mypy_grpc not found: pip install -e '.[dev]'")
    files = [str(p.relative_to(PROTO_ROOT)) for p in proto_files()]
    args = [
        "grpc_tools.protoc",
        f"-I{PROTO_ROOT}",
        f"-I{grpc_include}",
        f"--plugin=protoc-gen-mypy_grpc={plugin}",
        f"--python_out={out}",
        f"--pyi_out={out}",
        f"--grpc_python_out={out}",
        f"--mypy_grpc_out={out}",
        *files,
    ]
    if protoc.main(args) != 0:
        raise SystemExit("protoc failed")
    written = sorted(p for p in out.rglob("*_pb2*") if p.name.endswith(GENERATED_SUFFIXES))
    for package_dir in {p.parent for p in written}:
        # Every folder on the way down must be a package for `import fashion.v1...` to work.
        d = package_dir
        while d != out:
            (d / "__init__.py").touch(exist_ok=True)
            d = d.parent
    return written


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = parser.parse_args()
    for path in generate(args.out):
        print(path.relative_to(args.out))


if __name__ == "__main__":
    main()
