"""The gRPC stubs shipped in this package, generated from ``inference.proto`` with grpcio-tools.

    python -m homeforge.serve.rpc.stubs           # regenerate inference_pb2.py(.pyi), inference_pb2_grpc.py
    python -m homeforge.serve.rpc.stubs --check   # exit 1 when the shipped stubs differ from the .proto

The comparison ignores the lines that name the generator's versions (protobuf and grpcio),
so a newer grpcio-tools does not fail the check while the .proto and the stubs agree.
"""

from __future__ import annotations

import re
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
PROTO = "homeforge/serve/rpc/inference.proto"
FILES = ("inference_pb2.py", "inference_pb2.pyi", "inference_pb2_grpc.py")
_VERSIONS = [
    (re.compile(r"# Protobuf Python Version: .*"), "# Protobuf Python Version: X"),
    (re.compile(r"GRPC_GENERATED_VERSION = '[^']*'"), "GRPC_GENERATED_VERSION = 'X'"),
    (re.compile(r"ValidateProtobufRuntimeVersion\((.*?)\)", re.S), "ValidateProtobufRuntimeVersion(X)"),
]


def generate() -> dict[str, str]:
    """{file name: text} as grpcio-tools generates them from the .proto (in a temporary folder)."""
    try:
        import grpc_tools
        from grpc_tools import protoc
    except ImportError:
        raise SystemExit("generating the stubs needs grpcio-tools: pip install 'homeforge[serve]'") from None
    root = HERE.parents[2]  # the folder that holds the homeforge package
    include = Path(grpc_tools.__file__).parent / "_proto"
    with tempfile.TemporaryDirectory() as out:
        rc = protoc.main(["grpc_tools.protoc", f"-I{root}", f"-I{include}", f"--python_out={out}", f"--pyi_out={out}",
                          f"--grpc_python_out={out}", str(root / PROTO)])
        if rc != 0:
            raise SystemExit(f"protoc failed on {PROTO} (exit {rc})")
        gen = Path(out) / Path(PROTO).parent
        return {name: (gen / name).read_text(encoding="utf-8") for name in FILES}


def normalized(text: str) -> str:
    for pattern, repl in _VERSIONS:
        text = pattern.sub(repl, text)
    return text


def differences() -> list[str]:
    """The shipped stub files that differ from freshly generated ones (versions aside)."""
    fresh = generate()
    out = []
    for name, text in fresh.items():
        shipped = HERE / name
        if not shipped.is_file() or normalized(shipped.read_text(encoding="utf-8")) != normalized(text):
            out.append(name)
    return out


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if args == ["--check"]:
        bad = differences()
        if bad:
            print(f"out of date with {PROTO}: {', '.join(bad)}; run: python -m homeforge.serve.rpc.stubs",
                  file=sys.stderr)
            return 1
        print("the gRPC stubs match the .proto")
        return 0
    if args:
        print(__doc__, file=sys.stderr)
        return 2
    for name, text in generate().items():
        (HERE / name).write_text(text, encoding="utf-8")
        print(f"wrote {HERE / name}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
