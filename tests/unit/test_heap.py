"""The serving processes run with automatic garbage collection off: this holds only if the letter path
makes no reference cycles, and if the collector thread does free the cycles others make."""

from __future__ import annotations

import gc
import subprocess
import sys
import textwrap
from collections import Counter
from datetime import datetime

import pytest

from gateway import seal
from gateway.pipeline import cut_for, prepare
from gateway.route import route
from gateway.settings import Settings
from tests.conftest import FIXTURES, mappings
from tests.dispatch_cases import directory, store

AT = datetime.fromisoformat("2026-11-16T09:00:00+01:00")
LETTERS = sorted((FIXTURES / "dispatch").glob("ldl-ses-*.xml"))
SIGNER = seal.Signer(seal.generate_key())


def _letter_path(name: str) -> None:
    """What a serving process does with a letter: translate, route, and cut and seal each recipient's view."""
    path = FIXTURES / "dispatch" / name
    consents = store(f"consents-{path.stem.split('-')[2]}.json")
    prepared = prepare(path.read_bytes(), name=path.name, mappings=mappings(), settings=Settings(), now=AT)
    for item in route(prepared.resources, directory(), prepared.policy).routed:
        cut = cut_for(prepared, item, AT, consents, Settings())
        if cut.message is not None:
            seal.sign(cut.message, SIGNER, AT.isoformat())


@pytest.mark.parametrize("name", [p.name for p in LETTERS])
def test_the_letter_path_leaves_no_reference_cycle(name: str) -> None:
    _letter_path(name)  # warm: caches filled on first use are not garbage
    enabled = gc.isenabled()
    while gc.collect():  # what earlier tests left (some of it takes two passes) is not this letter's
        pass
    gc.disable()
    gc.set_debug(gc.DEBUG_SAVEALL)
    try:
        for _ in range(3):
            _letter_path(name)
        found = gc.collect()
        kinds = Counter(type(o).__name__ for o in gc.garbage)
    finally:
        gc.set_debug(0)
        gc.garbage.clear()
        if enabled:
            gc.enable()
    # a cycle (a closure calling itself, an exception kept with its traceback) is freed only by the
    # collector, which the serving processes run every few minutes: it would pile up in between
    assert found == 0, f"{found} objects in reference cycles: {kinds.most_common(8)}"


def _cycle_freed(settle: str, meanwhile: str = "") -> str:
    """In a fresh process after ``settle_heap(settle)``: make a reference cycle, drop it, run ``meanwhile``,
    and wait up to 10 s for the collector thread; "freed" or "kept"."""
    script = textwrap.dedent(
        f"""
        import gc, time, weakref
        from gateway.supervise import settle_heap
        settle_heap({settle})
        assert not gc.isenabled()
        class Node: pass
        node = Node(); node.me = node
        freed = []
        weakref.finalize(node, freed.append, True)
        del node
        {meanwhile}
        deadline = time.monotonic() + 10
        while not freed and time.monotonic() < deadline:
            time.sleep(0.05)
        print("freed" if freed else "kept")
        """
    )
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60, check=True)
    return f"{out.stdout.strip()} {out.stderr}".strip()


def test_the_collector_thread_frees_cycles_with_automatic_collection_off() -> None:
    assert _cycle_freed("every=0.2") == "freed"


def test_a_pile_of_allocations_is_collected_before_the_period_ends() -> None:
    # live containers: the count the collector watches
    assert _cycle_freed("every=3600, allocations=10_000", "keep = [[] for _ in range(20_000)]") == "freed"
