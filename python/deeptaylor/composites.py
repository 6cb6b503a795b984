"""Composites: which rule each linear layer gets.

A :class:`Composite` resolves, for a given network, one rule per linear node (Dense, Conv2d,
ConvTranspose2d) from, in order of precedence: an explicit per-index rule, a per-name rule, the
``first`` rule (the linear nodes that read the input), the per-type rule, the ``default``. Non-linear layers have fixed relevance behaviour (DESIGN.md §1) and
cannot take a rule. Named composites are registered and can be looked up with :func:`get`.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Callable, Mapping
from types import MappingProxyType
from typing import Any

from .errors import RuleError
from .layers import Conv2d, ConvTranspose2d, Dense, Layer
from .network import Graph
from .rules import AlphaBeta, Epsilon, Flat, Gamma, Rule, WSquare, Z, ZBox, ZPlus

__all__ = [
    "Composite",
    "deep_taylor",
    "deep_taylor_unbounded",
    "training_free",
    "epsilon_plus",
    "epsilon_plus_flat",
    "epsilon_alpha2_beta1",
    "epsilon_alpha2_beta1_flat",
    "epsilon_gamma_box",
    "register",
    "get",
    "names",
]


class Composite:
    """Assigns a relevance rule to every linear node of a network (Dense, Conv2d, ConvTranspose2d),
    and optionally to standalone BatchNorm nodes.

    Parameters
    ----------
    by_index : mapping int -> Rule, optional
        Rules for node indices in topological order (for a :class:`~deeptaylor.Sequential`, layer
        indices; negative indices count from the end). A rule given for a node that takes none is an
        error when resolved.
    first : Rule, optional
        Rule of the first linear layer(s): the linear nodes that read the input through non-linear
        nodes only (for a Sequential, the one that sees the input pixels).
    by_type : mapping layer class -> Rule, optional
        Rules per layer type, e.g. ``{dt.Dense: Epsilon(), dt.Conv2d: ZPlus()}``; subclasses follow
        their base's rule unless given their own. Only layer types that take a rule (Dense, Conv2d,
        ConvTranspose2d, and BatchNorm, which takes an optional one) may appear.
    default : Rule, optional
        Rule of every other linear node. Without one, an unassigned linear node is an error.
        BatchNorm nodes never take ``first`` or ``default``: they pass relevance through unchanged
        (as Zennit) unless ``by_index``, ``by_name`` or ``by_type`` gives them ``Epsilon`` or ``Z``.
    name : str, optional
        A label for printing.
    by_name : mapping str -> Rule, optional
        Rules by node name; a key may be a shell-style pattern (``"layer4.*"``, :mod:`fnmatch`).
        Exact names take precedence over patterns, earlier patterns over later ones.
    first_types : tuple of layer classes, optional
        ``first`` applies only when the first linear node is of one of these types (Zennit's
        ``EpsilonGammaBox`` puts ZBox only on a first *convolution*); otherwise that node gets the
        rule the composite would give it anyway.

    Precedence: ``by_index``, ``by_name``, ``first``, ``by_type``, ``default``. A composite is
    immutable: its mappings are read-only views of copies (:class:`types.MappingProxyType`).
    """

    __slots__ = ("by_index", "first", "by_type", "default", "name", "by_name", "first_types")

    def __init__(self, by_index: Mapping[int, Rule] | None = None, first: Rule | None = None,
                 by_type: Mapping[type, Rule] | None = None, default: Rule | None = None,
                 name: str = "custom", by_name: Mapping[str, Rule] | None = None,
                 first_types: tuple[type, ...] | None = None) -> None:
        by_index = dict(by_index or {})
        by_type = dict(by_type or {})
        by_name = dict(by_name or {})
        for key, rule in by_index.items():
            if isinstance(key, bool) or not isinstance(key, int):
                raise RuleError(f"Composite: by_index keys must be layer indices (int), got {key!r}")
            _check_rule(rule, f"layer index {key}")
        for key, rule in by_name.items():
            if not isinstance(key, str) or not key:
                raise RuleError(f"Composite: by_name keys must be node names or patterns (str), got {key!r}")
            _check_rule(rule, f"node name {key!r}")
        for key, rule in by_type.items():
            if not (isinstance(key, type) and issubclass(key, Layer)):
                raise RuleError(f"Composite: by_type keys must be layer classes, got {key!r}")
            if not (key.linear or key.rule_optional):
                raise RuleError(f"Composite: by_type gives {rule!r} to {key.__name__}, which takes no rule "
                                "(only Dense, Conv2d, ConvTranspose2d and their subclasses do, and BatchNorm "
                                "optionally; the other layers have a fixed relevance behaviour)")
            _check_rule(rule, key.__name__)
            if key.rule_optional:
                _check_optional(rule, key.__name__)
        if first is not None:
            _check_rule(first, "first")
        if default is not None:
            _check_rule(default, "default")
        if first_types is not None:
            first_types = tuple(first_types)
            if not all(isinstance(t, type) and issubclass(t, Layer) for t in first_types):
                raise RuleError(f"Composite: first_types must be layer classes, got {first_types!r}")
        for k, v in (("by_index", MappingProxyType(by_index)), ("first", first),
                     ("by_type", MappingProxyType(by_type)), ("default", default), ("name", name),
                     ("by_name", MappingProxyType(by_name)), ("first_types", first_types)):
            object.__setattr__(self, k, v)

    def __setattr__(self, name: str, value: Any) -> None:
        raise AttributeError("Composite is immutable")

    @classmethod
    def from_mapping(cls, mapping: Mapping[Any, Rule]) -> Composite:
        """Build a composite from ``{index or layer class or node name or "first" or "default": rule}``
        (a string key other than ``"first"``/``"default"`` is a node name or pattern)."""
        by_index: dict[int, Rule] = {}
        by_type: dict[type, Rule] = {}
        by_name: dict[str, Rule] = {}
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
            elif isinstance(key, str) and key:
                by_name[key] = rule
            else:
                raise RuleError(f"composite mapping: unknown key {key!r} (use an int index, a layer class, "
                                "a node name, 'first' or 'default')")
        return cls(by_index=by_index, first=first, by_type=by_type, default=default, name="mapping",
                   by_name=by_name)

    def resolve(self, net: Graph) -> list[Rule | None]:
        """One entry per node of ``net``: the rule of each linear node (and of BatchNorm nodes given
        one), None for the others."""
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
            _check_target(self.name, net, idx, rule)
            explicit[idx] = rule
        names = net.names
        for key, rule in self.by_name.items():
            if key in net._index:
                hits = [net._index[key]]
            elif any(c in key for c in "*?["):
                hits = [i for i, nm in enumerate(names) if fnmatch.fnmatchcase(nm, key)]
            else:
                raise RuleError(f"composite '{self.name}': no node named {key!r} (nodes: "
                                f"{', '.join(names[:20])}{', ...' if len(names) > 20 else ''})")
            exact = key in net._index
            for idx in hits:
                if not exact and not (net[idx].linear or net[idx].rule_optional):
                    continue  # a pattern applies to the nodes that take a rule
                if idx in explicit:
                    continue  # by_index (or an exact name / an earlier pattern) wins
                _check_target(self.name, net, idx, rule)
                explicit[idx] = rule
        first_nodes = set(net.first_linear())
        out: list[Rule | None] = [None] * n
        for idx, node in enumerate(net.nodes):
            layer = node.layer
            if layer.rule_optional:
                rule = explicit.get(idx)
                if rule is None:
                    rule = _by_type(self.by_type, layer)
                out[idx] = rule
                continue
            if not layer.linear:
                continue
            rule = explicit.get(idx)
            if rule is None and self.first is not None and idx in first_nodes and (
                    self.first_types is None or isinstance(layer, self.first_types)):
                rule = self.first
            if rule is None:
                rule = _by_type(self.by_type, layer)
            if rule is None:
                rule = self.default
            if rule is None:
                raise RuleError(f"composite '{self.name}' assigns no rule to {net._where(idx)}")
            out[idx] = rule
        return out

    def __repr__(self) -> str:
        parts = []
        if self.first is not None:
            parts.append(f"first={self.first!r}")
        if self.first_types is not None:
            parts.append("first_types=(" + ", ".join(t.__name__ for t in self.first_types) + ")")
        if self.by_index:
            parts.append(f"by_index={dict(self.by_index)!r}")
        if self.by_name:
            parts.append(f"by_name={dict(self.by_name)!r}")
        if self.by_type:
            parts.append("by_type={" + ", ".join(f"{k.__name__}: {v!r}" for k, v in self.by_type.items()) + "}")
        if self.default is not None:
            parts.append(f"default={self.default!r}")
        return f"Composite[{self.name}]({', '.join(parts)})"


def _check_optional(rule: Rule, where: str) -> None:
    if type(rule) not in (Epsilon, Z):
        raise RuleError(f"Composite: {where} (BatchNorm) takes only Epsilon or Z (a diagonal linear layer), "
                        f"got {rule!r}")


def _check_target(name: str, net: Graph, idx: int, rule: Rule) -> None:
    layer = net[idx]
    if layer.rule_optional:
        _check_optional(rule, net._where(idx))
    elif not layer.linear:
        raise RuleError(f"composite '{name}': rule {rule!r} assigned to {net._where(idx)}, which takes no "
                        "rule (only Dense, Conv2d and ConvTranspose2d do, and BatchNorm optionally)")


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


def training_free(low: Any = 0.0, high: Any = 1.0, first: Rule | None = None) -> Composite:
    """The training-free relevance model (Montavon et al. 2017, Sec. 4.2; slides 003) for deep
    detection-pooling networks with p-norm pooling (:class:`~deeptaylor.LpPool`, e.g. from
    :func:`deeptaylor.relevance_models.training_free_network`): zB(low, high) on the first linear layer
    (or ``first``, e.g. ``WSquare()`` for unbounded inputs), z+ on every linear layer above; every
    pooling layer redistributes in proportion to its inputs, ``R_j = x_j / sum_j' x_j' R_k``. With
    ``b <= 0`` and inputs in the first rule's domain it is exactly conservative and positive at every
    layer (docs/theory.md, "Relevance models")."""
    return Composite(first=ZBox(low, high) if first is None else first, default=ZPlus(), name="training_free")


def epsilon_plus(epsilon: float = 1e-6) -> Composite:
    """As Zennit's ``EpsilonPlus``: z+ on every convolution (with the positive bias in the denominator,
    as Zennit's ZPlus), Epsilon on Dense."""
    return Composite(by_type={Dense: Epsilon(epsilon), Conv2d: ZPlus(use_bias=True),
                              ConvTranspose2d: ZPlus(use_bias=True)}, name="epsilon_plus")


