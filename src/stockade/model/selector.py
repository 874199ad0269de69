"""Label selectors (metav1.LabelSelector) and their matching."""

from __future__ import annotations

from dataclasses import dataclass, field

from stockade.model.labels import EMPTY, Labels

IN = "In"
NOT_IN = "NotIn"
EXISTS = "Exists"
DOES_NOT_EXIST = "DoesNotExist"
OPERATORS = (IN, NOT_IN, EXISTS, DOES_NOT_EXIST)


@dataclass(frozen=True)
class Requirement:
    key: str
    operator: str
    values: tuple[str, ...] = ()

    def matches(self, labels: Labels) -> bool:
        if self.operator == IN:
            return self.key in labels and labels[self.key] in self.values
        if self.operator == NOT_IN:
            return self.key not in labels or labels[self.key] not in self.values
        if self.operator == EXISTS:
            return self.key in labels
        if self.operator == DOES_NOT_EXIST:
            return self.key not in labels
        # An unknown operator never validates; should one reach here, it selects nothing.
        return False

    def render(self) -> str:
        if self.operator == EXISTS:
            return self.key
        if self.operator == DOES_NOT_EXIST:
            return f"!{self.key}"
        op = "in" if self.operator == IN else "notin"
        return f"{self.key} {op} ({','.join(self.values)})"


@dataclass(frozen=True)
class Selector:
    """A label selector; the empty selector matches everything."""

    match_labels: Labels = field(default=EMPTY)
    match_expressions: tuple[Requirement, ...] = ()

    @property
    def is_empty(self) -> bool:
        return not self.match_labels and not self.match_expressions

    def matches(self, labels: Labels) -> bool:
        for k, v in self.match_labels.items_tuple():
            if labels.get(k) != v:
                return False
        return all(r.matches(labels) for r in self.match_expressions)

    def requirements(self) -> tuple[Requirement, ...]:
        """matchLabels and matchExpressions as one list of requirements (AND)."""
        return tuple(
            Requirement(k, IN, (v,)) for k, v in self.match_labels.items_tuple()
        ) + self.match_expressions

    def render(self) -> str:
        if self.is_empty:
            return "{}"
        return ",".join(r.render() if r.operator != IN or len(r.values) != 1
                        else f"{r.key}={r.values[0]}" for r in self.requirements())


ALL = Selector()
