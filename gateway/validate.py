"""Structural validation of the gateway's FHIR R4 resources, with the R4B models' verdicts but compiled.

Why this exists
---------------
The gateway builds its resources as plain JSON-shaped dicts (see :mod:`gateway.translate.build`) and
every one of them must be valid for the fhir.resources R4B models.  Asking the models
(``fhir.resources.R4B.<module>.<Type>.model_validate(d)``, :func:`check_with_models`) costs 0.25 to
0.4 ms per resource: about 12 ms for the 29 resources (110 KiB of JSON) of the realistic letter of
``bench/bench_validate.py``, several times the whole translation budget of a few ms.

So the first time a resource type is checked, this module reads the R4B model classes themselves (their
pydantic fields, aliases, ``element_required`` primitives, ``one_of_many`` choice groups and the
primitive annotations of ``fhir_core.types``) into a compact schema, cached per model class, and
:func:`problems` walks the dict against that schema: the same verdict for about 1 ms per letter (12x
less on that bench; run it to measure on your machine).

How it stays honest
-------------------
* Nothing in the schema is written by hand: keys, cardinality, required elements, choice groups and
  primitive kinds are all derived from the models at first use.
* The fast path only decides what it is sure about: values of their canonical JSON type (a ``str``
  for a date, a ``bool`` for a boolean, ...).  Anything else (a string where a number goes, a leap
  second, a base64 value with line breaks, a complex element given as a JSON string...) is handed to
  pydantic's own validator for that very field annotation (a cached ``TypeAdapter``), so odd inputs
  get exactly the model's verdict, just slowly.
* ``tests/unit/test_validate.py`` runs differential tests: hypothesis mutates realistic resources
  (dropped required keys, unknown keys, list/scalar swaps, empty strings, bad dates, wrong JSON types,
  choice groups, unknown resource types...) and asserts that :func:`problems` is empty exactly when
  :func:`check_with_models` is; the fast primitive checks are compared one by one with the models'.

R4B is more lenient than FHIR JSON, and by default this module agrees with R4B: it accepts ``"true"``,
``"yes"`` or ``1`` for a boolean, ``True``, ``2.0`` or ``"2"`` for an integer, ``"1.5"`` for a decimal, a
Unix timestamp for a date, empty lists and empty objects, ``null`` for optional (and required complex)
elements, any string (even empty) for ``uri``, ``url``, ``markdown`` and ``Narrative.div``, and the
Python field names (``class_fhir``, ``_active`` as ``active__ext``) next to the JSON names.  Pass
``fhir_json=True`` to :func:`check` or :func:`problems` to reject those as well (the result is then a
superset of the R4B verdict): real JSON types only, no null outside primitive arrays, no empty
array/object/string, JSON names only, ``resourceType`` exactly where FHIR JSON puts it, and a
``Narrative.div`` that is an XHTML ``<div>`` in the XHTML namespace.
"""

from __future__ import annotations

import importlib
import math
import re
import threading
import types
import typing
from collections.abc import Callable
from typing import Any, Final

from fhir.resources.R4B import fhirtypes as _r4b_fhirtypes
from fhir.resources.R4B.resource import Resource as _Resource
from fhir_core import constraints as _constraints
from fhir_core import types as _ft
from fhir_core.fhirabstractmodel import FHIRAbstractModel
from pydantic import TypeAdapter, ValidationError

from gateway.errors import ProfileViolation, Where

__all__ = ["check", "check_with_models", "droppable", "problems"]

_Model = type[FHIRAbstractModel]
_Check = Callable[[Any], str | None]
_Errors = list[tuple[str, str]]

# The version prefix fhir_core uses for R4B keys of FHIR_TYPES_MAPS ("R4."), read from the same class
# fhir.resources dispatches contained resources with.
_PREFIX: Final[str] = typing.cast("type[_ft.FhirBase]", _r4b_fhirtypes.ResourceType)._prefix

# A check returns None (valid), an error message, or _DEFER: "not sure, ask pydantic".
_DEFER: Final = "\x00defer"

