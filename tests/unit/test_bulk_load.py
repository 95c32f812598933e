"""`cluster.bulk_load`'s decisions, against a fake primary: when it raises the checkpoint
settings, when it leaves them alone, and that it only ever reverts its own."""

from __future__ import annotations

from collections.abc import Sequence

import pytest

from pgrecovery.adapters.ssh import CommandResult, SshEndpoint
from pgrecovery.cluster import bulk_load
from pgrecovery.cluster.nodes import A9sLayout, Node

PRIMARY = Node("pg/0", "10.77.0.10")
LAYOUT = A9sLayout(postgres_major=15)
AUTO_CONF = "/var/vcap/store/postgresql15/postgresql.auto.conf"


class FakePrimary:
    def __init__(self, *, free_mb: int = 20_000, by_hand: bool = False) -> None:
        self.free_mb = free_mb
        self.settings = {"max_wal_size": ("256", "MB", AUTO_CONF if by_hand else "/x.conf"),
                         "checkpoint_timeout": ("300", "s", "/x.conf")}
        self.marker = False
        self.sql: list[str] = []

    async def run_root(self, node: SshEndpoint, argv: Sequence[str], *,
                       input: bytes | str | None = None, timeout: float | None = None,
                       check: bool = True) -> CommandResult:
        script = " ".join(argv)
        if "df -B1M" in script:
            return CommandResult(0, f"{self.free_mb}\n", "")
        if "echo yes" in script:
            return CommandResult(0, "yes\n" if self.marker else "no\n", "")
        if "printf" in script:
            self.marker = True
            return CommandResult(0, "", "")
        if "rm -f" in script:
            self.marker = False
            return CommandResult(0, "", "")
        assert isinstance(input, str), argv
        self.sql.append(input)
        if "FROM pg_settings" in input:
            rows = "".join(f"{n},{s},{u},{f}\n" for n, (s, u, f) in self.settings.items())
            return CommandResult(0, rows, "")
        if "pg_conf_load_time" in input:
            return CommandResult(0, f"{len(self.sql)}\n", "")
        return CommandResult(0, "", "")


async def test_raises_to_a_quarter_of_the_free_space_then_reverts() -> None:
    primary = FakePrimary(free_mb=20_000)
    outcome = await bulk_load.apply(primary, PRIMARY, LAYOUT)  # type: ignore[arg-type]
    assert outcome.startswith("applied: max_wal_size 5000 MB (was 256 MB)"), outcome
    assert primary.marker
    assert any("ALTER SYSTEM SET max_wal_size = '5000MB'" in s for s in primary.sql)
    assert await bulk_load.revert(primary, PRIMARY, LAYOUT)  # type: ignore[arg-type]
    assert any("ALTER SYSTEM RESET max_wal_size" in s for s in primary.sql)
    assert not primary.marker
    assert not await bulk_load.revert(primary, PRIMARY, LAYOUT)  # type: ignore[arg-type]


async def test_capped_at_8_gb() -> None:
    primary = FakePrimary(free_mb=400_000)
    outcome = await bulk_load.apply(primary, PRIMARY, LAYOUT)  # type: ignore[arg-type]
    assert "max_wal_size 8192 MB" in outcome


@pytest.mark.parametrize(("free_mb", "by_hand", "why"), [
    (800, False, "a quarter of the free space is 200 MB"),
    (20_000, True, "already set with ALTER SYSTEM"),
])
async def test_left_alone(free_mb: int, by_hand: bool, why: str) -> None:
    primary = FakePrimary(free_mb=free_mb, by_hand=by_hand)
    outcome = await bulk_load.apply(primary, PRIMARY, LAYOUT)  # type: ignore[arg-type]
    assert outcome.startswith("skipped: "), outcome
    assert why in outcome, outcome
    assert not primary.marker
    assert not any("ALTER SYSTEM" in s for s in primary.sql)
    # Never reverts what it did not set: someone's own ALTER SYSTEM value stays.
    assert not await bulk_load.revert(primary, PRIMARY, LAYOUT)  # type: ignore[arg-type]
    assert not any("RESET" in s for s in primary.sql)


async def test_an_earlier_attempts_values_count_as_its_own() -> None:
    """Crashed after the ALTER SYSTEM: the values sit in postgresql.auto.conf and the marker
    says they are ours, so a new attempt applies again and the revert will find them."""
    primary = FakePrimary(free_mb=1_000, by_hand=True)
    primary.settings["max_wal_size"] = ("5000", "MB", AUTO_CONF)
    primary.marker = True
    outcome = await bulk_load.apply(primary, PRIMARY, LAYOUT)  # type: ignore[arg-type]
    assert outcome.startswith("applied: max_wal_size 5000 MB"), outcome
    assert await bulk_load.revert(primary, PRIMARY, LAYOUT)  # type: ignore[arg-type]
