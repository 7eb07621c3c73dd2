"""The committed generated tree matches the protos, imports cleanly and names its services right.

Every package under ``protos/nubis`` is covered as it appears, whoever owns it.
"""

from __future__ import annotations

import importlib
import importlib.util
import pkgutil
import shutil
from pathlib import Path
from types import ModuleType

import nubis
import pytest
from google.protobuf import descriptor

ROOT = Path(__file__).resolve().parents[2]
GEN_SCRIPT = ROOT / "scripts" / "gen_protos.py"

# Packages that exist only to exercise the server bootstrap in tests; they
# are not nubis services and need not follow the service naming rule.
TEST_ONLY_PACKAGES = frozenset({"nubis.testing.v1"})
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
def test_staleness_check_catches_damage(
    damage: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The check above can fail: a copy of the tree with one file damaged is reported."""
    gen = _load_gen_script()
    copy = tmp_path / "gen"
    shutil.copytree(ROOT / "gen", copy, ignore=shutil.ignore_patterns("__pycache__"))
    victim = copy / "nubis" / "compute" / "v1" / "compute_service_pb2.py"
    if damage == "edit":
        victim.write_text(victim.read_text() + "\n# hand edit\n")
    elif damage == "remove":
        victim.unlink()
    else:
        victim = victim.with_name("leftover_pb2.py")
        victim.write_text("")
    monkeypatch.setattr(gen, "OUTPUT", copy)
    assert str(victim.relative_to(copy / "nubis")) in gen.stale_files()


def test_every_proto_has_generated_code_and_stubs() -> None:
    for proto in sorted((ROOT / "protos" / "nubis").rglob("*.proto")):
        stem = ROOT / "gen" / proto.relative_to(ROOT / "protos").with_suffix("")
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
        if package in TEST_ONLY_PACKAGES:
            continue
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