# ---------------------------------------------------------------------------------------------------
# Primitive checks.
#
# pydantic applies string ``pattern`` constraints with the Rust regex engine and *search* semantics,
# where ``\s`` is Unicode White_Space and ``$`` is the end of the text.  The Python translations below
# spell the White_Space set out instead of using Python's ``\s`` (which also matches U+001C..U+001F).
# ---------------------------------------------------------------------------------------------------
_WHITE_SPACE: Final = (
    "\t\n\x0b\x0c\r \x85\xa0\u1680" + "".join(map(chr, range(0x2000, 0x200B))) + "\u2028\u2029\u202f\u205f\u3000"
)
# String's pattern is ``[ \r\n\t\S]+``: a string is valid when it has one character that is not one
# of these (White_Space other than space, tab, CR, LF).
_ODD_WHITE_SPACE: Final = "".join(c for c in _WHITE_SPACE if c not in " \t\r\n")
_WS_CLASS: Final = "".join(re.escape(c) for c in _WHITE_SPACE)
# Code's pattern is ``^[^\s]+(\s[^\s]+)*$``.
_CODE_MATCH: Final = re.compile(f"[^{_WS_CLASS}]+(?:[{_WS_CLASS}][^{_WS_CLASS}]+)*").fullmatch
_ID_DEFAULT_PATTERN: Final = r"^[A-Za-z0-9\-.]+$"
_ID_MATCH: Final = re.compile(r"[A-Za-z0-9\-.]+").fullmatch
_OID_MATCH: Final = _ft.Oid.pattern.fullmatch
_DECIMAL_MATCH: Final = _ft.Decimal.pattern.fullmatch
_DATE_MATCH: Final = _ft.Date.pattern.fullmatch
_DATETIME_MATCH: Final = _ft.DateTime.pattern.fullmatch
_INSTANT_MATCH: Final = _ft.Instant.pattern.fullmatch
_TIME_MATCH: Final = _ft.Time.pattern.fullmatch
_B64_ALPHABET: Final = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"
_BIG_INT: Final = 10**4000  # str() of larger ints raises in CPython; leave those to pydantic
_MONTH_DAYS: Final = (0, 31, 28, 31, 30, 31, 30, 31, 31, 30, 31, 30, 31)
_DIV_MATCH: Final = re.compile(
    r"\s*<div\b[^>]*?\sxmlns\s*=\s*([\"'])http://www\.w3\.org/1999/xhtml\1[^>]*>.*</div>\s*", re.DOTALL
).fullmatch


def _show(value: Any) -> str:
    """A short, safe rendering of an input value for messages (inputs can be huge or odd)."""
    if isinstance(value, str):
        return repr(value[:60]) + ("..." if len(value) > 60 else "")
    if isinstance(value, int) and value.bit_length() > 128:
        return "a very large integer"
    try:
        text = repr(value)
    except Exception:  # e.g. a type whose repr fails
        return f"a {type(value).__name__}"
    return text if len(text) <= 60 else text[:60] + "..."


