"""The whole mesh, started as `make run` starts it, called as a client would (grpcurl)."""

import asyncio
import json
import os
import re
import secrets
import signal
import sys
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import grpc
import pytest
from google.protobuf.timestamp_pb2 import Timestamp

from c360.common.v1 import common_pb2
from c360.gate.v1 import gate_pb2, gate_pb2_grpc
from c360.profile.v1 import profile_pb2, profile_pb2_grpc
from cli.demo_shop import generate
from services.runtime.settings import SERVICES, ServiceName
from tests.backing import Backing, free_port
from tests.polling import eventually
from tests.rpc import FULL_NAMES

READY_DEADLINE_SECONDS = 90.0
DEV_TOKEN = "e2e-dev-token"
CHANNELS = [
    common_pb2.CHANNEL_EMAIL,
    common_pb2.CHANNEL_SMS,
    common_pb2.CHANNEL_WHATSAPP,
    common_pb2.CHANNEL_PUSH,
]
GRPCURL = str(Path(sys.executable).parent / "grpcurl")
C360 = str(Path(sys.executable).parent / "c360")
PNG = b"\x89PNG\r\n\x1a\n"


@dataclass
class Mesh:
    process: asyncio.subprocess.Process
    process_cwd: Path
    ports: dict[ServiceName, int]
    banner: list[str]


async def start_mesh(env: dict[str, str], cwd: Path) -> Mesh:
    ports = {service: free_port() for service in SERVICES}
    env = {**env, **{f"C360_{s.upper()}_PORT": str(p) for s, p in ports.items()}}
    env["C360_WEBHOOK_PORT"] = str(free_port())
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "services.runtime.mesh",
        cwd=cwd,
        env=env,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.DEVNULL,
    )
    assert process.stdout is not None
    banner: list[str] = []
    deadline = asyncio.get_running_loop().time() + READY_DEADLINE_SECONDS
    while not banner or banner[-1] != "ready":
        remaining = deadline - asyncio.get_running_loop().time()
        line = await asyncio.wait_for(process.stdout.readline(), max(remaining, 0.01))
        if not line:
            raise AssertionError(f"mesh exited before ready: {banner}")
        banner.append(line.decode().rstrip("\n"))
    return Mesh(process, cwd, ports, banner)


async def stop_mesh(mesh: Mesh) -> tuple[int, str]:
    mesh.process.send_signal(signal.SIGINT)
    assert mesh.process.stdout is not None
    rest = await asyncio.wait_for(mesh.process.stdout.read(), 60)
    return await mesh.process.wait(), rest.decode()


async def grpcurl(*args: str) -> tuple[int, str]:
    process = await asyncio.create_subprocess_exec(
        GRPCURL,
        "-plaintext",
        *args,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    output, _ = await asyncio.wait_for(process.communicate(), 30)
    return await process.wait(), output.decode()


def base_env(tmp_path: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("C360_", "OTEL_"))}
    env.pop("DATABASE_URL", None)
    env.pop("REDIS_URL", None)
    return {**env, "C360_DEV_TOKEN": DEV_TOKEN, "C360_DATA_DIR": str(tmp_path / "data")}


@pytest.fixture(scope="module")
async def embedded_mesh(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Mesh]:
    """One mesh on embedded defaults, shared by the tests that only call it."""
    folder = tmp_path_factory.mktemp("mesh")
    mesh = await start_mesh(base_env(folder), folder)
    yield mesh
    await stop_mesh(mesh)


async def test_make_run_prints_addresses_the_token_an_example_and_ready(
    embedded_mesh: Mesh,
) -> None:
    banner = embedded_mesh.banner
    assert f"token: {DEV_TOKEN}" in banner
    for service, port in embedded_mesh.ports.items():
        assert f"  {service:<11} localhost:{port}" in banner
    assert any("grpcurl -plaintext -H 'authorization: Bearer" in line for line in banner)
    data = Path(embedded_mesh.process_cwd) / "data"
    assert sorted(p.name for p in data.iterdir()) == sorted(f"{s}.db" for s in SERVICES)


async def test_grpcurl_lists_and_health_checks_every_service(embedded_mesh: Mesh) -> None:
    for service, port in embedded_mesh.ports.items():
        code, output = await grpcurl(
            "-H", f"authorization: Bearer {DEV_TOKEN}", f"localhost:{port}", "list"
        )
        assert code == 0, output
        assert output.split() == sorted(
            [
                FULL_NAMES[service],
                "c360.common.v1.ShopData",
                "grpc.health.v1.Health",
                "grpc.reflection.v1alpha.ServerReflection",
            ]
        )
        code, output = await grpcurl(f"localhost:{port}", "grpc.health.v1.Health/Check")
        assert code == 0, output
        assert json.loads(output) == {"status": "SERVING"}


