"""Persona vectors for one trait (science.md §1, steps 2-5).

For every instruction pair p, extraction question q and sample s there are two rollouts, one under the eliciting
system prompt (pos) and one under the suppressing one (neg), sampled at temperature 1 with a seed of their own. Their
response, prompt and last-prompt-token means are captured while generating (one pass, `run_rollouts`), so nothing is
re-encoded. Both replies are judged for the trait and for coherence, and the pair (p, q, s) is kept only if

    pos trait ≥ pos_min,  neg trait < neg_max,  both coherence ≥ coherence_min,  (pos − neg trait ≥ min_gap),

with every score defined and both replies non-empty. The gap (off by default) is for small judges that rank replies
right but squeeze every score toward the middle of the scale (docs/results/traits.md): with `pos_min=0, neg_max=101`
it keeps the pairs whose eliciting reply the judge ranks clearly above its suppressing twin.

Pairing (rather than filtering each side alone) keeps the two sides balanced over questions and prompts, so the
difference of means measures the trait and not the question mix. The vector at layer i is mean(kept pos response
means) − mean(kept neg response means); the prompt-mean and the last-prompt-token differences of the same pairs are
stored beside it as `<trait>.prompt` and `<trait>.last_prompt`.

Every stage is resumable: rollouts are records in the run store and judgements are cached there, so a rerun after a
kill generates and judges only what is missing.
"""

from __future__ import annotations

import hashlib
from collections import Counter
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

from personaxis.backends.runs import Backend, LocalBackend, Rollout, check_backend, run_rollouts
from personaxis.errors import PersonaxisError
from personaxis.inference.generation import Sampling
from personaxis.inference.means import meta_for
from personaxis.judge import Judge
from personaxis.model.loading import ChatModel
from personaxis.store import Record, RunStore
from personaxis.traits.files import SAMPLES, VECTORS, write_jsonl
from personaxis.traits.judging import JudgeCounts, Judged, judge_replies
from personaxis.traits.library import TraitSpec
from personaxis.vectors import Vectors

STAGE = "trait_rollouts"
CAPTURES = ("response", "prompt", "last_prompt")
POLARITIES = ("pos", "neg")
# Why a pair can be dropped; a pair may have several reasons, and each is counted.
REASONS = ("judge_failed", "undefined_score", "empty_reply", "pos_below", "neg_above", "gap_below", "incoherent")


@dataclass(frozen=True)
class Thresholds:
    """The pair filter: pos trait ≥ pos_min, neg trait < neg_max, both coherence ≥ coherence_min, and (when
    min_gap > 0) pos trait − neg trait ≥ min_gap."""

    pos_min: float = 50.0
    neg_max: float = 50.0
    coherence_min: float = 50.0
    min_gap: float = 0.0


@dataclass(frozen=True)
class ExtractSettings:
    samples: int = 1  # per (pair, question, polarity)
    max_new_tokens: int = 64
    temperature: float = 1.0
    seed: int = 0
    questions: int | None = None  # the first N extraction questions (None: all)
    pairs: int | None = None  # the first N instruction pairs (None: all)
    batch_size: int = 8
    thresholds: Thresholds = field(default_factory=Thresholds)
    min_pairs: int = 5  # fewer kept pairs than this is an error, not a noisy vector

    def __post_init__(self) -> None:
        for name in ("samples", "batch_size", "min_pairs"):
            if getattr(self, name) < 1:
                raise PersonaxisError(f"{name} must be at least 1")
        for name in ("questions", "pairs"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise PersonaxisError(f"{name} must be at least 1")


@dataclass(frozen=True)
class Pair:
    """The two rollouts that share an instruction pair, a question and a sample index."""

    pair: int
    question: int
    sample: int

    def id(self, polarity: str) -> str:
        return f"{polarity}/p{self.pair}/q{self.question}/s{self.sample}"


@dataclass
class Extraction:
    """What `extract_trait` made, and the per-sample rows behind it."""

    vectors: Vectors
    samples: list[dict[str, Any]]
    stats: dict[str, Any]


def sample_seed(seed: int, *parts: object) -> int:
    """A seed per sample from its identity, so subsetting or reordering the plan never changes a sample."""
    text = "/".join(map(str, (seed, *parts)))
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:4], "little") & 0x7FFFFFFF


def plan_pairs(trait: TraitSpec, settings: ExtractSettings) -> list[Pair]:
    n_pairs = min(settings.pairs or len(trait.instructions), len(trait.instructions))
    n_questions = min(settings.questions or len(trait.questions.extraction), len(trait.questions.extraction))
    return [Pair(p, q, s) for p in range(n_pairs) for q in range(n_questions) for s in range(settings.samples)]


