"""The shaping registry: what each shaping promises (``ShapingInfo``), its entry (``ShapingSpec``), and the
``register`` decorator that puts an advantage function into ``REGISTRY`` next to its own definition.

Flags default to the common case (a baselined pass@1-style shaping on real rewards that ignores k and p_hat), so an
entry states only where it differs.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, Callable, Mapping

import torch

__all__ = ["ShapingInfo", "ShapingSpec", "REGISTRY", "register", "get", "info", "names", "resolve"]


@dataclass(frozen=True)
class ShapingInfo:
    """What a shaping promises.

    Attributes:
        name: registry name.
        objective_formula: F(p) for 0/1 rewards in the population limit (text).
        advantage_formula: mean-convention advantage formula (text).
        paper: source.
        doc: one-paragraph description, including bias statements.
        unbiased: E[(1/n) sum A_i grad log pi] = grad F exactly for every admissible n, with nothing
            but the group itself (no external p_hat needed).
        continuous_ok: accepts non-binary rewards (``reward_domain`` says which).
        reward_domain: "binary" (0/1 only), "unit" (values in [0, 1]; p_hat = mean reward) or "real".
        uses_k: whether ``k`` changes the result (pass@1 shapings ignore it).
        uses_p_hat: plug-in shaping; ``p_hat`` (G,) replaces the group estimate when given.
        baselined: all-equal groups get zero advantages (for pkpo_loo: the default 'centred' variant).
        min_k: smallest admissible k.
        needs_k_le_n / needs_k_le_n_minus_1: combinatorial limit on k given the group size n.
        uses_k_weights: the Ks come from a ``weights`` {k: w} parameter (k itself must be 1 or max(weights)).
    """

    name: str
    objective_formula: str
    advantage_formula: str
    paper: str
    doc: str
    unbiased: bool = False
    continuous_ok: bool = True
    reward_domain: str = "real"
    uses_k: bool = False
    uses_p_hat: bool = False
    baselined: bool = True
    min_k: int = 1
    needs_k_le_n: bool = False
    needs_k_le_n_minus_1: bool = False
    uses_k_weights: bool = False

    def check_k(self, n: int, k: int) -> None:
        """Raise ValueError when (n, k) is outside what this shaping can take."""
        k_eff = k if self.uses_k else 1
        if k_eff < self.min_k:
            raise ValueError(f"shaping {self.name!r} needs k >= {self.min_k}, got k={k}")
        if self.needs_k_le_n_minus_1 and k_eff > n - 1:
            raise ValueError(
                f"shaping {self.name!r} needs k <= n-1 (a leave-one-out baseline), got k={k_eff}, n={n}"
            )
        if self.needs_k_le_n and k_eff > n:
            raise ValueError(f"shaping {self.name!r} needs k <= n, got k={k_eff}, n={n}")


@dataclass(frozen=True)
class ShapingSpec:
    """Registry entry: the advantage function, its declared objective F and F', and metadata."""

    info: ShapingInfo
    advantages: Callable[..., torch.Tensor]
    objective: Callable[..., torch.Tensor]
    derivative: Callable[..., torch.Tensor]
    defaults: Mapping[str, Any] = field(default_factory=dict)
    check: Callable[..., None] | None = None  # extra (n, k, params) validation; default info.check_k
    # Whether all-equal groups get zero advantages under these params (then shape() zeroes them
    # exactly, removing round-off); default info.baselined.
    zero_on_constant: Callable[[Mapping[str, Any]], bool] | None = None
    # Plug-ins: the interval of p an n-sample group can express for this shaping's statistic, (n, k) -> (lo, hi);
    # an outside p_hat is clipped into it by default (``p_clip="group"``, see ``api._clip_p_hat``).
    p_range: Callable[[int, int], tuple[float, float]] | None = None
    # Plug-ins whose scale can exceed the group form's bound even inside p_range (Chen's 1/sigma(P_K)): a floor on
    # that scale's denominator, (n, k, params) -> float, applied with p_clip="group" (see passk_analytic).
    sigma_floor: Callable[..., float] | None = None

    def check_params(self, n: int, k: int, opts: Mapping[str, Any]) -> None:
        (self.check or (lambda n_, k_, o: self.info.check_k(n_, k_)))(n, k, opts)


_REGISTRY: dict[str, ShapingSpec] = {}
REGISTRY: Mapping[str, ShapingSpec] = MappingProxyType(_REGISTRY)

_SPEC_KEYS = ("objective", "derivative", "defaults", "check", "zero_on_constant", "p_range", "sigma_floor")


def register(name: str, **kw: Any) -> Callable[[Callable[..., torch.Tensor]], Callable[..., torch.Tensor]]:
    """Decorator: register the advantage function below it as shaping ``name``.

    Keyword arguments are ``ShapingSpec`` fields (objective, derivative, defaults, check, zero_on_constant, p_range,
    sigma_floor) and ``ShapingInfo`` fields (formulas, paper, doc, and the flags that differ from their defaults).
    """
    if name in _REGISTRY:
        raise ValueError(f"shaping {name!r} is registered twice")
    spec_kw = {key: kw.pop(key) for key in _SPEC_KEYS if key in kw}
    if "defaults" in spec_kw:
        spec_kw["defaults"] = MappingProxyType(dict(spec_kw["defaults"]))
    meta = ShapingInfo(name=name, **kw)

    def deco(fn: Callable[..., torch.Tensor]) -> Callable[..., torch.Tensor]:
        _REGISTRY[name] = ShapingSpec(info=meta, advantages=fn, **spec_kw)
        return fn

    return deco


def names() -> tuple[str, ...]:
    return tuple(_REGISTRY)


def get(name: str) -> ShapingSpec:
    try:
        return _REGISTRY[name]
    except (KeyError, TypeError):
        raise ValueError(f"unknown shaping {name!r}; known shapings: {', '.join(_REGISTRY)}") from None


def info(name: str) -> ShapingInfo:
    """Metadata of shaping ``name`` (raises ValueError listing the known names)."""
    return get(name).info


def resolve(spec: ShapingSpec, params: Mapping[str, Any]) -> dict[str, Any]:
    """The spec's defaults overridden by ``params``; unknown parameter names raise ValueError naming the allowed."""
    unknown = sorted(set(params) - set(spec.defaults))
    if unknown:
        allowed = ", ".join(sorted(spec.defaults)) or "none"
        raise ValueError(f"shaping {spec.info.name!r} got unknown parameter(s) {unknown}; allowed: {allowed}")
    return {**spec.defaults, **params}
