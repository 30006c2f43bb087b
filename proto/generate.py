"""Regenerate the committed Python bindings of proto/optreg/v1/*.proto, and
optreg/v1/descriptors.binpb: a FileDescriptorSet of those files and their
imports with their comments (protoc --include_source_info), which the server's
reflection service answers from (optreg/server/rpc/reflection.py).

Run: python proto/generate.py   (needs the grpcio-tools pinned in pyproject's dev extra)
tests/proto/test_generated.py runs the same generation into a temporary folder and
fails when the committed files differ.
"""
import pathlib
import sys

from grpc_tools import protoc

ROOT = pathlib.Path(__file__).resolve().parent
PROTOS = sorted(str(p.relative_to(ROOT)) for p in (ROOT / "optreg" / "v1").glob("*.proto"))


def generate(out_dir: pathlib.Path) -> None:
    out_dir = pathlib.Path(out_dir).resolve()  # protoc runs in ROOT
    include = str(pathlib.Path(protoc.__file__).parent / "_proto")
    args = ["protoc", f"-I{ROOT}", f"-I{include}", f"--python_out={out_dir}",
            f"--pyi_out={out_dir}", f"--grpc_python_out={out_dir}",
            f"--descriptor_set_out={out_dir / 'optreg' / 'v1' / 'descriptors.binpb'}", "--include_source_info",
            "--include_imports", *PROTOS]
    import os
    (out_dir / "optreg" / "v1").mkdir(parents=True, exist_ok=True)
    cwd = os.getcwd()
    os.chdir(ROOT)  # protoc records proto paths relative to the include root
    try:
        if protoc.main(args) != 0:
            raise SystemExit("protoc failed")
    finally:
        os.chdir(cwd)


if __name__ == "__main__":
    generate(pathlib.Path(sys.argv[1]) if len(sys.argv) > 1 else ROOT)
