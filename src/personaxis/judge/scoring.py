"""From a judge's next-token distribution to a score or a label.

The judge is asked for an integer. Instead of sampling one and parsing it (noisy, and blind to how sure the judge is),
we read the probability `p(k)` that its answer is the integer `k`, and report the expected value
``Σ k·p(k) / Σ p(k)``. When the numeric mass ``Σ p(k)`` is small the judge is mostly saying something else (a refusal,
"REFUSAL", prose): the score is then *undefined* (`None`), never a made-up number, and callers count it.
Classification uses the same distribution over the option numbers ``0..k-1`` and takes the most likely one.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

MIN_MASS = 0.25


@dataclass(frozen=True)
class Distribution:
    """What a backend read from the judge for one prompt.

    `probs` maps each integer answer ``0..hi`` to its probability under the judge (not renormalized, so its sum is the
    numeric mass). `error` is set, and `probs` empty, when the backend got no answer at all (after its retries).
    """

    probs: Mapping[int, float] = field(default_factory=dict)
    raw: str | None = None
    error: str | None = None

    @property
    def mass(self) -> float:
        return float(sum(self.probs.values()))


@dataclass(frozen=True)
class ScoreResult:
    """A 0–100 judgement. `value` is None when undefined (numeric mass below the threshold) or failed (`error`)."""

    value: float | None
    numeric_mass: float
    raw: str | None = None
    error: str | None = None

    @property
    def failed(self) -> bool:
        return self.error is not None


@dataclass(frozen=True)
class ClassifyResult:
    """A choice among labels. `label`/`index` are None when the mass on the options is too low or the call failed."""

    label: str | None
    index: int | None
    probs: tuple[float, ...]
    mass: float
    raw: str | None = None
    error: str | None = None

    @property
    def failed(self) -> bool:
        return self.error is not None


def parse_integer(text: str, hi: int = 100) -> int | None:
    """The integer a token's text spells (surrounding whitespace ignored), if it is a canonical one in ``0..hi``.

    Canonical means plain ASCII digits without leading zeros ("7", not "07", "+7", "7.0" or "７").
    """
    s = text.strip()
    if not (s.isascii() and s.isdigit()) or (len(s) > 1 and s[0] == "0"):
        return None
    k = int(s)
    return k if k <= hi else None


def score_from(dist: Distribution, min_mass: float = MIN_MASS) -> ScoreResult:
    """The probability-weighted mean of the integer answers, or None if their mass is below `min_mass`."""
    mass = dist.mass
    if dist.error is not None or mass <= 0 or mass < min_mass:
        return ScoreResult(None, mass, dist.raw, dist.error)
    value = sum(k * p for k, p in dist.probs.items()) / mass
    return ScoreResult(value, mass, dist.raw)


def classify_from(dist: Distribution, labels: Sequence[str], min_mass: float = MIN_MASS) -> ClassifyResult:
    """The most likely of the options ``0..len(labels)-1``, or None if their mass is below `min_mass`."""
    probs = tuple(float(dist.probs.get(i, 0.0)) for i in range(len(labels)))
    mass = sum(probs)
    if dist.error is not None or mass <= 0 or mass < min_mass:
        return ClassifyResult(None, None, probs, mass, dist.raw, dist.error)
    best = max(range(len(labels)), key=probs.__getitem__)
    return ClassifyResult(labels[best], best, probs, mass, dist.raw)
