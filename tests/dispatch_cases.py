"""Dispatch scenarios (seeds S1-S7): letter, consents, instant, fallback; and a cached runner."""

from __future__ import annotations

from datetime import datetime
from functools import cache

import orjson

from gateway.consent import MemoryConsentStore
from gateway.directory import Directory, load_directory
from gateway.pipeline import Dispatch, dispatch_letter
from gateway.policy import policy_from
from gateway.settings import Settings
from tests.conftest import FIXTURES, mappings

SUIVI = "PractitionerRole/suivi-post-hospit"
SCENARIOS: dict[str, tuple[str, str, str, str | None]] = {
    "s1": ("cda/ldl-ses-s1-2022.xml", "consents-s1.json", "2026-10-30T11:30:00+01:00", None),
    "s1-pharmacy": ("dispatch/ldl-ses-s1-pharmacy.xml", "consents-s1.json", "2026-10-30T11:30:00+01:00", None),
    "s2-t1": ("dispatch/ldl-ses-s2-tutelle.xml", "consents-s2.json", "2018-06-01T12:00:00+02:00", None),
    "s2-t2": ("dispatch/ldl-ses-s2-tutelle.xml", "consents-s2.json", "2019-01-01T12:00:00+01:00", None),
    "s2-t3": ("dispatch/ldl-ses-s2-tutelle.xml", "consents-s2.json", "2019-07-20T12:00:00+02:00", None),
    "s2-t4": ("dispatch/ldl-ses-s2-tutelle.xml", "consents-s2.json", "2019-08-15T12:00:00+02:00", None),
    "s4": ("dispatch/ldl-ses-s4-no-gp.xml", "consents-s4.json", "2026-11-04T11:00:00+01:00", None),
    "s4-fallback": ("dispatch/ldl-ses-s4-no-gp.xml", "consents-s4.json", "2026-11-04T11:00:00+01:00", SUIVI),
    "s5": ("dispatch/ldl-ses-s5-dac.xml", "consents-s5.json", "2026-11-03T11:30:00+01:00", None),
    "s6-t1": ("dispatch/ldl-ses-s6-objection.xml", "consents-s6.json", "2026-11-05T11:30:00+01:00", None),
    "s6-t2": ("dispatch/ldl-ses-s6-objection.xml", "consents-s6.json", "2026-11-16T09:00:00+01:00", None),
    "s7": ("dispatch/ldl-ses-s7-cognitive.xml", "consents-s7.json", "2026-11-08T10:30:00+01:00", None),
}


@cache
def directory() -> Directory:
    return load_directory(
        orjson.loads((FIXTURES / "dispatch" / "directory.json").read_bytes()), policy_from(mappings())
    )


def store(consents: str) -> MemoryConsentStore:
    result = MemoryConsentStore()
    result.load_bundle(orjson.loads((FIXTURES / "dispatch" / consents).read_bytes()))
    return result


@cache
def run(name: str) -> Dispatch:
    letter, consents, instant, fallback = SCENARIOS[name]
    path = FIXTURES / letter
    return dispatch_letter(
        path.read_bytes(),
        name=path.name,
        mappings=mappings(),
        settings=Settings(),
        directory=directory(),
        consents=store(consents),
        at=datetime.fromisoformat(instant),
        fallback=fallback,
    )