def _encodable(value: str) -> bool:
    """False for strings with lone surrogates, which pydantic cannot turn into Rust strings."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _day_exists(value: str) -> bool:
    """``YYYY-MM-DD...`` (already shaped by the FHIR regex) names a real calendar day."""
    day = int(value[8:10])
    month = int(value[5:7])
    if day <= _MONTH_DAYS[month]:
        return True
    year = int(value[0:4])
    return month == 2 and day == 29 and year % 4 == 0 and (year % 100 != 0 or year % 400 == 0)


def _check_string(value: Any) -> str | None:
    if type(value) is not str:
        return _DEFER
    if value.isascii():
        return None if value.strip("\x0b\x0c") else "empty string"
    if not _encodable(value):
        return _DEFER
    return None if value.strip(_ODD_WHITE_SPACE) else "string has no content"


def _check_code(value: Any) -> str | None:
    if type(value) is not str:
        return _DEFER
    if not value.isascii() and not _encodable(value):
        return _DEFER
    if _CODE_MATCH(value):
        return None
    return "empty code" if not value else "code has leading, trailing or repeated whitespace"


def _make_id_check(max_length: int | None) -> _Check:
    limit = max_length if max_length is not None else math.inf

    def check_id(value: Any) -> str | None:
        if type(value) is not str:
            return _DEFER
        if _ID_MATCH(value) and len(value) <= limit:
            return None
        return f"invalid id {_show(value)} (1-{max_length} of A-Z a-z 0-9 - .)"

    return check_id


def _check_oid(value: Any) -> str | None:
    if type(value) is not str:
        return _DEFER
    return None if _OID_MATCH(value) else f"invalid oid {_show(value)}"


def _check_any_string(value: Any) -> str | None:
    if type(value) is str and (value.isascii() or _encodable(value)):
        return None
    return _DEFER


def _check_bool(value: Any) -> str | None:
    return None if type(value) is bool else _DEFER


def _make_int_check(low: int, high: int) -> _Check:
    def check_int(value: Any) -> str | None:
        if type(value) is not int:
            return _DEFER
        return None if low <= value <= high else f"integer {_show(value)} out of range {low}..{high}"

    return check_int


def _check_decimal(value: Any) -> str | None:
    kind = type(value)
    if kind is float:
        return None if math.isfinite(value) else f"decimal {value} is not finite"
    if kind is int:
        return None if -_BIG_INT < value < _BIG_INT else _DEFER
    if kind is str:
        if not _DECIMAL_MATCH(value):
            return f"invalid decimal {_show(value)}"
        return _DEFER if "e" in value or "E" in value else None
    return _DEFER


def _check_date(value: Any) -> str | None:
    if type(value) is not str:
        return _DEFER
    if not _DATE_MATCH(value):
        return f"invalid date {_show(value)} (YYYY, YYYY-MM or YYYY-MM-DD)"
    if len(value) == 10 and not _day_exists(value):
        return f"no such day {_show(value)}"
    return None


def _check_datetime(value: Any) -> str | None:
    if type(value) is not str:
        return _DEFER
    if not _DATETIME_MATCH(value):
        return f"invalid dateTime {_show(value)} (a time needs seconds and a timezone)"
    if len(value) >= 10:
        if not _day_exists(value):
            return f"no such day {_show(value[:10])}"
        if value[17:19] == "60":
            return _DEFER  # leap second: fhir_core has its own rules
    return None


def _check_instant(value: Any) -> str | None:
    if type(value) is not str:
        return _DEFER
    if not _INSTANT_MATCH(value):
        return f"invalid instant {_show(value)} (YYYY-MM-DDThh:mm:ss with a timezone)"
    if not _day_exists(value):
        return f"no such day {_show(value[:10])}"
    return _DEFER if value[17:19] == "60" else None


def _check_time(value: Any) -> str | None:
    if type(value) is not str:
        return _DEFER
    if not _TIME_MATCH(value):
        return f"invalid time {_show(value)} (hh:mm:ss, no timezone)"
    return _DEFER if value[6:8] == "60" else None


def _check_base64(value: Any) -> str | None:
    # Only canonical base64 (what base64.b64encode produces) is decided here; anything else (line
    # breaks, stray characters, odd padding) goes to pydantic, whose lenient b64decode skips them.
    if type(value) is str and value.isascii() and len(value) % 4 == 0:
        body = value.rstrip("=")
        if len(value) - len(body) <= 2 and not body.encode("ascii").translate(None, _B64_ALPHABET):
            return None
    return _DEFER


def _check_comments(value: Any) -> str | None:
    if type(value) is str:
        return None if value.isascii() or _encodable(value) else _DEFER
    if type(value) is list:
        for item in value:
            if type(item) is not str or not (item.isascii() or _encodable(item)):
                return _DEFER
        return None
    return _DEFER


def _check_defer(value: Any) -> str | None:
    return _DEFER


# -- fhir_json=True: the JSON type first, no empty strings, then the R4B check ---------------------------
def _strict_string_kind(lax: _Check) -> _Check:
    def check(value: Any) -> str | None:
        if type(value) is not str:
            return f"expected a JSON string, got {type(value).__name__}"
        if not value:
            return "empty string"
        return lax(value)

    return check


def _strict_xhtml(value: Any) -> str | None:
    if type(value) is not str:
        return f"expected a JSON string, got {type(value).__name__}"
    if not _DIV_MATCH(value):
        return 'narrative must be one XHTML <div xmlns="http://www.w3.org/1999/xhtml">...</div>'
    return _check_any_string(value)


def _strict_bool(value: Any) -> str | None:
    return None if type(value) is bool else f"expected a JSON boolean, got {type(value).__name__}"


def _strict_int_kind(lax: _Check) -> _Check:
    def check(value: Any) -> str | None:
        if type(value) is not int:
            return f"expected a JSON integer, got {type(value).__name__}"
        return lax(value)

    return check


def _strict_decimal(value: Any) -> str | None:
    if type(value) is not int and type(value) is not float:
        return f"expected a JSON number, got {type(value).__name__}"
    return _check_decimal(value)


def _strict_comments(value: Any) -> str | None:
    return "fhir_comments is not FHIR JSON"


# ---------------------------------------------------------------------------------------------------
# The compiled schema.
# ---------------------------------------------------------------------------------------------------
_PRIMITIVE = 0
_OBJECT = 1  # a complex type or backbone element: a nested node
_RESOURCE = 2  # any resource, dispatched on its resourceType (contained, Bundle.entry.resource)

# What _walk may accept at first sight (anything else, or anything that fails, goes to _general).
_OP_OTHER = 0
_OP_STRING = 1  # string: a non-empty ASCII or encodable str with content
_OP_URI = 2  # uri, url, canonical, markdown: a non-empty ASCII or encodable str
_OP_CODE = 3  # code
_OP_PRIMITIVE = 4  # any other primitive: its check says None
_OP_OBJECT = 5  # a complex element: a dict, walked
_OP_OBJECTS = 6  # an array of complex elements: a non-empty list, items walked
_OP_PRIMITIVES = 7  # an array of primitives: a non-empty list, items checked


class _Field:
    """One element of a node, reachable by its JSON name (alias) and its Python name."""

    __slots__ = (
        "_field_adapter",
        "_item_adapter",
        "alias",
        "annotation",
        "choice",
        "item_annotation",
        "kind",
        "lax",
        "many",
        "name",
        "node",
        "null_items",
        "op",
        "optional",
        "strict",
    )

    def __init__(self, name: str, alias: str, annotation: Any) -> None:
        self.name = name
        self.alias = alias
        self.annotation = annotation  # the whole field annotation (for pydantic fallbacks)
        self.item_annotation: Any = annotation  # one item's annotation
        self.kind = _PRIMITIVE
        self.op = _OP_OTHER
        self.many = False
        self.optional = True  # null is accepted
        self.null_items = False  # null is accepted as an item of the list
        self.choice = -1  # index of the choice group in the node, -1 if none
        self.node: _Node | None = None
        self.lax: _Check = _check_defer
        self.strict: _Check = _check_defer
        self._field_adapter: TypeAdapter[Any] | None = None
        self._item_adapter: TypeAdapter[Any] | None = None

    def field_verdict(self, value: Any) -> str | None:
        """pydantic's verdict on ``value`` as this field's whole value."""
        if self._field_adapter is None:
            self._field_adapter = TypeAdapter(self.annotation)
        return _adapter_verdict(self._field_adapter, value)

    def item_verdict(self, value: Any) -> str | None:
        """pydantic's verdict on ``value`` as one item of this field."""
        if self._item_adapter is None:
            self._item_adapter = TypeAdapter(self.item_annotation)
        return _adapter_verdict(self._item_adapter, value)


