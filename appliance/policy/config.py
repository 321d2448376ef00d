"""Policy configuration: the ``[[rules]]`` and ``[masking]`` parts of botwarden.toml (pure)."""

from __future__ import annotations

from dataclasses import dataclass

from appliance.errors import ConfigKeyError
from typing import Literal


@dataclass(frozen=True)
class Rule:
    name: str
    action: Literal["allow", "block", "approve", "mask"]
    description: str = ""
    targets: tuple[str, ...] = ()  # empty = every target
    identities: tuple[str, ...] = ()  # empty = every identity
    groups: tuple[str, ...] = ()


@dataclass(frozen=True)
class MaskingSettings:
    salt_file: str | None = None


@dataclass(frozen=True)
class PolicyConfig:
    rules: tuple[Rule, ...] = ()
    masking: MaskingSettings = MaskingSettings()

    def cross_check(self, *, target_names: set[str], identity_names: set[str], group_names: set[str]) -> None:
        """References to targets, identities and groups must exist."""
        seen: set[str] = set()
        for i, rule in enumerate(self.rules):
            if rule.name in seen:
                raise ConfigKeyError(("rules", i, "name"), f"duplicate rule name {rule.name!r}")
            seen.add(rule.name)
            for key, known, values in (("targets", target_names, rule.targets),
                                       ("identities", identity_names, rule.identities),
                                       ("groups", group_names, rule.groups)):
                for j, value in enumerate(values):
                    if value not in known:
                        raise ConfigKeyError(("rules", i, key, j), f"unknown {key[:-1] if key != 'identities' else 'identity'} {value!r}")