async def test_grpcurl_describe_shows_the_contract(embedded_mesh: Mesh) -> None:
    code, output = await grpcurl(
        f"localhost:{embedded_mesh.ports['gate']}", "describe", "c360.gate.v1.Gate"
    )
    assert code == 0, output
    assert (
        "rpc Check ( .c360.gate.v1.CheckRequest ) returns ( .c360.gate.v1.CheckResponse )" in output
    )
    code, output = await grpcurl(
        f"localhost:{embedded_mesh.ports['gate']}", "describe", "c360.gate.v1.CheckResponse"
    )
    assert code == 0, output
    assert "string reason = 2;" in output


async def test_calls_are_authenticated_and_answered(embedded_mesh: Mesh) -> None:
    gate = f"localhost:{embedded_mesh.ports['gate']}"
    token = ("-H", f"authorization: Bearer {DEV_TOKEN}")
    request = json.dumps(
        {"shop_id": "shop-a", "person_id": "p1", "channel": "CHANNEL_SMS", "message_id": "m1"}
    )
    code, output = await grpcurl("-d", request, gate, "c360.gate.v1.Gate/Check")
    assert code != 0
    assert "Code: Unauthenticated" in output
    code, output = await grpcurl(*token, "-d", request, gate, "c360.gate.v1.Gate/Check")
    assert code == 0, output
    assert json.loads(output) == {"reason": "no_consent:sms", "counts": {"fatigue": "0.00"}}
    profile = f"localhost:{embedded_mesh.ports['profile']}"
    code, output = await grpcurl(
        *token,
        "-d",
        json.dumps({"shop_id": "shop-a", "person": {"person_id": "p1"}}),
        profile,
        "c360.profile.v1.Profile/Get",
    )
    assert code != 0
    assert "Code: NotFound" in output  # identity's answer, through the profile's peer call


async def test_an_unsubscribe_blocks_every_channel_at_the_gate_within_a_second(
    embedded_mesh: Mesh,
) -> None:
    auth = (("authorization", f"Bearer {DEV_TOKEN}"),)
    placed = Timestamp()
    placed.FromDatetime(datetime(2026, 1, 10, tzinfo=UTC))
    async with (
        grpc.aio.insecure_channel(f"localhost:{embedded_mesh.ports['profile']}") as to_profile,
        grpc.aio.insecure_channel(f"localhost:{embedded_mesh.ports['gate']}") as to_gate,
    ):
        profile = profile_pb2_grpc.ProfileStub(to_profile)
        gate = gate_pb2_grpc.GateStub(to_gate)
        order = await profile.IngestOrder(
            profile_pb2.IngestOrderRequest(
                shop_id="shop-e2e", order_id="5001", total="42.00", currency="EUR",
                source=profile_pb2.ORDER_SOURCE_ONLINE, placed_at=placed,
                identifiers=[common_pb2.Identifier(type="email", value="ivy@mail.example")],
            ),
            metadata=auth,
        )  # fmt: skip
        await profile.Unsubscribe(
            profile_pb2.UnsubscribeRequest(
                shop_id="shop-e2e", person=common_pb2.PersonRef(person_id=order.person_id),
                source="email_footer", at=placed,
            ),
            metadata=auth,
        )  # fmt: skip

        async def reasons() -> list[str]:
            answers = [
                await gate.Check(
                    gate_pb2.CheckRequest(
                        shop_id="shop-e2e",
                        person_id=order.person_id,
                        channel=channel,
                        message_id=secrets.token_hex(4),
                        dry_run=True,
                    ),
                    metadata=auth,
                )
                for channel in CHANNELS
            ]
            return [a.reason for a in answers]

        await eventually(reasons, lambda r: r == ["global_unsubscribe"] * 4, "unsubscribe", 1.0)


async def test_ctrl_c_stops_every_service_cleanly(tmp_path: Path) -> None:
    mesh = await start_mesh(base_env(tmp_path), tmp_path)
    code, rest = await stop_mesh(mesh)
    assert code == 0
    assert rest.splitlines()[-1] == "stopped"
    for port in mesh.ports.values():
        status, _ = await grpcurl("-max-time", "2", f"localhost:{port}", "list")
        assert status != 0


async def test_the_mesh_runs_on_postgresql_and_redis(
    tmp_path: Path, backing: Backing, run_id: str, drop_schemas: None
) -> None:
    env = {
        **base_env(tmp_path),
        "DATABASE_URL": backing.database_url,
        "REDIS_URL": backing.redis_url,
        "C360_DB_SCHEMA_PREFIX": f"{run_id}_e2e_",
    }
    mesh = await start_mesh(env, tmp_path)
    try:
        assert "  data: PostgreSQL; gate counters: Redis" in mesh.banner
        assert not (tmp_path / "data").exists()
        for port in mesh.ports.values():
            code, output = await grpcurl(f"localhost:{port}", "grpc.health.v1.Health/Check")
            assert json.loads(output) == {"status": "SERVING"}, output
    finally:
        code, _ = await stop_mesh(mesh)
    assert code == 0


