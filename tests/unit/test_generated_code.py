"""The committed generated trees match the protos, import cleanly and name their services right.

Every package under ``protos/nubis`` is covered as it appears, whoever owns it;
the test-only protos of ``tests/protos`` are generated apart, into ``tests.gen``.
"""

from __future__ import annotations

import importlib
import importlib.util
import pkgutil
import shutil
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import nubis
import pytest
from google.protobuf import descriptor

ROOT = Path(__file__).resolve().parents[2]
GEN_SCRIPT = ROOT / "scripts" / "gen_protos.py"

# The services whose API must exist (others are checked when they appear).
REQUIRED_SERVICES = frozenset(
    {
        "nubis.compute.v1.ComputeService",
        "nubis.storage.v1.StorageService",
        "nubis.network.v1.NetworkService",
    }
)


def _load_gen_script() -> ModuleType:
    spec = importlib.util.spec_from_file_location("gen_protos_under_test", GEN_SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _generated_modules() -> list[ModuleType]:
    """Every *_pb2 module of the committed tree, imported."""
    names = [
        info.name
        for info in pkgutil.walk_packages(nubis.__path__, prefix="nubis.")
        if info.name.endswith("_pb2")
    ]
    return [importlib.import_module(name) for name in sorted(names)]


def _services() -> list[descriptor.ServiceDescriptor]:
    return [
        service
        for module in _generated_modules()
        for service in module.DESCRIPTOR.services_by_name.values()
    ]


def test_committed_tree_is_up_to_date() -> None:
    gen = _load_gen_script()
    stale = gen.stale_files()
    assert stale == [], f"generated code is stale, run scripts/gen_protos.py: {stale}"


@pytest.mark.parametrize("damage", ["edit", "remove", "add"])
@pytest.mark.parametrize(("tree", "module"), [
    ("API", "nubis/compute/v1/compute_service_pb2.py"),
    ("TESTS", "tests/gen/testing/v1/echo_pb2.py"),
])
def test_staleness_check_catches_damage(
    damage: str, tree: str, module: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The check above can fail: a copy of either tree with one file damaged is reported."""
    gen = _load_gen_script()
    original = getattr(gen, tree)
    shutil.copytree(original.root / original.package, tmp_path / original.package,
                    ignore=shutil.ignore_patterns("__pycache__"))
    victim = tmp_path / module
    if damage == "edit":
        victim.write_text(victim.read_text() + "\n# hand edit\n")
    elif damage == "remove":
        victim.unlink()
    else:
        victim = victim.with_name("leftover_pb2.py")
        victim.write_text("")
    copied = original._replace(root=tmp_path)
    monkeypatch.setattr(gen, "TREES", tuple(copied if t == original else t for t in gen.TREES))
    assert gen.stale_files() == [str(victim.relative_to(tmp_path))]


def test_the_check_command_fails_on_a_stale_tree(tmp_path: Path) -> None:
    """What CI runs: ``gen_protos.py --check`` exits 1 when a test proto changed."""
    for name in ("scripts", "protos", "gen", "tests/protos", "tests/gen"):
        shutil.copytree(ROOT / name, tmp_path / name, ignore=shutil.ignore_patterns("__pycache__"))
    check = [sys.executable, str(tmp_path / "scripts" / "gen_protos.py"), "--check"]
    assert subprocess.run(check, capture_output=True, timeout=120, check=False).returncode == 0
    proto = tmp_path / "tests" / "protos" / "testing" / "v1" / "echo.proto"
    proto.write_text(proto.read_text() + "\nmessage Added {}\n")
    done = subprocess.run(check, capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 1
    assert "tests/gen/testing/v1/echo_pb2.py" in done.stdout


def test_test_protos_are_not_in_the_public_tree() -> None:
    """Clients generated from protos/ see only services nubis serves."""
    assert not list((ROOT / "protos").rglob("*testing*"))
    assert not (ROOT / "gen" / "nubis" / "testing").exists()
    echo = importlib.import_module("tests.gen.testing.v1.echo_pb2")
    assert "EchoService" in echo.DESCRIPTOR.services_by_name
    public = {module.__name__ for module in _generated_modules()}
    assert not any("echo" in name for name in public), sorted(public)


@pytest.mark.parametrize(("sources", "generated"), [
    ("protos", "gen"), ("tests/protos", "tests/gen"),
])
def test_every_proto_has_generated_code_and_stubs(sources: str, generated: str) -> None:
    protos = sorted((ROOT / sources).rglob("*.proto"))
    assert protos
    for proto in protos:
        stem = ROOT / generated / proto.relative_to(ROOT / sources).with_suffix("")
        for suffix in ("_pb2.py", "_pb2.pyi", "_pb2_grpc.py", "_pb2_grpc.pyi"):
            assert Path(f"{stem}{suffix}").is_file(), f"{stem}{suffix} missing"


def test_every_generated_module_imports() -> None:
    modules = _generated_modules()
    assert modules, "no generated modules found"
    for module in modules:
        importlib.import_module(module.__name__ + "_grpc")


def test_service_full_names() -> None:
    services = _services()
    names = {service.full_name for service in services}
    assert names >= REQUIRED_SERVICES, f"missing: {sorted(REQUIRED_SERVICES - names)}"
    for service in services:
        package = service.file.package
        parts = package.split(".")
        assert len(parts) == 3 and parts[0] == "nubis" and parts[2] == "v1", package
        expected = f"{package}.{parts[1].capitalize()}Service"
        assert service.full_name == expected, f"{service.full_name} should be {expected}"


def test_one_service_per_package() -> None:
    by_package: dict[str, list[str]] = {}
    for service in _services():
        by_package.setdefault(service.file.package, []).append(service.full_name)
    for package, names in by_package.items():
        assert len(names) == 1, f"{package} defines several services: {names}"


def test_servicer_base_answers_every_method() -> None:
    """Each generated base servicer has one handler per RPC (so unimplemented RPCs answer
    UNIMPLEMENTED instead of being unknown)."""
    for service in _services():
        module = importlib.import_module(service.file.name.replace("/", ".")[:-6] + "_pb2_grpc")
        servicer = getattr(module, f"{service.name}Servicer")
        for method in service.methods:
            assert callable(getattr(servicer, method.name, None)), method.full_name
