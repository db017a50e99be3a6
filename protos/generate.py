"""Generates the Python code of protos/ into c360/ (messages, gRPC stubs and .pyi stubs)."""

import argparse
import filecmp
import shutil
import sys
import tempfile
from importlib import resources
from pathlib import Path

from grpc_tools import protoc

PROTOS = Path(__file__).resolve().parent
ROOT = PROTOS.parent
PACKAGE = "c360"


def generate(out: Path) -> None:
    """Writes the generated package for every .proto under protos/ into out/c360."""
    sources = sorted(str(p.relative_to(PROTOS)) for p in PROTOS.rglob("*.proto"))
    well_known = str(resources.files("grpc_tools") / "_proto")
    bin_dir = Path(sys.executable).parent
    args = [
        "protoc",
        f"--plugin=protoc-gen-mypy={bin_dir / 'protoc-gen-mypy'}",
        f"--plugin=protoc-gen-mypy_grpc={bin_dir / 'protoc-gen-mypy_grpc'}",
        f"-I{PROTOS}",
        f"-I{well_known}",
        f"--python_out={out}",
        f"--grpc_python_out={out}",
        f"--mypy_out={out}",
        f"--mypy_grpc_out={out}",
        *sources,
    ]
    if protoc.main(args) != 0:
        raise SystemExit("protoc failed")
    for folder in [out / PACKAGE, *(p for p in (out / PACKAGE).rglob("*") if p.is_dir())]:
        (folder / "__init__.py").touch()
    (out / PACKAGE / "py.typed").touch()
    (out / PACKAGE / "README.md").write_text(
        "Generated from `protos/` by `make protos`. Do not edit; edit the .proto files.\n"
    )


def drift(expected: Path, actual: Path) -> list[str]:
    """Lists files that differ between two generated trees."""
    comparison = filecmp.dircmp(expected, actual, ignore=["__pycache__"])
    found: list[str] = []

    def walk(c: filecmp.dircmp[str], prefix: str) -> None:
        found.extend(f"{prefix}{name}" for name in c.left_only + c.right_only + c.diff_files)
        for name, sub in c.subdirs.items():
            walk(sub, f"{prefix}{name}/")

    walk(comparison, f"{PACKAGE}/")
    return found


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--check", action="store_true", help="fail if c360/ is not up to date")
    check = parser.parse_args().check
    with tempfile.TemporaryDirectory() as tmp:
        generate(Path(tmp))
        if check:
            stale = drift(Path(tmp) / PACKAGE, ROOT / PACKAGE)
            if stale:
                print("generated code drifts from protos/ (run `make protos`):", *stale, sep="\n  ")
                sys.exit(1)
            print("generated code is up to date")
            return
        shutil.rmtree(ROOT / PACKAGE, ignore_errors=True)
        shutil.copytree(Path(tmp) / PACKAGE, ROOT / PACKAGE)


if __name__ == "__main__":
    main()