async def c360(mesh: Mesh, cwd: Path, *args: str) -> tuple[int, str]:
    """The c360 command, as a newcomer runs it: the token and the addresses in the environment."""
    env = {
        **base_env(cwd),
        "C360_TOKEN": DEV_TOKEN,
        **{f"C360_{s.upper()}_ADDR": f"localhost:{port}" for s, port in mesh.ports.items()},
    }
    process = await asyncio.create_subprocess_exec(
        C360, *args, cwd=cwd, env=env, stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.DEVNULL,
    )  # fmt: skip
    output, _ = await asyncio.wait_for(process.communicate(), 120)
    return await process.wait(), output.decode()


def table(report: str, title: str) -> dict[str, list[str]]:
    """A section of `c360 report`'s output: its rows by their first cell."""
    lines = report.split(f"\n{title}\n")[1].split("\n\n")[0].splitlines()
    rows = [re.split(r"\s{2,}", line.strip()) for line in lines if "  " in line.strip()]
    return {row[0]: row[1:] for row in rows[1:]}


async def test_a_newcomer_loads_the_demo_and_reads_the_report_with_pictures(
    embedded_mesh: Mesh, tmp_path: Path
) -> None:
    code, loaded = await c360(embedded_mesh, tmp_path, "demo", "--shop", "e2e-demo",
                              "--customers", "100", "--seed", "3")  # fmt: skip
    assert code == 0, loaded
    summary = loaded.splitlines()[0]
    assert summary.startswith("shop e2e-demo: 100 customers as of ")
    assert summary.endswith(", 2 of them duplicates waiting for review")
    day = datetime.strptime(summary.split(" as of ")[1][:10], "%Y-%m-%d").date()
    shoppers = generate(seed=3, customers=100, today=day).shoppers

    code, shown = await c360(embedded_mesh, tmp_path, "report", "--shop", "e2e-demo",
                             "--out", "report")  # fmt: skip
    assert code == 0, shown
    assert shown.splitlines()[0] == "Shop e2e-demo: 100 customers"
    stages = table(shown, "Lifecycle distribution")
    assert sum(int(row[0]) for row in stages.values()) == 100
    assert stages["unscored"] == ["0", "0.0%"]  # enrichment scored every customer
    grid = table(shown, "RFM grid: customers by recency (R) and frequency (F), 5 = the shop's best")
    scored = sum(int(n) for row in grid.values() for n in row)
    unranked = re.search(r"no RFM score \(no order, or too few customers to rank\): (\d+)", shown)
    assert unranked is not None
    assert scored + int(unranked[1]) == 100
    # Fatigue as the gate counted this week's emails: the 8th to anyone was blocked at 0.70.
    fatigue = table(shown, "Fatigue posture")
    sent = [min(s.emails_this_week, 7) * 10 for s in shoppers if s.emails_this_week]
    assert {level: int(row[0]) for level, row in fatigue.items()} == {
        f"{n / 100:.2f}": sent.count(n) if n else 100 - len(sent) for n in range(0, 101, 10)
    }
    coverage = {k: int(v[0]) for k, v in table(shown, "Profile coverage").items()}
    assert coverage["with email"] == sum(1 for s in shoppers if s.email)
    assert coverage["unsubscribed"] == sum(1 for s in shoppers if s.unsubscribed_at)
    pictures = tmp_path / "report"
    assert sorted(p.name for p in pictures.iterdir()) == [
        "calibration.png", "coverage.png", "fatigue.png", "lifecycle.png", "report.html",
        "rfm.png",
    ]  # fmt: skip
    assert all(p.read_bytes().startswith(PNG) for p in pictures.glob("*.png"))
    assert (pictures / "report.html").read_text("utf-8").count("<svg") == 5

    code, listed = await c360(embedded_mesh, tmp_path, "duplicates", "list", "--shop", "e2e-demo")
    assert code == 0, listed
    assert listed.splitlines()[-1] == "2 open candidates"
    reasons = sorted(line.split()[1] for line in listed.splitlines() if line.startswith("c"))
    assert reasons == ["phone_only_link", "two_shopify_customer_ids"]

    # Loaded again: every record is already there, nothing changes.
    code, again = await c360(embedded_mesh, tmp_path, "demo", "--shop", "e2e-demo",
                             "--customers", "100", "--seed", "3")  # fmt: skip
    assert code == 0, again
    assert again.splitlines()[:2] == [summary, "written: nothing"]