def epsilon_plus_flat(epsilon: float = 1e-6) -> Composite:
    """As Zennit's ``EpsilonPlusFlat``: Flat on the first linear layer, Epsilon on Dense, z+ on
    convolutions (with the positive bias in the denominator, as Zennit's ZPlus)."""
    return Composite(first=Flat(), by_type={Dense: Epsilon(epsilon), Conv2d: ZPlus(use_bias=True),
                                            ConvTranspose2d: ZPlus(use_bias=True)},
                     name="epsilon_plus_flat")


def epsilon_alpha2_beta1(epsilon: float = 1e-6) -> Composite:
    """As Zennit's ``EpsilonAlpha2Beta1``: alpha=2, beta=1 on convolutions, Epsilon on Dense."""
    return Composite(by_type={Dense: Epsilon(epsilon), Conv2d: AlphaBeta(2.0, 1.0),
                              ConvTranspose2d: AlphaBeta(2.0, 1.0)}, name="epsilon_alpha2_beta1")


def epsilon_alpha2_beta1_flat(epsilon: float = 1e-6) -> Composite:
    """As Zennit's ``EpsilonAlpha2Beta1Flat``: Flat on the first linear layer, alpha=2, beta=1 on
    convolutions, Epsilon on Dense."""
    return Composite(first=Flat(), by_type={Dense: Epsilon(epsilon), Conv2d: AlphaBeta(2.0, 1.0),
                                            ConvTranspose2d: AlphaBeta(2.0, 1.0)},
                     name="epsilon_alpha2_beta1_flat")


