"""Mapping tables are validated when loaded; a bad table stops the process; overlays work."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from gateway.errors import MappingLoadError, UnmappedCode
from gateway.label import rules_from
from gateway.mappings import builtin_dir, load_mappings
from gateway.translate.registry import SECTION_TRANSLATORS
from tests.conftest import ROOT


def test_builtin_mappings_load_and_cover_every_translator() -> None:
    mappings = load_mappings(translators=SECTION_TRANSLATORS)
    used = {rule.translator for table in mappings.sections.values() for rule in table.sections}
    assert used <= SECTION_TRANSLATORS
    assert rules_from(mappings).fallback == "medical"
    for table in mappings.codes.values():
        assert table.on_unmapped in ("error", "omit", "keep")


def _copy(tmp_path: Path) -> Path:
    base = tmp_path / "mappings"
    shutil.copytree(builtin_dir(), base)
    return base


def _edit(path: Path, change: object) -> None:
    data = yaml.safe_load(path.read_text())
    change(data)  # type: ignore[operator]
    path.write_text(yaml.safe_dump(data, allow_unicode=True))


def test_unknown_translator_is_refused(tmp_path: Path) -> None:
    base = _copy(tmp_path)
    _edit(base / "cda-fr" / "sections.yaml", lambda d: d["sections"][0].update(translator="no_such_thing"))
    with pytest.raises(MappingLoadError, match="unknown translator 'no_such_thing'"):
        load_mappings(base=base, translators=SECTION_TRANSLATORS)


def test_duplicate_section_code_is_refused(tmp_path: Path) -> None:
    base = _copy(tmp_path)
    _edit(base / "cda-fr" / "sections.yaml", lambda d: d["sections"][1].update(loinc="33557-0"))
    with pytest.raises(MappingLoadError, match="claimed by both"):
        load_mappings(base=base, translators=SECTION_TRANSLATORS)


def test_code_table_without_policy_is_refused(tmp_path: Path) -> None:
    base = _copy(tmp_path)
    _edit(base / "codes" / "gender.yaml", lambda d: d.pop("on_unmapped"))
    with pytest.raises(MappingLoadError, match="on_unmapped"):
        load_mappings(base=base, translators=SECTION_TRANSLATORS)


def test_bad_yaml_is_refused(tmp_path: Path) -> None:
    base = _copy(tmp_path)
    (base / "codes" / "gender.yaml").write_text("name: [unclosed")
    with pytest.raises(MappingLoadError) as caught:
        load_mappings(base=base, translators=SECTION_TRANSLATORS)
    assert "gender.yaml" in caught.value.one_line()


def test_broken_label_rules_are_refused(tmp_path: Path) -> None:
    base = _copy(tmp_path)
    _edit(base / "labels.yaml", lambda d: d["activities"].append({"category": "social", "when_any": "nope"}))
    with pytest.raises(MappingLoadError, match="unknown lexicon"):
        rules_from(load_mappings(base=base, translators=SECTION_TRANSLATORS))


def test_unmapped_policy() -> None:
    mappings = load_mappings(translators=SECTION_TRANSLATORS)
    with pytest.raises(UnmappedCode):
        mappings.code("medication-change").lookup("teleported")
    assert mappings.code("gender").lookup("Z") is None  # omit
    assert mappings.code("code-systems").lookup("1.2.3.4") == "1.2.3.4"  # keep


def test_overlay_merges_a_code_table_and_changes_the_digest(tmp_path: Path) -> None:
    overlay = tmp_path / "site"
    (overlay / "codes").mkdir(parents=True)
    (overlay / "codes" / "dose-units.yaml").write_text(
        "name: dose-units\ndescription: site units\non_unmapped: keep\nmerge: true\nentries: {'{cac}': cuillère à café}\n"
    )
    base = load_mappings(translators=SECTION_TRANSLATORS)
    site = load_mappings(overlay, translators=SECTION_TRANSLATORS)
    assert site.code("dose-units").lookup("{cac}") == "cuillère à café"
    assert site.code("dose-units").lookup("{tbl}") == "comprimé"  # built-in entries kept
    assert site.digest != base.digest
    assert site.sources["codes/dose-units.yaml"] == str(overlay)


def test_cli_refuses_to_run_with_a_bad_overlay(tmp_path: Path) -> None:
    overlay = tmp_path / "site"
    (overlay / "codes").mkdir(parents=True)
    (overlay / "codes" / "gender.yaml").write_text("name: gender\nentries: {}\n")
    proc = subprocess.run(
        [sys.executable, "-m", "gateway", "mappings", str(overlay)],
        capture_output=True,
        text=True,
        cwd=ROOT,
        check=False,
    )
    assert proc.returncode == 3
    assert "configuration error" in proc.stderr and "Traceback" not in proc.stderr
    ok = subprocess.run(
        [sys.executable, "-m", "gateway", "mappings"], capture_output=True, text=True, cwd=ROOT, check=False
    )
    assert ok.returncode == 0, ok.stderr