class _Choice:
    __slots__ = ("name", "required")

    def __init__(self, name: str, required: bool) -> None:
        self.name = name
        self.required = required


class _Node:
    """The compiled schema of one model class (a resource, complex type or backbone element)."""

    __slots__ = (
        "abstract",
        "by_name",
        "choices",
        "fields",
        "is_resource",
        "model",
        "needs_content",
        "post",
        "required",
        "required_choice",
        "required_primitives",
        "rtype",
    )

    def __init__(self, model: _Model) -> None:
        self.model = model
        self.rtype = model.get_resource_type()
        self.is_resource = model.has_resource_base()
        self.abstract = self.rtype in ("Resource", "DomainResource")
        # FHIRPrimitiveExtension (``_field``) must carry an id, an extension or a comment.
        self.needs_content = self.rtype == "FHIRPrimitiveExtension"
        self.fields: dict[str, _Field] = {}  # by JSON name
        self.by_name: dict[str, _Field] = {}  # by Python name, where it differs from the JSON name
        self.required: tuple[_Field, ...] = ()  # must be present (pydantic required)
        self.required_primitives: tuple[tuple[_Field, _Field | None], ...] = ()  # value or extension
        self.choices: tuple[_Choice, ...] = ()
        self.required_choice = False  # one of the choice groups is required
        self.post = False  # any object-level rule to check after the keys


_NODES: dict[_Model, _Node] = {}
_RESOURCE_NODES: dict[str, _Node] = {}
_LOCK = threading.Lock()

_STRING_KINDS: Final[dict[type, _Check]] = {
    _ft.Oid: _check_oid,
    _ft.Date: _check_date,
    _ft.DateTime: _check_datetime,
    _ft.Instant: _check_instant,
    _ft.Time: _check_time,
    _ft.Base64Binary: _check_base64,
}


def _error_lines(exc: ValidationError) -> list[tuple[str, str]]:
    """(location, message) of each error; pydantic cannot render some (e.g. with lone surrogates)."""
    try:
        return [(_dotted(e["loc"]), str(e["msg"])) for e in exc.errors(include_url=False)]
    except Exception:  # UnicodeEncodeError while rendering a message
        return [("", f"{exc.error_count()} validation error(s) pydantic could not render")]


def _adapter_verdict(adapter: TypeAdapter[Any], value: Any) -> str | None:
    try:
        adapter.validate_python(value)
    except ValidationError as exc:
        return _error_lines(exc)[0][1]
    except Exception as exc:  # fhir.resources lets TypeError, KeyError, AttributeError... through
        return f"{type(exc).__name__}: {_show(str(exc))}"
    return None


def _model_verdict(model: _Model, value: Any) -> str | None:
    try:
        model.model_validate(value)
    except ValidationError as exc:
        return "; ".join(f"{loc}: {message}" if loc else message for loc, message in _error_lines(exc))
    except Exception as exc:  # see _adapter_verdict
        return f"{type(exc).__name__}: {_show(str(exc))}"
    return None


def _strip_optional(annotation: Any) -> tuple[bool, Any]:
    """(whether None is accepted, the annotation without None) of ``X | None``."""
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        args = typing.get_args(annotation)
        if type(None) in args:
            rest = tuple(a for a in args if a is not type(None))
            return True, rest[0] if len(rest) == 1 else typing.Union[rest]  # noqa: UP007
    return False, annotation


