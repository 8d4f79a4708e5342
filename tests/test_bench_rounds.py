"""The benchmark's rounds: each path runs once a round, the paths in turns, the best run counts.

Pure logic of bench/bench.py (the benchmark itself runs in tests/test_bench.py).
"""

from __future__ import annotations

import importlib.util
import random
import sys
from pathlib import Path
from types import ModuleType, SimpleNamespace
from typing import Any

BENCH = Path(__file__).resolve().parent.parent / "bench"


def load_bench() -> ModuleType:
    sys.path.insert(0, str(BENCH))  # its sibling modules
    try:
        spec = importlib.util.spec_from_file_location("bench_under_test", BENCH / "bench.py")
        assert spec is not None and spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = module  # its dataclasses look themselves up there
        spec.loader.exec_module(module)
        return module
    finally:
        sys.path.remove(str(BENCH))


def test_every_round_runs_each_path_once_after_its_preparation_and_the_best_run_counts() -> None:
    bench = load_bench()
    paths = ["qmp", "nbd", "borg", "restic"]
    seconds = {("qmp", 0): 0.6, ("qmp", 1): 0.5, ("qmp", 2): 0.7,
               ("nbd", 0): 0.5, ("nbd", 1): 0.9, ("nbd", 2): 0.8,
               ("borg", 0): 4.0, ("borg", 1): 4.1, ("borg", 2): 3.9,
               ("restic", 0): 5.0, ("restic", 1): 5.0, ("restic", 2): 4.8}
    events: list[tuple[str, Any]] = []
    current = -1

    def before(r: int) -> None:
        nonlocal current
        current = r
        events.append(("before", r))

    def run(path: str) -> Any:
        events.append(("run", path))
        return SimpleNamespace(path=path, round=current,
                               m=SimpleNamespace(seconds=seconds[(path, current)]))

    got = bench.best_of_rounds(paths, 3, run, before)

    assert [e for e in events if e[0] == "before"] == [("before", r) for r in range(3)]
    rounds = [events[i + 1:i + 1 + len(paths)] for i, e in enumerate(events) if e[0] == "before"]
    for r, runs in enumerate(rounds):
        assert [p for _, p in runs] == bench.turns(paths, r, 3)
        assert sorted(p for _, p in runs) == sorted(paths)
    assert len({tuple(p for _, p in runs)[0] for runs in rounds}) > 1  # rounds start elsewhere
    assert {p: (r.round, r.m.seconds) for p, r in got.items()} == {
        "qmp": (1, 0.5), "nbd": (0, 0.5), "borg": (2, 3.9), "restic": (2, 4.8)}


def test_without_a_preparation_the_rounds_still_take_turns() -> None:
    bench = load_bench()
    order: list[str] = []

    def run(path: str) -> Any:
        order.append(path)
        return SimpleNamespace(m=SimpleNamespace(seconds=float(len(order))))

    got = bench.best_of_rounds(["a", "b"], 2, run)
    assert order == ["a", "b", "b", "a"]
    assert {p: r.m.seconds for p, r in got.items()} == {"a": 1.0, "b": 2.0}


def test_every_round_rewrites_the_same_blocks_with_bytes_they_did_not_hold() -> None:
    bench = load_bench()
    plan = bench.rewrites(32768, random.Random(7))  # the 2 GiB disk's 64 KiB blocks
    rounds = [next(plan) for _ in range(50)]
    assert len(rounds[0]) == 327
    for before, now in zip(rounds, rounds[1:], strict=False):
        assert now.keys() == before.keys()  # the same 1%: the latest snapshot stays 1% away
        assert all(1 <= p <= 255 and p != before[b] for b, p in now.items())
    # Every other byte comes, not a fixed cycle.
    assert len({r[min(r)] for r in rounds}) > 20
    assert bench.rewrites(32768, random.Random(7)).__next__() == rounds[0]  # reproducible
