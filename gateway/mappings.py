"""Load and validate the mapping tables in ``mappings/`` (plus an optional site overlay).

Mappings are data, logic is Python: YAML files say which document types exist, which section (by
templateId or LOINC code) goes to which named translator, and how codes map; the translators are
Python functions looked up by name.  Every file is parsed into a pydantic model when loaded and the
whole set is cross-checked (unknown translator, duplicate code, unknown table), so a bad mapping stops
the process at start-up with :class:`~gateway.errors.MappingLoadError` instead of producing bad FHIR
later.  A site overlay directory holds files with the same relative paths; an overlay file replaces the
built-in one (``merge: true`` in a code table merges entries instead), and :attr:`Mappings.digest`
identifies the effective rule set so audits can say which rules decided.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from typing import Any, Literal, TypeVar

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from gateway.errors import MappingLoadError, UnmappedCode, UnsupportedDocument, Where

__all__ = [
    "CodeTable",
    "DocumentKind",
    "Mappings",
    "SectionRule",
    "builtin_dir",
    "load_mappings",
    "load_model",
]

CDA_NS = "urn:hl7-org:v3"
_M = TypeVar("_M", bound=BaseModel)


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class DocumentKind(_Strict):
    """One document type the gateway accepts."""

    format: str
    label: str
    roles: tuple[Literal["letter", "prior"], ...]
    adapter: Literal["cda", "fhir-document", "fhir-list"]
    template_id: str | None = None
    code: str | None = None
    known_versions: tuple[str, ...] = ()
    sections: str | None = None  # relative path of the section table
    bundle_type: str | None = None
    resource_type: str | None = None


class DocumentTable(_Strict):
    cda: tuple[DocumentKind, ...]
    fhir: tuple[DocumentKind, ...]


class SectionRule(_Strict):
    """Which translator handles a section, recognised by templateId or LOINC code."""

    title: str
    translator: str
    loinc: tuple[str, ...] = ()
    template_ids: tuple[str, ...] = ()
    args: dict[str, str] = Field(default_factory=dict)

    @field_validator("loinc", "template_ids", mode="before")
    @classmethod
    def _one_or_many(cls, value: Any) -> Any:
        return (value,) if isinstance(value, str) else value


class SectionTable(_Strict):
    sections: tuple[SectionRule, ...]
    unmapped: Literal["narrative", "error"] = "narrative"


class CodeTable(_Strict):
    """A code table with an explicit policy for codes it does not list."""

    name: str
    description: str
    on_unmapped: Literal["error", "omit", "keep"]
    merge: bool = False
    entries: dict[str, Any]

    def lookup(self, code: str, *, where: Where | None = None) -> Any | None:
        """The mapped value; for unlisted codes: raise (error), None (omit) or the code itself (keep)."""
        if code in self.entries:
            return self.entries[code]
        if self.on_unmapped == "error":
            raise UnmappedCode(f"code {code!r} is not in table {self.name!r}", where=where)
        return code if self.on_unmapped == "keep" else None


def builtin_dir() -> Path:
    """The built-in mappings: next to the package in a source tree, inside it when installed."""
    packaged = Path(__file__).parent / "_data" / "mappings"
    return packaged if packaged.is_dir() else Path(__file__).resolve().parent.parent / "mappings"


@dataclass(frozen=True, slots=True)
class Mappings:
    documents: DocumentTable
    sections: Mapping[str, SectionTable]
    codes: Mapping[str, CodeTable]
    raw: Mapping[str, Any]  # other data files (labels, lexicons) by relative path, already parsed
    digest: str
    sources: Mapping[str, str] = field(default_factory=dict)  # relative path -> "builtin" | overlay dir

    def code(self, table: str) -> CodeTable:
        try:
            return self.codes[table]
        except KeyError:
            raise MappingLoadError(f"no code table named {table!r}") from None

    def section_rule(self, table: str, template_ids: Iterable[str], loinc: str | None) -> SectionRule | None:
        """Match a section by CI-SIS/IHE templateId first, then by LOINC code."""
        rules = self.sections[table].sections
        ids = set(template_ids)
        for rule in rules:
            if ids.intersection(rule.template_ids):
                return rule
        if loinc:
            for rule in rules:
                if loinc in rule.loinc:
                    return rule
        return None

    def detect_cda(self, root: Any, *, role: str, where: Where) -> DocumentKind:
        if root.tag != f"{{{CDA_NS}}}ClinicalDocument":
            raise UnsupportedDocument(
                f"unknown document type: root element {root.tag!r} is not an HL7 CDA ClinicalDocument",
                where=where,
            )
        template_ids = {t.get("root") for t in root.findall(f"{{{CDA_NS}}}templateId")}
        code_el = root.find(f"{{{CDA_NS}}}code")
        code = code_el.get("code") if code_el is not None else None
        for kind in self.documents.cda:
            if kind.template_id in template_ids:
                return _check_role(kind, role, where)
        known = ", ".join(k.label for k in self.documents.cda if role in k.roles)
        raise UnsupportedDocument(
            f"unknown document type (code {code or 'absent'}, templateIds {sorted(t for t in template_ids if t)}); "
            f"accepted as {role}: {known}",
            where=where,
        )

    def detect_fhir(self, data: Mapping[str, Any], *, role: str, where: Where) -> DocumentKind:
        resource_type = data.get("resourceType")
        bundle_type = data.get("type") if resource_type == "Bundle" else None
        for kind in self.documents.fhir:
            if kind.resource_type == resource_type and (kind.bundle_type in (None, bundle_type)):
                return _check_role(kind, role, where)
        shown = f"{resource_type}" + (f" of type {bundle_type!r}" if bundle_type else "")
        known = ", ".join(k.label for k in self.documents.fhir if role in k.roles)
        raise UnsupportedDocument(f"unknown FHIR input {shown}; accepted as {role}: {known}", where=where)


def _check_role(kind: DocumentKind, role: str, where: Where) -> DocumentKind:
    if role not in kind.roles:
        uses = " or ".join(kind.roles)
        raise UnsupportedDocument(f"a {kind.label} can only be used as {uses}, not as {role}", where=where)
    return kind


def _read_yaml(path: Path) -> Any:
    try:
        return yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as exc:
        raise MappingLoadError(f"cannot read mapping file: {exc}", where=Where(source=str(path))) from None


def _files(directory: Path) -> dict[str, Path]:
    return {p.relative_to(directory).as_posix(): p for p in sorted(directory.rglob("*.yaml"))}


def _model(model: type[_M], data: Any, path: str) -> _M:
    try:
        return model.model_validate(data)
    except ValueError as exc:  # raised by a model's own post-validation check
        if not isinstance(exc, ValidationError):
            raise MappingLoadError(f"invalid mapping: {exc}", where=Where(source=path)) from None
        raise _first_error(exc, path) from None


def _first_error(exc: ValidationError, path: str) -> MappingLoadError:
    first = exc.errors()[0]
    loc = ".".join(str(p) for p in first["loc"])
    return MappingLoadError(
        f"invalid mapping ({exc.error_count()} problem(s)); first at {loc}: {first['msg']}",
        where=Where(source=path),
    )


_MODELS: dict[tuple[str, str, type[BaseModel]], BaseModel] = {}


def load_model(mappings: Mappings, relative: str, model: type[_M]) -> _M:
    """A data file of the mapping set, validated into ``model`` once per mapping set (MappingLoadError)."""
    key = (mappings.digest, relative, model)
    found = _MODELS.get(key)
    if found is None:
        data = mappings.raw.get(relative)
        if data is None:
            raise MappingLoadError(f"{relative} is missing", where=Where(source="mappings"))
        found = _model(model, data, relative)
        _MODELS[key] = found
    assert isinstance(found, model)
    return found


def load_mappings(
    overlay: Path | None = None,
    *,
    translators: Iterable[str] = (),
    base: Path | None = None,
) -> Mappings:
    """Load, overlay and cross-check every mapping file; raise MappingLoadError on any problem."""
    base = base or builtin_dir()
    files = _files(base)
    sources = dict.fromkeys(files, "builtin")
    overlay_files: dict[str, Path] = {}
    if overlay is not None:
        if not overlay.is_dir():
            raise MappingLoadError("overlay is not a directory", where=Where(source=str(overlay)))
        overlay_files = _files(overlay)
    parsed: dict[str, Any] = {rel: _read_yaml(path) for rel, path in files.items()}
    for rel, path in overlay_files.items():
        data = _read_yaml(path)
        if rel.startswith("codes/") and isinstance(data, dict) and data.get("merge") and rel in parsed:
            merged = dict(parsed[rel])
            merged["entries"] = {**parsed[rel].get("entries", {}), **data.get("entries", {})}
            data = merged
        parsed[rel] = data
        sources[rel] = str(overlay)
    if "documents.yaml" not in parsed:
        raise MappingLoadError("documents.yaml is missing", where=Where(source=str(base)))
    documents = _model(DocumentTable, parsed["documents.yaml"], "documents.yaml")
    codes = {Path(rel).stem: _model(CodeTable, data, rel) for rel, data in parsed.items() if rel.startswith("codes/")}
    for name, table in codes.items():
        if table.name != name:
            raise MappingLoadError(f"table name {table.name!r} differs from its file name", where=Where(source=name))
    sections: dict[str, SectionTable] = {}
    for kind in (*documents.cda, *documents.fhir):
        if kind.sections is None or kind.sections in sections:
            continue
        if kind.sections not in parsed:
            raise MappingLoadError(f"section table {kind.sections} is missing", where=Where(source=kind.format))
        sections[kind.sections] = _model(SectionTable, parsed[kind.sections], kind.sections)
    _cross_check(documents, sections, set(translators))
    digest = hashlib.sha256(
        b"".join(rel.encode() + b"\0" + repr(parsed[rel]).encode() for rel in sorted(parsed))
    ).hexdigest()
    raw = {rel: data for rel, data in parsed.items() if not rel.startswith("codes/")}
    return Mappings(documents, sections, codes, raw, digest, sources)


def _cross_check(documents: DocumentTable, sections: Mapping[str, SectionTable], translators: set[str]) -> None:
    formats = [k.format for k in (*documents.cda, *documents.fhir)]
    dupes = {f for f in formats if formats.count(f) > 1}
    if dupes:
        raise MappingLoadError(f"duplicate document formats: {sorted(dupes)}", where=Where(source="documents.yaml"))
    for rel, table in sections.items():
        seen: dict[str, str] = {}
        for rule in table.sections:
            if translators and rule.translator not in translators:
                raise MappingLoadError(
                    f"section {rule.title!r} names unknown translator {rule.translator!r}; "
                    f"known: {', '.join(sorted(translators))}",
                    where=Where(source=rel),
                )
            for key in (*rule.loinc, *rule.template_ids):
                if key in seen:
                    raise MappingLoadError(
                        f"{key} is claimed by both {seen[key]!r} and {rule.title!r}", where=Where(source=rel)
                    )
                seen[key] = rule.title


@cache
def default_mappings() -> Mappings:
    """The built-in mappings, checked against the registered translators (loaded once)."""
    from gateway.translate.registry import SECTION_TRANSLATORS

    return load_mappings(translators=SECTION_TRANSLATORS)


TranslatorFn = Callable[..., None]