def _primitive_checks(annotation: Any) -> tuple[_Check, _Check, int]:
    """The R4B check, the fhir_json check and the fast-path op of one primitive item annotation."""
    if annotation is bool:
        return _check_bool, _strict_bool, _OP_PRIMITIVE
    if typing.get_origin(annotation) is not typing.Annotated:
        return _check_defer, _check_defer, _OP_OTHER  # uuid and anything unforeseen: pydantic decides
    for meta in annotation.__metadata__:
        kind = type(meta)
        if kind is _ft.String:
            if meta.allow_empty_str:
                break
            return _check_string, _strict_string_kind(_check_string), _OP_STRING
        if kind is _ft.Code:
            return _check_code, _strict_string_kind(_check_code), _OP_CODE
        if kind in (_ft.Uri, _ft.Canonical, _ft.Markdown, _ft.Url):
            return _check_any_string, _strict_string_kind(_check_any_string), _OP_URI
        if kind is _ft.Xhtml:
            return _check_any_string, _strict_xhtml, _OP_PRIMITIVE
        if kind is _ft.Id:
            if _constraints.TYPES_ID_PATTERN != _ID_DEFAULT_PATTERN:
                break
            lax = _make_id_check(_constraints.TYPES_ID_MAX_LENGTH)
            return lax, _strict_string_kind(lax), _OP_PRIMITIVE
        if kind is _ft.Decimal:
            return _check_decimal, _strict_decimal, _OP_PRIMITIVE
        if kind in (_ft.Integer, _ft.UnsignedInt, _ft.PositiveInt):
            lax = _make_int_check(meta.min_length, meta.max_length)
            return lax, _strict_int_kind(lax), _OP_PRIMITIVE
        if kind in _STRING_KINDS:
            lax = _STRING_KINDS[kind]
            return lax, _strict_string_kind(lax), _OP_PRIMITIVE
    return _check_defer, _check_defer, _OP_OTHER


def _compile_field(name: str, alias: str, annotation: Any, building: dict[_Model, _Node]) -> _Field:
    field = _Field(name, alias, annotation)
    field.optional, inner = _strip_optional(annotation)
    if name == "fhir_comments":  # str | list[str], on every model
        field.lax, field.strict = _check_comments, _strict_comments
        return field
    if typing.get_origin(inner) is list:
        field.many = True
        field.item_annotation = typing.get_args(inner)[0]
        field.null_items, inner = _strip_optional(field.item_annotation)
    if isinstance(inner, type) and issubclass(inner, _ft.FhirBase):
        model = inner.get_model_klass()
        if not issubclass(inner, _ft.FhirElementOrResourceBase):
            field.kind = _OBJECT
            field.op = _OP_OBJECTS if field.many else _OP_OBJECT
            field.node = _build(model, building)
        elif model is _Resource:
            field.kind = _RESOURCE
        # (ElementType, used by no R4B element, would stay a primitive that pydantic decides)
        # FHIRAbstractModel.reject_null_complex_elements: no null in complex arrays but ``_field`` ones
        field.null_items = name.endswith("__ext")
        return field
    field.lax, field.strict, op = _primitive_checks(inner)
    field.op = op if not field.many else _OP_PRIMITIVES
    return field


def _build(model: _Model, building: dict[_Model, _Node]) -> _Node:
    node = _NODES.get(model) or building.get(model)
    if node is not None:
        return node
    node = _Node(model)
    building[model] = node
    sample = model.model_construct()
    groups = sample.get_one_of_many_fields()
    group_index: dict[str, int] = {}
    choices: list[_Choice] = []
    required: list[_Field] = []
    by_field_name: dict[str, _Field] = {}
    for name, info in model.model_fields.items():
        alias = info.alias or name
        field = _compile_field(name, alias, info.annotation, building)
        by_field_name[name] = field
        node.fields[alias] = field
        if name != alias:
            node.by_name[name] = field
        if info.is_required():
            required.append(field)
        extra = info.json_schema_extra if isinstance(info.json_schema_extra, dict) else {}
        group = extra.get("one_of_many")
        if isinstance(group, str) and name in groups.get(group, ()):
            if group not in group_index:
                group_index[group] = len(choices)
                choices.append(_Choice(group, extra.get("one_of_many_required") is True))
            field.choice = group_index[group]
            field.op = _OP_OTHER  # choice elements are counted by _general
    aliases = model.get_alias_mapping()
    node.required = tuple(required)
    node.required_primitives = tuple(
        (by_field_name[aliases[element]], by_field_name.get(ext) if ext else None)
        for element, ext in sample.get_required_fields()
    )
    node.choices = tuple(choices)
    node.required_choice = any(choice.required for choice in choices)
    node.post = bool(node.required or node.required_primitives or node.choices or node.needs_content)
    return node


def _node(model: _Model) -> _Node:
    node = _NODES.get(model)
    if node is None:
        with _LOCK:
            node = _NODES.get(model)
            if node is None:
                building: dict[_Model, _Node] = {}
                node = _build(model, building)
                _NODES.update(building)  # publish complete nodes only
    return node


