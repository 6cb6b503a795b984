"""The check every backend runs at Explainer construction: refuse, by exact type, what it cannot run."""

from __future__ import annotations

from collections.abc import Collection

from ..errors import UnsupportedError
from ..methods import Method
from ..network import Graph
from ..rules import Rule


def refuse_unsupported(backend: str, net: Graph, assignment: list[Rule | None] | Method,
                       layers: Collection[type], rules: Collection[type], methods: Collection[type]) -> None:
    """Raise :class:`~deeptaylor.errors.UnsupportedError` naming the layer index, the layer type and
    the rule (or the method) unless every layer, rule and method is one of the given types *exactly*.

    Types are matched exactly, not with ``isinstance``: a backend dispatches on the built-in classes
    and cannot know what a subclass (say of ZPlus, or of ReLU) changes, so running it as its base
    would silently compute something else.
    """
    if isinstance(assignment, Method):
        if type(assignment) not in methods:
            raise UnsupportedError(
                f"backend '{backend}' does not support the method {assignment.name} (it runs "
                f"{', '.join(sorted(m.__name__ for m in methods))}; subclasses are not dispatched)")
        per_layer: list[Rule | None] = [None] * len(net)
    else:
        per_layer = assignment
    for i, (layer, rule) in enumerate(zip(net, per_layer, strict=True)):
        where = net._where(i)
        if type(layer) not in layers:
            raise UnsupportedError(
                f"backend '{backend}' does not support {where}: it runs the built-in "
                f"layers {', '.join(sorted(t.__name__ for t in layers))} (matched by exact type; "
                "subclasses are not dispatched)")
        if rule is not None and type(rule) not in rules:
            raise UnsupportedError(
                f"backend '{backend}' does not support rule {rule!r} on {where}: it runs "
                f"the built-in rules {', '.join(sorted(t.__name__ for t in rules))} (matched by exact "
                "type; subclasses are not dispatched)")
