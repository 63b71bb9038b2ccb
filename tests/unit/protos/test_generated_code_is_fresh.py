"""The committed *_pb2*.py files are exactly what grpcio-tools makes from the .proto files."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[3]
PROTO_DIR = ROOT / "protos" / "fedcoord" / "v1"


def test_generated_protobuf_code_matches_the_proto_files(tmp_path: Path) -> None:
    pytest.importorskip("grpc_tools")
    out = tmp_path / "out"
    (out / "protos" / "fedcoord" / "v1").mkdir(parents=True)
    shutil.copytree(PROTO_DIR, tmp_path / "src" / "protos" / "fedcoord" / "v1",
                    ignore=shutil.ignore_patterns("*.py", "*.pyi", "__pycache__"))
    protos = sorted(str(p.relative_to(tmp_path / "src"))
                    for p in (tmp_path / "src").rglob("*.proto"))
    subprocess.run(
        [sys.executable, "-m", "grpc_tools.protoc", "-I", ".", f"--python_out={out}",
         f"--pyi_out={out}", f"--grpc_python_out={out}", *protos],
        cwd=tmp_path / "src", check=True,
    )
    stale = []
    for generated in sorted((out / "protos" / "fedcoord" / "v1").iterdir()):
        committed = PROTO_DIR / generated.name
        if not committed.exists() or committed.read_bytes() != generated.read_bytes():
            stale.append(generated.name)
    assert not stale, f"regenerate with `make protos`; stale: {stale}"


def test_the_generated_code_imports_with_the_installed_protobuf() -> None:
    from protos.fedcoord.v1 import admin_pb2_grpc, device_pb2_grpc

    assert device_pb2_grpc.DeviceServiceStub and admin_pb2_grpc.AdminServiceStub