def epsilon_gamma_box(low: Any = 0.0, high: Any = 1.0, epsilon: float = 1e-6, gamma: float = 0.25) -> Composite:
    """As Zennit's ``EpsilonGammaBox``: zB on the first linear layer *if it is a convolution* (Zennit's
    first map holds only convolutions: a Dense first layer gets Epsilon like every Dense), Gamma on
    convolutions, Epsilon on Dense."""
    return Composite(first=ZBox(low, high), first_types=(Conv2d, ConvTranspose2d),
                     by_type={Dense: Epsilon(epsilon), Conv2d: Gamma(gamma), ConvTranspose2d: Gamma(gamma)},
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
    from .methods import Gradient, GradientXInput, Sensitivity

    register("deep_taylor", deep_taylor)
    register("deep_taylor_unbounded", deep_taylor_unbounded)
    register("training_free", training_free)
    register("epsilon_plus", epsilon_plus)
    register("epsilon_plus_flat", epsilon_plus_flat)
    register("epsilon_alpha2_beta1", epsilon_alpha2_beta1)
    register("epsilon_alpha2_beta1_flat", epsilon_alpha2_beta1_flat)
    register("epsilon_gamma_box", epsilon_gamma_box)
    register("sensitivity", Sensitivity)
    register("gradient_x_input", GradientXInput)
    register("gradient", Gradient)


_register_builtins()
