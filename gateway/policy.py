"""The access policy (``mappings/policy.yaml``), validated at load: actor kinds, care team, defaults.

Which recipient is a member of the care team, what each may receive without consent, which
sensitivity codes need an explicit consent, and where a letter goes when its GP is missing are
decisions of law and of each site: they live in data, and this module only reads and checks them.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Literal

from pydantic import BaseModel, ConfigDict, model_validator

from gateway.mappings import Mappings, load_model

__all__ = ["ActorKind", "Category", "Policy", "policy_from"]

Category = Literal["medical", "social", "logistics"]
GROUPS = ("care-team", "outside-care-team")


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class KindCode(_Strict):
    system: str
    code: str | None = None  # None: any code of the system
    prefix: str | None = None  # codes starting with this (e.g. TRE_A02 "G15_10/" for physicians)


class ActorKind(_Strict):
    kind: str
    label: str
    codes: tuple[KindCode, ...] = ()


class WithoutConsent(_Strict):
    care_team: tuple[Category, ...]
    others: tuple[Category, ...]
    by_kind: dict[str, tuple[Category, ...]] = {}

    def for_kind(self, kind: str | None, care_team: bool) -> tuple[Category, ...]:
        if kind in self.by_kind:
            return self.by_kind[kind]
        return self.care_team if care_team else self.others


class Fallback(_Strict):
    recipient: str | None = None
    when: tuple[Literal["no-gp", "unresolved", "unreachable"], ...] = ()


class Policy(_Strict):
    actor_kind_system: str
    actor_kinds: tuple[ActorKind, ...]
    care_team: tuple[str, ...]
    without_consent: WithoutConsent
    sensitive: tuple[str, ...]
    fallback: Fallback

    @model_validator(mode="after")
    def _known_kinds(self) -> Policy:
        kinds = {k.kind for k in self.actor_kinds}
        unknown = (set(self.care_team) | set(self.without_consent.by_kind)) - kinds
        if unknown:
            raise ValueError(f"care_team names unknown kinds {sorted(unknown)}")
        return self

    def kind_of(self, codings: Iterable[tuple[str, str]]) -> str | None:
        """The actor kind of a set of (system, code) pairs: the first policy rule that matches wins."""
        pairs = list(codings)
        for kind in self.actor_kinds:
            for rule in kind.codes:
                for system, code in pairs:
                    if system != rule.system:
                        continue
                    if rule.prefix is not None:
                        if code.startswith(rule.prefix):
                            return kind.kind
                    elif rule.code in (None, code):
                        return kind.kind
        for system, code in pairs:
            if system == self.actor_kind_system and code in {k.kind for k in self.actor_kinds}:
                return code
        return None

    def in_care_team(self, kind: str | None) -> bool:
        return kind in self.care_team

    def label(self, kind: str | None) -> str:
        return next((k.label for k in self.actor_kinds if k.kind == kind), kind or "inconnu")

    def matches_group(self, group: str, kind: str | None) -> bool:
        """Whether a consent's actor role (a kind or a group) designates this recipient kind."""
        if group == "care-team":
            return self.in_care_team(kind)
        if group == "outside-care-team":
            return not self.in_care_team(kind)
        return group == kind


def policy_from(mappings: Mappings) -> Policy:
    """The validated policy of a mapping set (MappingLoadError when missing or broken)."""
    return load_model(mappings, "policy.yaml", Policy)