def plan_rollouts(trait: TraitSpec, settings: ExtractSettings) -> list[Rollout]:
    """Both polarities of every pair, interleaved so an interrupted run has both sides of what it finished."""
    out = []
    for pair in plan_pairs(trait, settings):
        instruction = trait.instructions[pair.pair]
        question = trait.questions.extraction[pair.question]
        for polarity in POLARITIES:
            system = instruction.pos if polarity == "pos" else instruction.neg
            sampling = Sampling(
                max_new_tokens=settings.max_new_tokens,
                temperature=settings.temperature,
                seed=sample_seed(settings.seed, trait.name, polarity, pair.pair, pair.question, pair.sample),
            )
            out.append(
                Rollout.make(
                    pair.id(polarity),
                    [{"role": "system", "content": system}, {"role": "user", "content": question}],
                    sampling,
                    polarity=polarity,
                    pair=pair.pair,
                    question=pair.question,
                    sample=pair.sample,
                )
            )
    return out


def pair_reasons(pos: Judged, neg: Judged, pos_empty: bool, neg_empty: bool, th: Thresholds) -> list[str]:
    """Why the pair must be dropped (empty: keep it). Comparisons are made only on defined scores."""
    reasons = []
    scores = (pos.trait, neg.trait, pos.coherence, neg.coherence)
    if any(s.failed for s in scores):
        reasons.append("judge_failed")
    if any(s.value is None and not s.failed for s in scores):
        reasons.append("undefined_score")
    if pos_empty or neg_empty:
        reasons.append("empty_reply")
    if pos.trait.value is not None and pos.trait.value < th.pos_min:
        reasons.append("pos_below")
    if neg.trait.value is not None and neg.trait.value >= th.neg_max:
        reasons.append("neg_above")
    if (
        th.min_gap > 0
        and None not in (pos.trait.value, neg.trait.value)
        and pos.trait.value - neg.trait.value < th.min_gap
    ):
        reasons.append("gap_below")
    if any(c.value is not None and c.value < th.coherence_min for c in (pos.coherence, neg.coherence)):
        reasons.append("incoherent")
    return reasons


def filter_pairs(
    pairs: Sequence[Pair], judged: dict[str, Judged], empty: set[str], th: Thresholds
) -> tuple[list[Pair], dict[Pair, list[str]]]:
    """The kept pairs, in plan order, and the reasons for every pair (empty for kept ones)."""
    reasons = {
        p: pair_reasons(judged[p.id("pos")], judged[p.id("neg")], p.id("pos") in empty, p.id("neg") in empty, th)
        for p in pairs
    }
    return [p for p in pairs if not reasons[p]], reasons


def filter_stats(reasons: dict[Pair, list[str]]) -> dict[str, int]:
    counted = Counter(r for rs in reasons.values() for r in rs)
    kept = sum(not rs for rs in reasons.values())
    return {"pairs": len(reasons), "kept": kept, "dropped": len(reasons) - kept, **{r: counted[r] for r in REASONS}}


def mean_difference(records: dict[str, Record], kept: Sequence[Pair], capture: str) -> torch.Tensor:
    """[L, H] float32: mean over kept pos replies minus mean over kept neg replies of one captured mean."""
    pos = torch.stack([records[p.id("pos")].tensors[capture].float() for p in kept])
    neg = torch.stack([records[p.id("neg")].tensors[capture].float() for p in kept])
    return pos.mean(0) - neg.mean(0)


def separation(records: dict[str, Record], kept: Sequence[Pair], direction: torch.Tensor) -> list[float | None]:
    """Cohen's d per layer of the kept pos vs neg response means projected on v̂ (how cleanly the sides split)."""
    unit = direction / direction.norm(dim=-1, keepdim=True)
    pos = torch.stack([(records[p.id("pos")].tensors["response"].float() * unit).sum(-1) for p in kept])
    neg = torch.stack([(records[p.id("neg")].tensors["response"].float() * unit).sum(-1) for p in kept])
    if len(kept) < 2:
        return [None] * direction.shape[0]
    pooled = ((pos.var(0) + neg.var(0)) / 2).sqrt()
    d = (pos.mean(0) - neg.mean(0)) / pooled
    return [float(x) if torch.isfinite(x) else None for x in d]