def _resource_model(resource_type: Any) -> _Model | None:
    """The R4B class fhir.resources itself picks for a contained ``resourceType`` (None: it fails)."""
    if not isinstance(resource_type, str):
        return None
    path = _constraints.FHIR_TYPES_MAPS.get(_PREFIX + resource_type + "Type")
    if path is None:
        return None
    module, _, name = path.rpartition(".")
    model = getattr(importlib.import_module(module), name, None)
    if not (isinstance(model, type) and issubclass(model, FHIRAbstractModel) and model.has_resource_base()):
        return None
    return model


def _resource_node(resource_type: Any) -> _Node | None:
    node = _RESOURCE_NODES.get(resource_type) if type(resource_type) is str else None
    if node is None:
        model = _resource_model(resource_type)
        if model is None:
            return None  # not cached: unknown names come from the input, they must not grow memory
        node = _node(model)
        if type(resource_type) is str:
            _RESOURCE_NODES[resource_type] = node
    return node


# ---------------------------------------------------------------------------------------------------
# The walk.  Errors are (path relative to the object, message); paths are only built on failure.
# ---------------------------------------------------------------------------------------------------
def _nest(errors: _Errors | None, prefix: str, inner: _Errors) -> _Errors:
    if errors is None:
        errors = []
    for path, message in inner:
        errors.append((f"{prefix}.{path}" if path else prefix, message))
    return errors


def _add(errors: _Errors | None, path: str, message: str) -> _Errors:
    if errors is None:
        errors = []
    errors.append((path, message))
    return errors


def _walk_resource(value: dict[str, Any], strict: bool) -> _Errors | None:
    if "resourceType" in value:
        resource_type = value["resourceType"]
        node = _resource_node(resource_type)
        if node is None:
            return [("", f"unknown resourceType {_show(resource_type)}")]
        if strict and node.abstract:
            return [("", f"resourceType {_show(resource_type)} is abstract")]
    elif strict:
        return [("", "resourceType missing")]
    else:
        node = _node(_Resource)  # what fhir.resources validates a resource without resourceType as
    return _walk(node, value, strict)


def _odd_key(node: _Node, obj: dict[str, Any], key: Any, value: Any, strict: bool) -> tuple[_Field | None, str | None]:
    """A key that is not a JSON element name: a Python field name, resourceType, or an unknown key."""
    field = node.by_name.get(key)
    if field is not None:
        if strict:
            return None, f"{_show(key)} is not a FHIR JSON name (use {field.alias!r})"
        if field.alias in obj:
            return None, f"{_show(key)} given together with {field.alias!r}"
        return field, None
    if key == "resourceType" or key == "resource_type":
        if strict:
            if key == "resource_type" or not node.is_resource:
                return None, f"unknown element {_show(key)}"
            return None, None if value == node.rtype else f"resourceType {_show(value)} is not {node.rtype!r}"
        if key == "resource_type" and "resourceType" in obj:
            return None, None  # fhir.resources lets resourceType override it
        if value is not None and value != node.rtype:
            return None, f"{key} {_show(value)} is not {node.rtype!r}"
        return None, None
    return None, f"unknown element {_show(key)}"


def _complex_items(field: _Field, key: str, value: list[Any], strict: bool, errors: _Errors | None) -> _Errors | None:
    """Check each item of a list of complex elements (or, without a node, of contained resources)."""
    child = field.node
    for index, item in enumerate(value):
        if type(item) is dict:
            inner = _walk(child, item, strict) if child is not None else _walk_resource(item, strict)
            if inner:
                errors = _nest(errors, f"{key}[{index}]", inner)
        else:
            message = _odd_item(field, item, strict)
            if message is not None:
                errors = _add(errors, f"{key}[{index}]", message)
    return errors


def _primitive_items(field: _Field, key: str, value: list[Any], strict: bool, errors: _Errors | None) -> _Errors | None:
    """Check each item of a list of primitives (shared by the fast path and the general path)."""
    check = field.strict if strict else field.lax
    for index, item in enumerate(value):
        if item is None:
            message = None if field.null_items else field.item_verdict(item)
        else:
            message = check(item)
            if message is _DEFER:
                message = field.item_verdict(item)
        if message is not None:
            errors = _add(errors, f"{key}[{index}]", message)
    return errors


