"""Regenerate the Python stubs in ``crowdsft/v1/`` from ``proto/crowdsft/v1/*.proto``.

    python proto/generate.py          # write the stubs
    python proto/generate.py --check  # regenerate into a temporary folder, fail on any difference

Needs ``grpcio-tools`` at the version pinned in ``pyproject.toml`` (the ``dev`` extra): the
generated code names the generator's version, so another version shows up as drift.
"""

from __future__ import annotations

import argparse
import filecmp
import sys
import tempfile
from importlib import resources
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PROTO_ROOT = ROOT / "proto"
PACKAGE = "crowdsft/v1"
HEADER_INIT = (
    '"""Generated protocol stubs for crowdsft.v1. Do not edit: run proto/generate.py."""\n'
)


def generate(out_root: Path) -> list[Path]:
    from grpc_tools import protoc

    sources = sorted((PROTO_ROOT / PACKAGE).glob("*.proto"))
    if not sources:
        raise SystemExit(f"no .proto files under {PROTO_ROOT / PACKAGE}")
    well_known = resources.files("grpc_tools") / "_proto"
    args = [
        "grpc_tools.protoc",
        f"-I{PROTO_ROOT}",
        f"-I{well_known}",
        f"--python_out={out_root}",
        f"--pyi_out={out_root}",
        f"--grpc_python_out={out_root}",
        *[str(p.relative_to(PROTO_ROOT)) for p in sources],
    ]
    (out_root / PACKAGE).mkdir(parents=True, exist_ok=True)
    rc = protoc.main(args)
    if rc != 0:
        raise SystemExit(f"protoc failed with exit code {rc}")
    (out_root / PACKAGE / "__init__.py").write_text(HEADER_INIT)
    return sorted(p for p in (out_root / PACKAGE).iterdir() if p.is_file())


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="fail if the committed stubs differ")
    ns = parser.parse_args()
    committed = ROOT / PACKAGE
    if not ns.check:
        for p in committed.glob("*_pb2*.py*"):
            p.unlink()
        written = generate(ROOT)
        print(f"wrote {len(written)} files to {committed.relative_to(ROOT)}/")
        return 0
    with tempfile.TemporaryDirectory() as tmp:
        fresh = {p.name: p for p in generate(Path(tmp))}
        ours = {
            p.name: p for p in committed.iterdir() if p.is_file() and p.suffix in (".py", ".pyi")
        }
        problems = [f"missing: {n}" for n in sorted(set(fresh) - set(ours))]
        problems += [f"not generated: {n}" for n in sorted(set(ours) - set(fresh))]
        problems += [
            f"differs: {n}"
            for n in sorted(set(fresh) & set(ours))
            if not filecmp.cmp(fresh[n], ours[n], shallow=False)
        ]
        if problems:
            print(
                "protocol stubs are out of date (run: python proto/generate.py):", file=sys.stderr
            )
            for line in problems:
                print(f"  {line}", file=sys.stderr)
            return 1
    print("protocol stubs are up to date")
    return 0


if __name__ == "__main__":
    sys.exit(main())