def _too_few(kept: int, stats: dict[str, int], counts: JudgeCounts, minimum: int) -> PersonaxisError:
    why = ", ".join(f"{stats[r]} {r.replace('_', ' ')}" for r in REASONS if stats[r])
    judge = f"judge: {counts.failed} of {counts.asked} calls failed, {counts.undefined} undefined"
    if counts.last_error:
        judge += f" (last error: {counts.last_error})"
    if counts.failed:
        hint = "check that the judge is reachable and rerun (only the failed judgements are asked again)"
    elif counts.undefined > counts.asked // 2:
        hint = "the judge mostly gave no numeric answer: use a stronger judge"
    else:
        hint = "add samples or questions, or lower the thresholds"
    return PersonaxisError(
        f"only {kept} of {stats['pairs']} pairs passed the filter (need at least {minimum}): "
        f"dropped for {why or 'no reason'}; {judge}; {hint}"
    )


def extraction_layers(model: ChatModel, layers: Sequence[int] | None = None) -> list[int]:
    """The layers an extraction captures: every layer by default, else the given ones, sorted and distinct."""
    return list(range(model.n_layers)) if layers is None else sorted(set(layers))


def extract_trait(
    model: ChatModel,
    trait: TraitSpec,
    judge: Judge,
    store: RunStore,
    settings: ExtractSettings = ExtractSettings(),
    layers: Sequence[int] | None = None,
    *,
    backend: Backend | None = None,
    progress: bool = True,
) -> Extraction:
    """Rollouts, judgements, pair filter and mean differences at every layer (see the module docstring).

    Writes samples.jsonl and vectors.safetensors into the run folder (the store's folder). `backend` runs the
    rollouts (default: a `LocalBackend` on `model` with `settings.batch_size`); one given must capture `CAPTURES` at
    `extraction_layers(model, layers)` of `model`.
    """
    layers = extraction_layers(model, layers)
    if backend is None:
        backend = LocalBackend(model, layers, captures=CAPTURES, batch_size=settings.batch_size)
    else:
        check_backend(backend, model, layers, CAPTURES)
    store.update_manifest(
        kind="trait", trait={"name": trait.name, "version": trait.version},
        models={"studied": model.name, "judge": judge.judge_id},
        extract={**asdict(settings), "layers": layers},
    )  # fmt: skip
    rollouts = plan_rollouts(trait, settings)
    records = run_rollouts(store, rollouts, backend, stage=STAGE, progress=progress)

    questions = trait.questions.extraction
    items = [(questions[r.labels["question"]], records[r.id].data["text"]) for r in rollouts]
    judgements, counts = judge_replies(judge, trait.rubric, items, progress=progress, description="judging replies")
    judged = {r.id: j for r, j in zip(rollouts, judgements, strict=True)}
    empty = {r.id for r in rollouts if not records[r.id].data["text"].strip() or records[r.id].data["n_tokens"] == 0}
    pairs = plan_pairs(trait, settings)
    kept, reasons = filter_pairs(pairs, judged, empty, settings.thresholds)
    stats = filter_stats(reasons)
    samples = [
        {
            "id": r.id, **r.labels, "question_text": questions[r.labels["question"]],
            "text": records[r.id].data["text"], "n_tokens": records[r.id].data["n_tokens"],
            **judged[r.id].as_dict(),
            "kept": not reasons[Pair(r.labels["pair"], r.labels["question"], r.labels["sample"])],
        }
        for r in rollouts
    ]  # fmt: skip
    write_jsonl(store.path / SAMPLES, samples)  # written first: when too few pairs survive, it shows why
    if len(kept) < settings.min_pairs:
        raise _too_few(len(kept), stats, counts, settings.min_pairs)

    directions = {trait.name: mean_difference(records, kept, "response")}
    for capture in CAPTURES[1:]:
        directions[f"{trait.name}.{capture}"] = mean_difference(records, kept, capture)
    config = {"trait": trait.model_dump(), "settings": asdict(settings), "layers": layers, "judge": judge.judge_id}
    meta = meta_for(
        model, method="persona_vector", aggregation="response_mean",
        points_toward=f"{trait.name}: replies under eliciting minus suppressing system prompts (judge-filtered pairs)",
        counts={"positive": len(kept), "negative": len(kept), **stats,
                "judge_failed_calls": counts.failed, "judge_undefined_scores": counts.undefined},
        config=config,
    )  # fmt: skip
    meta.extra.update(
        trait={"name": trait.name, "version": trait.version, "description": trait.description},
        primary=trait.name,
        directions={
            trait.name: "response-token mean difference (the persona vector)",
            f"{trait.name}.prompt": "prompt-token mean difference",
            f"{trait.name}.last_prompt": "last-prompt-token difference",
        },
        judge=judge.judge_id,
        judge_counts=counts.as_dict(),
        filter={**asdict(settings.thresholds), **stats},
        separation=separation(records, kept, directions[trait.name]),
    )
    vectors = Vectors(layers, directions, meta)
    vectors.save(store.path / VECTORS)
    return Extraction(vectors, samples, {**stats, "judge": counts.as_dict()})