def _walk(node: _Node, obj: dict[str, Any], strict: bool) -> _Errors | None:
    """The problems of one JSON object against its node (None when there are none).

    The loop first tries the fast acceptance of the most common shapes (a non-empty ASCII or
    encodable string, an object, a non-empty array of objects or primitives) and falls through to
    :func:`_general` for everything else: null, choice elements, odd types, errors, fhir_json rules.
    """
    errors: _Errors | None = None
    fields = node.fields
    counts: list[int] | None = None
    for key, value in obj.items():
        field = fields.get(key)
        if field is not None:
            op = field.op
            if op == _OP_STRING:
                if type(value) is str:
                    if value.isascii():
                        if value.strip("\x0b\x0c"):
                            continue
                    elif value.strip(_ODD_WHITE_SPACE):
                        try:
                            value.encode("utf-8")
                        except UnicodeEncodeError:
                            pass
                        else:
                            continue
            elif op == _OP_CODE:
                if type(value) is str:
                    if value.isascii():
                        # printable ASCII without spaces is a code; anything else asks the pattern
                        if (value and value.isprintable() and " " not in value) or _CODE_MATCH(value):
                            continue
                    elif _CODE_MATCH(value) and _encodable(value):
                        continue
            elif op == _OP_URI:
                if type(value) is str and value and (value.isascii() or _encodable(value)):
                    continue
            elif op == _OP_OBJECT:
                child = field.node
                if type(value) is dict and child is not None:
                    inner = _walk(child, value, strict)
                    if inner:
                        errors = _nest(errors, key, inner)
                    continue
            elif op == _OP_OBJECTS:
                child = field.node
                if type(value) is list and value and child is not None:
                    for item in value:  # the usual case, all objects and valid, without a call per list
                        if type(item) is not dict or _walk(child, item, strict):
                            # something to report: the whole list again, item by item, with the paths
                            errors = _complex_items(field, key, value, strict, errors)
                            break
                    continue
            elif op == _OP_PRIMITIVE:
                if (field.strict if strict else field.lax)(value) is None:
                    continue
            elif op == _OP_PRIMITIVES and type(value) is list and value:
                errors = _primitive_items(field, key, value, strict, errors)
                continue
        errors, counts = _general(node, obj, key, value, field, strict, errors, counts)
    if node.post or strict:
        errors = _post(node, obj, strict, errors, counts)
    return errors


def _odd_item(field: _Field, item: Any, strict: bool) -> str | None:
    """The problem of an array item of a complex type that is not a JSON object."""
    if item is None:
        return None if field.null_items else "null is not allowed in this array"
    if strict:
        return f"expected a JSON object, got {type(item).__name__}"
    return field.item_verdict(item)


def _general(
    node: _Node,
    obj: dict[str, Any],
    key: str,
    value: Any,
    field: _Field | None,
    strict: bool,
    errors: _Errors | None,
    counts: list[int] | None,
) -> tuple[_Errors | None, list[int] | None]:
    """Everything :func:`_walk` does not accept at first sight, decided in full."""
    if field is None:
        field, message = _odd_key(node, obj, key, value, strict)
        if message is not None:
            errors = _add(errors, key, message)
        if field is None:
            return errors, counts
    if value is None:
        if strict:
            errors = _add(errors, key, "null is not allowed")
        elif not field.optional:
            message = field.field_verdict(None)
            if message is not None:
                errors = _add(errors, key, message)
        return errors, counts
    if field.choice >= 0:
        if counts is None:
            counts = [0] * len(node.choices)
        counts[field.choice] += 1
    kind = field.kind
    if field.many:
        if type(value) is not list:
            if strict:
                errors = _add(errors, key, f"expected a JSON array, got {type(value).__name__}")
            else:
                message = field.field_verdict(value)
                if message is not None:
                    errors = _add(errors, key, message)
        elif not value:
            if strict:
                errors = _add(errors, key, "empty array")
        elif kind == _PRIMITIVE:
            errors = _primitive_items(field, key, value, strict, errors)
        else:
            errors = _complex_items(field, key, value, strict, errors)
    elif kind == _PRIMITIVE:
        message = (field.strict if strict else field.lax)(value)
        if message is _DEFER:
            message = field.item_verdict(value)
        if message is not None:
            errors = _add(errors, key, message)
    elif type(value) is dict:
        child = field.node
        inner = _walk(child, value, strict) if child is not None else _walk_resource(value, strict)
        if inner:
            errors = _nest(errors, key, inner)
    elif strict:
        errors = _add(errors, key, f"expected a JSON object, got {type(value).__name__}")
    else:
        message = field.item_verdict(value)
        if message is not None:
            errors = _add(errors, key, message)
    return errors, counts


def _post(
    node: _Node, obj: dict[str, Any], strict: bool, errors: _Errors | None, counts: list[int] | None
) -> _Errors | None:
    """Object-level rules: required elements, choice groups, primitive extensions, empty objects."""
    for field in node.required:
        if field.alias not in obj and field.name not in obj:
            errors = _add(errors, field.alias, "required element missing")
    for field, ext in node.required_primitives:
        if obj.get(field.alias) is None:
            message = _required_primitive(node, obj, field, ext)
            if message is not None:
                errors = _add(errors, field.alias, message)
    if counts is not None or node.required_choice:
        for index, choice in enumerate(node.choices):
            count = counts[index] if counts is not None else 0
            if count > 1:
                errors = _add(errors, f"{choice.name}[x]", f"only one of {choice.name}[x] is allowed")
            elif count == 0 and choice.required:
                errors = _add(errors, f"{choice.name}[x]", f"{choice.name}[x] is required")
    if node.needs_content and all(obj.get(k) is None for k in ("id", "extension", "fhir_comments")):
        errors = _add(errors, "", "a primitive's extension element needs an id or extensions")
    if strict and not obj:
        errors = _add(errors, "", "empty object")
    return errors


