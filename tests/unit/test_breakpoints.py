"""Breakpoints stop the step runner before a named step until released, and cost nothing unset."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from pgrecovery.engine.breakpoints import NO_BREAKPOINTS, Breakpoints, before_step

pytestmark = pytest.mark.unit


async def test_unset_breakpoints_return_at_once(tmp_path: Path) -> None:
    await asyncio.wait_for(NO_BREAKPOINTS.reach("before-x"), 0.1)
    # A directory without the hold file: nothing is written either.
    await asyncio.wait_for(Breakpoints(tmp_path).reach("before-x"), 0.1)
    assert list(tmp_path.iterdir()) == []


async def test_an_armed_breakpoint_holds_says_so_and_goes_on_when_released(
    tmp_path: Path,
) -> None:
    points = Breakpoints(tmp_path)
    name = before_step("restore-dump")
    (tmp_path / f"{name}.hold").touch()
    waiter = asyncio.create_task(points.reach(name))
    for _ in range(100):
        if (tmp_path / f"{name}.reached").exists():
            break
        await asyncio.sleep(0.01)
    assert (tmp_path / f"{name}.reached").exists()
    await asyncio.sleep(0.1)
    assert not waiter.done()
    (tmp_path / f"{name}.hold").unlink()
    await asyncio.wait_for(waiter, 1.0)


def test_names_are_plain_file_names(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="invalid breakpoint name"):
        Breakpoints(tmp_path).armed("../etc/passwd")
