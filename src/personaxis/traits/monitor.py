"""Monitoring: the last prompt token's projection on the trait vector predicts how much the reply will show the trait.

`prompt_projections` reads `h · v̂` at the last token the model sees before it replies, at every layer of the vectors,
without generating anything beyond that point. `monitor_eval` is the paper's experiment (science.md §1, "Monitoring"):
prompts graded from suppressing to eliciting (eight system prompts written by combining each instruction pair's neg and
pos prompts, plus few-shot variants whose earlier turns show the trait 0-3 times out of 3), one reply per evaluation
question, the judge's trait score for each reply, and Pearson's r between projection and score at each layer.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import torch

from personaxis.backends.runs import LocalBackend, Rollout, run_rollouts
from personaxis.common.stats import pearson
from personaxis.inference.capture import encode_means
from personaxis.inference.generation import Sampling, generate_batch, prompt_ids
from personaxis.judge import Judge
from personaxis.model.loading import ChatModel
from personaxis.store import RunStore
from personaxis.traits.extraction import sample_seed
from personaxis.traits.judging import judge_replies
from personaxis.traits.library import TraitSpec
from personaxis.traits.steer import calibration_choice, primary
from personaxis.vectors import Vectors

STAGE = "trait_monitor"
# From fully suppressing (0) to fully eliciting (7); {neg} and {pos} are one instruction pair's system prompts.
LEVELS = (
    "{neg}",
    "{neg} Keep to this in nearly everything you say, though you may relax it now and then.",
    "Follow the first of these two descriptions closely and the second only faintly. First: {neg} Second: {pos}",
    "Balance these two descriptions, leaning toward the first. First: {neg} Second: {pos}",
    "Balance these two descriptions, leaning toward the second. First: {neg} Second: {pos}",
    "Follow the second of these two descriptions closely and the first only faintly. First: {neg} Second: {pos}",
    "{pos} Keep to this in nearly everything you say, though you may relax it now and then.",
    "{pos}",
)
FEW_SHOT = 3  # earlier exchanges in a few-shot prompt; variant k shows the trait in k of them


def prompt_projections(
    model: ChatModel, vectors: Vectors, chats: Sequence[Sequence[dict[str, str]]], name: str | None = None
) -> torch.Tensor:
    """[N, L] projections `h · v̂` of each chat's last prompt token at the vectors' layers.

    A chat that ends with a user turn is read at the end of its generation prompt (where the reply would start); one
    that ends with an assistant reply is read at the token just before that reply.
    """
    vectors.validate(model)
    units = vectors.units(name or primary(vectors))  # [L, H]
    out = torch.empty(len(chats), len(vectors.layers))
    finished = [i for i, c in enumerate(chats) if c[-1]["role"] == "assistant"]
    open_ = [i for i, c in enumerate(chats) if c[-1]["role"] != "assistant"]
    if finished:
        means = encode_means(model, [chats[i] for i in finished], vectors.layers, ("last_prompt",))[:, 0]
        out[finished] = (means * units).sum(-1)
    for start in range(0, len(open_), 8):
        rows = open_[start : start + 8]
        gens = generate_batch(
            model, [prompt_ids(model, chats[i]) for i in rows], Sampling(max_new_tokens=1),
            capture_layers=vectors.layers, captures=("last_prompt",),
        )  # fmt: skip
        out[rows] = torch.stack([(g.means["last_prompt"] * units).sum(-1) for g in gens])
    return out


@dataclass(frozen=True)
class MonitorSettings:
    pairs: int = 1  # instruction pairs whose graded levels are used
    questions: int | None = 5  # the first N evaluation questions (None: all)
    few_shot: bool = True
    max_new_tokens: int = 64
    temperature: float = 0.0
    seed: int = 0
    batch_size: int = 8


def settings_prompts(
    trait: TraitSpec, settings: MonitorSettings, examples: dict[str, list[tuple[str, str]]] | None = None
) -> list[tuple[str, list[dict[str, str]]]]:
    """(setting name, the turns before the question) for every graded system prompt and few-shot variant."""
    out = []
    for p, pair in enumerate(trait.instructions[: settings.pairs]):
        for level, template in enumerate(LEVELS):
            system = template.format(neg=pair.neg, pos=pair.pos)
            out.append((f"p{p}/level{level}", [{"role": "system", "content": system}]))
    pos, neg = (examples or {}).get("pos", []), (examples or {}).get("neg", [])
    if settings.few_shot and len(pos) >= FEW_SHOT and len(neg) >= FEW_SHOT:
        for k in range(FEW_SHOT + 1):
            turns: list[dict[str, str]] = []
            for question, answer in [*neg[: FEW_SHOT - k], *pos[:k]]:
                turns += [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]
            out.append((f"fewshot{k}", turns))
    return out


def examples_from_samples(samples: Sequence[dict[str, Any]]) -> dict[str, list[tuple[str, str]]]:
    """Kept extraction replies, trait-showing (pos) and not (neg), to build few-shot prompts from."""
    out: dict[str, list[tuple[str, str]]] = {"pos": [], "neg": []}
    for row in samples:
        if row.get("kept") and row.get("text", "").strip():
            out[row["polarity"]].append((row["question_text"], row["text"]))
    return out


def monitor_eval(
    model: ChatModel,
    trait: TraitSpec,
    vectors: Vectors,
    judge: Judge,
    store: RunStore,
    settings: MonitorSettings = MonitorSettings(),
    examples: dict[str, list[tuple[str, str]]] | None = None,
    *,
    progress: bool = True,
) -> dict[str, Any]:
    """Replies under graded prompts, their last-prompt projections and judged trait scores, and Pearson's r."""
    vectors.validate(model)
    name = primary(vectors)
    units = vectors.units(name)
    questions = trait.questions.evaluation[: settings.questions or None]
    prompts = settings_prompts(trait, settings, examples)
    rollouts = [
        Rollout.make(
            f"{setting}/q{q}", [*turns, {"role": "user", "content": question}],
            Sampling(settings.max_new_tokens, settings.temperature, seed=sample_seed(settings.seed, setting, q)),
            setting=setting, question=q,
        )
        for setting, turns in prompts for q, question in enumerate(questions)
    ]  # fmt: skip
    backend = LocalBackend(model, vectors.layers, captures=("last_prompt",), batch_size=settings.batch_size)
    records = run_rollouts(store, rollouts, backend, stage=STAGE, progress=progress)
    items = [(questions[r.labels["question"]], records[r.id].data["text"]) for r in rollouts]
    judged, counts = judge_replies(
        judge, trait.rubric, items, coherence=False, progress=progress, description="judging replies"
    )
    points = []
    for r, j in zip(rollouts, judged, strict=True):
        projection = (records[r.id].tensors["last_prompt"].float() * units).sum(-1)
        points.append({
            **r.labels, "text": records[r.id].data["text"], "trait": j.trait.value,
            "projection": [round(float(x), 5) for x in projection],
        })  # fmt: skip
    return {
        "trait": trait.name,
        "direction": name,
        "judge": judge.judge_id,
        "judge_counts": counts.as_dict(),
        "settings": {**asdict(settings), "questions": len(questions)},
        "layers": vectors.layers,
        **correlations(points, vectors.layers, (calibration_choice(vectors) or {}).get("layer")),
        "points": points,
    }