def _required_primitive(node: _Node, obj: dict[str, Any], field: _Field, ext: _Field | None) -> str | None:
    """A required primitive needs a value, or a ``_field`` carrying extensions (data-absent-reason)."""
    value = obj[field.alias] if field.alias in obj else obj.get(field.name)
    if value is not None:
        return None
    extension = None
    if ext is not None:
        extension = obj[ext.alias] if ext.alias in obj else obj.get(ext.name)
    if extension is None:
        return "required element missing"
    if type(extension) is dict:
        items = extension.get("extension")
        if type(items) is list or items is None:
            return None if items else "required element missing (its extension element has no extension)"
    elif type(extension) is list:
        return "a required primitive array cannot be replaced by its extension array"
    return _model_verdict(node.model, obj)  # anything odder: ask the model


def _dotted(loc: tuple[int | str, ...]) -> str:
    text = ""
    for part in loc:
        text += f"[{part}]" if isinstance(part, int) else (f".{part}" if text else str(part))
    return text


def _root(resource: Any) -> tuple[str, _Node | None, _Errors | None]:
    if type(resource) is not dict:
        return "", None, [("", f"a resource must be a JSON object, got {type(resource).__name__}")]
    resource_type = resource.get("resourceType")
    if resource_type is None:
        return "", None, [("", "resourceType missing")]
    node = _resource_node(resource_type)
    if node is None:
        return "", None, [("", f"unknown resourceType {_show(resource_type)}")]
    return node.rtype, node, None


def _errors(resource: dict[str, Any], fhir_json: bool) -> list[tuple[str, str]]:
    root, node, errors = _root(resource)
    if node is None:
        return errors or []
    if fhir_json and node.abstract:
        return [(root, f"resourceType {root!r} is abstract")]
    found = _walk(node, resource, fhir_json)
    if not found:
        return []
    return [(f"{root}.{path}" if path else root, message) for path, message in found]


# ---------------------------------------------------------------------------------------------------
# Public API
# ---------------------------------------------------------------------------------------------------
def problems(resource: dict[str, Any], *, fhir_json: bool = False) -> list[str]:
    """Every structural problem of ``resource`` as ``"<FHIRPath>: <message>"``; empty when valid.

    The verdict (empty or not) is the R4B models' verdict (:func:`check_with_models`); with
    ``fhir_json=True`` FHIR JSON rules the R4B models do not enforce are checked as well.
    """
    return [f"{path}: {message}" if path else message for path, message in _errors(resource, fhir_json)]


def check(resource: dict[str, Any], *, fhir_json: bool = False) -> None:
    """Raise :class:`~gateway.errors.ProfileViolation` naming the first problem of ``resource``."""
    found = _errors(resource, fhir_json)
    if found:
        path, message = found[0]
        more = f" (and {len(found) - 1} more problem{'s' if len(found) > 2 else ''})" if len(found) > 1 else ""
        raise ProfileViolation(f"invalid FHIR resource: {message}{more}", where=Where(path=path))


def check_with_models(resource: dict[str, Any]) -> list[str]:
    """The R4B models' own verdict (slow, exact): error strings, empty when valid.

    The model is the one fhir.resources dispatches ``resourceType`` to for contained resources.
    """
    root, node, errors = _root(resource)
    if node is None:
        return [message for _, message in errors or []]
    try:
        node.model.model_validate(resource)
    except ValidationError as exc:
        return [f"{root}.{loc}: {message}" if loc else f"{root}: {message}" for loc, message in _error_lines(exc)]
    except Exception as exc:  # fhir.resources lets TypeError, KeyError, AttributeError... through
        return [f"{root}: {type(exc).__name__}: {_show(str(exc))}"]
    return []


def droppable(resource_type: str, keys: Any) -> bool:
    """Whether removing these top-level elements from a valid resource leaves it valid.

    True when none is required (directly, as a required primitive, or as the only member of a
    required choice group); lets a redaction drop optional elements without validating again.
    """
    node = _resource_node(resource_type)
    if node is None:
        return False
    dropped = set(keys)
    required = {f.alias for f in node.required} | {f.alias for f, _ in node.required_primitives}
    if required & dropped:
        return False
    return not any(f.choice >= 0 and node.choices[f.choice].required for a, f in node.fields.items() if a in dropped)
