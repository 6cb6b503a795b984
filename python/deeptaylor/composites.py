"""Composites: which rule each linear layer gets.

A :class:`Composite` resolves, for a given network, one rule per linear layer (Dense, Conv2d) from,
in order of precedence: an explicit per-index rule, the ``first`` rule (the first linear layer), the
per-type rule, the ``default``. Non-linear layers have fixed relevance behaviour (DESIGN.md §1) and
cannot take a rule. Named composites are registered and can be looked up with :func:`get`.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from types import MappingProxyType
from typing import Any

from .errors import RuleError
from .layers import Conv2d, Dense, Layer
from .network import Sequential
from .rules import Epsilon, Flat, Gamma, Rule, WSquare, ZBox, ZPlus

__all__ = [
    "Composite",
    "deep_taylor",
    "deep_taylor_unbounded",
    "epsilon_plus_flat",
    "epsilon_gamma_box",
    "register",
    "get",
    "names",
]


class Composite:
    """Assigns a relevance rule to every linear layer of a network.

    Parameters
    ----------
    by_index : mapping int -> Rule, optional
        Rules for layer indices of the :class:`~deeptaylor.Sequential` (negative indices count from
        the end). A rule given for a non-linear layer is an error when resolved.
    first : Rule, optional
        Rule of the first linear layer (the one that sees the input pixels).
    by_type : mapping layer class -> Rule, optional
        Rules per layer type, e.g. ``{dt.Dense: Epsilon(), dt.Conv2d: ZPlus()}``; subclasses follow
        their base's rule unless given their own. Only linear layer types (Dense, Conv2d and their
        subclasses) take a rule: any other type is a :class:`~deeptaylor.errors.RuleError` here.
    default : Rule, optional
        Rule of every other linear layer. Without one, an unassigned linear layer is an error.
    name : str, optional
        A label for printing.

    A composite is immutable: ``by_index`` and ``by_type`` are read-only views of copies of the
    mappings given (:class:`types.MappingProxyType`), so neither editing them nor editing the
    caller's dicts afterwards changes the composite.
    """

    __slots__ = ("by_index", "first", "by_type", "default", "name")

    def __init__(self, by_index: Mapping[int, Rule] | None = None, first: Rule | None = None,
                 by_type: Mapping[type, Rule] | None = None, default: Rule | None = None,
                 name: str = "custom") -> None:
        by_index = dict(by_index or {})
        by_type = dict(by_type or {})
        for key, rule in by_index.items():
            if isinstance(key, bool) or not isinstance(key, int):
                raise RuleError(f"Composite: by_index keys must be layer indices (int), got {key!r}")
            _check_rule(rule, f"layer index {key}")
        for key, rule in by_type.items():
            if not (isinstance(key, type) and issubclass(key, Layer)):
                raise RuleError(f"Composite: by_type keys must be layer classes, got {key!r}")
            if not key.linear:
                raise RuleError(f"Composite: by_type gives {rule!r} to {key.__name__}, which takes no rule "
                                "(only Dense and Conv2d and their subclasses do; the other layers have a "
                                "fixed relevance behaviour)")
            _check_rule(rule, key.__name__)
        if first is not None:
            _check_rule(first, "first")
        if default is not None:
            _check_rule(default, "default")
        for k, v in (("by_index", MappingProxyType(by_index)), ("first", first),
                     ("by_type", MappingProxyType(by_type)), ("default", default), ("name", name)):
            object.__setattr__(self, k, v)

    def __setattr__(self, name: str, value: Any) -> None:
        raise AttributeError("Composite is immutable")

    @classmethod
    def from_mapping(cls, mapping: Mapping[Any, Rule]) -> Composite:
        """Build a composite from ``{index or layer class or "first" or "default": rule}``."""
        by_index: dict[int, Rule] = {}
        by_type: dict[type, Rule] = {}
        first = default = None
        for key, rule in mapping.items():
            if key == "first":
                first = rule
            elif key == "default":
                default = rule
            elif isinstance(key, type):
                by_type[key] = rule
            elif isinstance(key, int) and not isinstance(key, bool):
                by_index[key] = rule
            else:
                raise RuleError(f"composite mapping: unknown key {key!r} (use an int index, a layer class, "
                                "'first' or 'default')")
        return cls(by_index=by_index, first=first, by_type=by_type, default=default, name="mapping")

    def resolve(self, net: Sequential) -> list[Rule | None]:
        """One entry per layer of ``net``: the rule of each linear layer, None for the others."""
        n = len(net)
        explicit: dict[int, Rule] = {}
        for key, rule in self.by_index.items():
            idx = key + n if key < 0 else key
            if not 0 <= idx < n:
                raise RuleError(f"composite '{self.name}': layer index {key} out of range for a "
                                f"network of {n} layers")
            if idx in explicit:
                raise RuleError(f"composite '{self.name}': layer {idx} is given two rules (indices "
                                f"{idx} and {idx - n} name the same layer)")
            if not net[idx].linear:
                raise RuleError(f"composite '{self.name}': rule {rule!r} assigned to layer {idx} "
                                f"({net[idx].kind}), which takes no rule (only Dense and Conv2d do)")
            explicit[idx] = rule
        linear = net.linear_layers()
        out: list[Rule | None] = [None] * n
        for idx in linear:
            layer = net[idx]
            rule = explicit.get(idx)
            if rule is None and self.first is not None and idx == linear[0]:
                rule = self.first
            if rule is None:
                rule = _by_type(self.by_type, layer)
            if rule is None:
                rule = self.default
            if rule is None:
                raise RuleError(f"composite '{self.name}' assigns no rule to layer {idx} ({layer.kind})")
            out[idx] = rule
        return out

    def __repr__(self) -> str:
        parts = []
        if self.first is not None:
            parts.append(f"first={self.first!r}")
        if self.by_index:
            parts.append(f"by_index={dict(self.by_index)!r}")
        if self.by_type:
            parts.append("by_type={" + ", ".join(f"{k.__name__}: {v!r}" for k, v in self.by_type.items()) + "}")
        if self.default is not None:
            parts.append(f"default={self.default!r}")
        return f"Composite[{self.name}]({', '.join(parts)})"


def _check_rule(rule: Any, where: str) -> None:
    if not isinstance(rule, Rule):
        raise RuleError(f"Composite: {where} maps to {rule!r}, which is not a deeptaylor rule")


def _by_type(by_type: Mapping[type, Rule], layer: Layer) -> Rule | None:
    for cls in type(layer).__mro__:
        if cls in by_type:
            return by_type[cls]
    return None


def deep_taylor(low: Any = 0.0, high: Any = 1.0) -> Composite:
    """The DTD recipe for bounded inputs (Montavon et al. 2017): zB(low, high) on the first linear
    layer, z+ on every linear layer above. Conservative and positive for ReLU nets with b <= 0."""
    return Composite(first=ZBox(low, high), default=ZPlus(), name="deep_taylor")


def deep_taylor_unbounded() -> Composite:
    """The DTD recipe for unbounded inputs: w² on the first linear layer, z+ above."""
    return Composite(first=WSquare(), default=ZPlus(), name="deep_taylor_unbounded")


def epsilon_plus_flat(epsilon: float = 1e-6) -> Composite:
    """As Zennit's ``EpsilonPlusFlat``: Flat on the first linear layer, Epsilon on Dense, z+ on Conv2d
    (with the positive bias in the denominator, as Zennit's ZPlus)."""
    return Composite(first=Flat(), by_type={Dense: Epsilon(epsilon), Conv2d: ZPlus(use_bias=True)},
                     name="epsilon_plus_flat")


def epsilon_gamma_box(low: Any = 0.0, high: Any = 1.0, epsilon: float = 1e-6, gamma: float = 0.25) -> Composite:
    """As Zennit's ``EpsilonGammaBox``: zB on the first linear layer, Gamma on Conv2d, Epsilon on Dense."""
    return Composite(first=ZBox(low, high), by_type={Dense: Epsilon(epsilon), Conv2d: Gamma(gamma)},
                     name="epsilon_gamma_box")


_REGISTRY: dict[str, Callable[..., Any]] = {}


def register(name: str, factory: Callable[..., Any]) -> None:
    """Register a composite (or method) factory under ``name`` (``-`` and ``_`` are equivalent)."""
    _REGISTRY[name.replace("-", "_")] = factory


def get(name: str, **kwargs: Any) -> Any:
    """Build the registered composite or method ``name`` (e.g. ``"deep-taylor"``, ``"sensitivity"``)."""
    key = name.replace("-", "_")
    if key not in _REGISTRY:
        raise RuleError(f"unknown composite {name!r}; known: {', '.join(names())}")
    return _REGISTRY[key](**kwargs)


def names() -> list[str]:
    """Names of the registered composites and methods, dash-separated."""
    return sorted(k.replace("_", "-") for k in _REGISTRY)


def _register_builtins() -> None:
    from .methods import GradientXInput, Sensitivity

    register("deep_taylor", deep_taylor)
    register("deep_taylor_unbounded", deep_taylor_unbounded)
    register("epsilon_plus_flat", epsilon_plus_flat)
    register("epsilon_gamma_box", epsilon_gamma_box)
    register("sensitivity", Sensitivity)
    register("gradient_x_input", GradientXInput)


_register_builtins()