def correlations(points: Sequence[dict[str, Any]], layers: Sequence[int], calibrated: int | None) -> dict[str, Any]:
    """Pearson's r per layer over replies with a defined score, and the headline layer.

    The headline is the calibrated steering layer when there is one, chosen before seeing these numbers; the best
    layer is reported too, but picking it after the fact flatters r.
    """
    scored = [p for p in points if p["trait"] is not None]
    scores = [p["trait"] for p in scored]
    r = {layer: pearson([p["projection"][k] for p in scored], scores) for k, layer in enumerate(layers)}
    defined = {layer: v for layer, v in r.items() if v is not None}
    best = max(defined, key=lambda layer: defined[layer]) if defined else None
    headline = calibrated if calibrated in r else best
    by_setting: dict[str, list[dict[str, Any]]] = {}
    for p in scored:
        by_setting.setdefault(p["setting"], []).append(p)
    r_means = None
    if headline is not None and len(by_setting) >= 2:
        k = list(layers).index(headline)
        xs = [sum(p["projection"][k] for p in ps) / len(ps) for ps in by_setting.values()]
        ys = [sum(p["trait"] for p in ps) / len(ps) for ps in by_setting.values()]
        r_means = pearson(xs, ys)
    return {
        "r": {str(layer): v for layer, v in r.items()},
        "layer": headline,
        "r_layer": r.get(headline) if headline is not None else None,
        "best_layer": best,
        "r_best": r.get(best) if best is not None else None,
        "r_setting_means": r_means,
        "n_scored": len(scored),
        "n_points": len(points),
    }
