"""`nubis network|subnet|port|router|security-group ...` against the real network service."""

from __future__ import annotations

import uuid
from pathlib import Path

import pytest

from tests.functional.cli_runner import Nubis
from tests.functional.network.harness import NetCloud


@pytest.fixture
def nubis(cloud: NetCloud, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str],
          tmp_path: Path) -> Nubis:
    """The CLI as project A's admin (routers and ports are members' business)."""
    return Nubis.configure(monkeypatch, capsys, tmp_path / "cli", cloud.world.tokens["a_admin"],
                           identity=cloud.world.address,
                           network=cloud.replicas[0].running.address)


async def test_security_group_and_rule_commands(nubis: Nubis) -> None:
    name = f"web-{uuid.uuid4().hex[:6]}"
    group = await nubis.json("security-group", "create", name, "--description", "web")
    assert group["name"] == name and len(group["rules"]) == 2  # the default egress rules
    rule = await nubis.json("security-group-rule", "create", name, "--protocol", "tcp",
                            "--port", "8000:8080", "--remote-ip", "10.0.0.0/8")
    assert (rule["direction"], rule["ports"], rule["remote"]) == ("ingress", "8000:8080",
                                                                  "10.0.0.0/8")
    rules = await nubis.json("security-group-rule", "list", "--group", name)
    assert rule["id"] in {r["id"] for r in rules} and len(rules) == 3
    shown = await nubis.json("security-group", "show", group["id"])
    assert len(shown["rules"]) == 3
    assert name in {g["name"] for g in await nubis.json("security-group", "list")}

    error = await nubis.fails("security-group-rule", "create", name, "--protocol", "tcp",
                              "--port", "0:70000")
    assert error.startswith("error: INVALID_ARGUMENT") and "port_range" in error
    code, _, _ = await nubis("security-group-rule", "delete", rule["id"])
    assert code == 0
    code, _, _ = await nubis("security-group", "delete", name)
    assert code == 0
    error = await nubis.fails("security-group", "show", name)
    assert "NOT_FOUND" in error or "no security group named" in error


async def test_network_subnet_and_port_commands(nubis: Nubis) -> None:
    suffix = uuid.uuid4().hex[:6]
    net = await nubis.json("network", "create", f"net-{suffix}", "--mtu", "1400")
    assert (net["state"] in ("ACTIVE", "BUILD")) and net["mtu"] == 1400
    subnet = await nubis.json(
        "subnet", "create", f"sub-{suffix}", "--network", f"net-{suffix}",
        "--cidr", "10.20.0.0/24", "--pool", "10.20.0.10=10.20.0.20", "--dns", "10.20.0.2",
        "--host-route", "10.30.0.0/16=10.20.0.1")
    assert subnet["network_id"] == net["id"] and subnet["gateway_ip"] == "10.20.0.1"
    assert subnet["allocation_pools"] == ["10.20.0.10-10.20.0.20"]
    listed = await nubis.json("subnet", "list", "--network", net["id"])
    assert [s["id"] for s in listed] == [subnet["id"]]
    error = await nubis.fails("subnet", "create", f"bad-{suffix}", "--network", net["id"],
                              "--cidr", "10.20.0.0/33")
    assert error.startswith("error: INVALID_ARGUMENT") and "cidr" in error

    port = await nubis.json("port", "create", f"port-{suffix}", "--network", f"net-{suffix}",
                            "--fixed-ip", "10.20.0.15")
    assert port["fixed_ips"] == ["10.20.0.15"] and port["state"] == "DOWN"
    assert port["mac_address"].startswith("fa:16:3e:") and port["security_group_ids"]
    error = await nubis.fails("port", "create", f"again-{suffix}", "--network", net["id"],
                              "--fixed-ip", f"subnet={subnet['id']},ip-address=10.20.0.15")
    assert "ALREADY_EXISTS" in error
    ports = await nubis.json("port", "list", "--network", f"net-{suffix}")
    assert [p["id"] for p in ports] == [port["id"]]
    assert (await nubis.json("port", "show", f"port-{suffix}"))["id"] == port["id"]
    assert net["id"] in {n["id"] for n in await nubis.json("network", "list")}

    for kind, ref in (("port", f"port-{suffix}"), ("subnet", subnet["id"]),
                      ("network", f"net-{suffix}")):
        code, _, err = await nubis(kind, "delete", ref)
        assert code == 0, err
    assert await nubis.json("port", "list", "--filter", f"network_id={net['id']}") == []
    assert "no network named" in await nubis.fails("network", "show", f"net-{suffix}")


async def test_router_and_floating_ip_commands(nubis: Nubis, cloud: NetCloud,
                                               tmp_path: Path) -> None:
    await cloud.start_agent(f"cli-net-node-{uuid.uuid4().hex[:4]}", network_node=True)
    suffix = uuid.uuid4().hex[:6]
    operator = nubis.as_token(cloud.world.tokens["cloud_admin"], tmp_path / "operator")
    public = await operator.json("network", "create", f"public-{suffix}", "--external")
    await operator.json("subnet", "create", f"public-sub-{suffix}", "--network", public["id"],
                        "--cidr", "198.51.100.0/24", "--no-dhcp")
    await nubis.json("network", "create", f"inner-{suffix}")
    inner = await nubis.json("subnet", "create", f"inner-sub-{suffix}", "--network",
                             f"inner-{suffix}", "--cidr", "10.40.0.0/24")

    router = await nubis.json("router", "create", f"r-{suffix}")
    assert router["external_network_id"] == "" and router["interfaces"] == []
    added = await nubis.json("router", "add-subnet", f"r-{suffix}", f"inner-sub-{suffix}")
    assert added["interfaces"] == [f"{inner['id']}=10.40.0.1"]
    gated = await nubis.json("router", "set-gateway", f"r-{suffix}", public["id"])
    assert gated["external_network_id"] == public["id"] and gated["snat"] is True
    assert [r["id"] for r in await nubis.json("router", "list", "--filter",
                                              f"name=r-{suffix}")] == [router["id"]]

    port = await nubis.json("port", "create", f"vm-{suffix}", "--network", f"inner-{suffix}")
    floating = await nubis.json("floating-ip", "create", public["id"])
    address = floating["floating_ip_address"]
    assert address.startswith("198.51.100.")
    mapped = await nubis.json("floating-ip", "associate", address, f"vm-{suffix}")
    assert mapped["port_id"] == port["id"] and mapped["fixed_ip_address"] == port["fixed_ips"][0]
    assert "FAILED_PRECONDITION" in await nubis.fails("router", "delete", f"r-{suffix}")
    unmapped = await nubis.json("floating-ip", "disassociate", floating["id"])
    assert unmapped.get("port_id", "") == ""
    for argv in (("floating-ip", "delete", address), ("port", "delete", f"vm-{suffix}"),
                 ("router", "set-gateway", f"r-{suffix}", "--clear"),
                 ("router", "remove-subnet", f"r-{suffix}", inner["id"]),
                 ("router", "delete", f"r-{suffix}")):
        code, _, err = await nubis(*argv)
        assert code == 0, (argv, err)


async def test_without_an_address_the_cli_finds_network_in_the_catalog(
    cloud: NetCloud, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str],
    tmp_path: Path,
) -> None:
    monkeypatch.delenv("NUBIS_NETWORK_ADDR", raising=False)
    nubis = Nubis.configure(monkeypatch, capsys, tmp_path / "cli",
                            cloud.world.tokens["a_member"], identity=cloud.world.address)
    groups = await nubis.json("security-group", "list")
    assert "default" in {g["name"] for g in groups}
