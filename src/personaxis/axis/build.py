"""Build the Assistant Axis (science.md §2.1–2.4): rollouts, role-adoption judging, role vectors, axis, PCA, traits.

Every reply is a `Rollout` pushed through `run_rollouts`, which generates it and captures its response-token mean at
every layer in the same pass, and stores it under a content hash: a killed build resumes sample by sample. Judge
answers are cached in the same run store, so a rerun asks the judge only about what it has not seen (failed calls are
not cached, so they are retried). The analysis that follows is cheap and always recomputed from the records.

Without a judge (`judge="none"`) nothing is filtered: every role reply counts toward its role vector. That is *not*
the paper's method (its role vectors keep only replies scored 3) and the run says so in its metadata and summary.
`screen=True` drops the replies that present themselves as an AI (the rubric's `ai_self_reference` patterns), which
the rubric never scores 3, before any judge sees them: with no judge, a cheap approximation of the filter; with one,
fewer judge calls and none of a weak judge's 3s for a reply that speaks as the AI.

Every build reports how many of each role's replies present themselves as an AI, and how closely that share follows
PC1 across roles: unfiltered, a space can be ordered by how often a role is declined rather than by the roles.
"""

from __future__ import annotations

import hashlib
import json
import math
import time
from collections.abc import Callable, Collection, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

from personaxis.axis.library import (
    DEFAULT_ROLE,
    AxisTrait,
    Role,
    RoleRubric,
    load_axis_traits,
    load_default_prompts,
    load_questions,
    load_role_rubric,
    load_roles,
    quick_roles,
    select,
)
from personaxis.axis.space import PCA, assistant_axis, cosine, pc1_cosine_by_layer, pca, role_vectors
from personaxis.backends.runs import Backend, LocalBackend, Rollout, check_backend, run_rollouts
from personaxis.common.datasets import read_json
from personaxis.common.progress import in_chunks
from personaxis.errors import PersonaxisError
from personaxis.inference.generation import Sampling
from personaxis.inference.means import meta_for
from personaxis.judge import Judge
from personaxis.model.embedded import resolve_embedded
from personaxis.model.loading import ChatModel
from personaxis.store import Record, RunStore
from personaxis.vectors import Vectors

NO_JUDGE = "none"
ROLLOUT_STAGE = "rollouts"
CAPTURES = ("response",)  # captured at every layer
SUMMARY = "summary.json"
SPACE = "space.json"  # the persona-space view `personaxis serve` can show
ARTIFACTS = {
    "axis": "axis.safetensors",
    "roles": "roles.safetensors",
    "traits": "traits.safetensors",
    "pca": "pca.safetensors",
}
JUDGE_CHUNK = 32  # judge prompts per call: the judge cache is written after each, so a killed run keeps them


@dataclass(frozen=True)
class BuildConfig:
    """What a build does; the paper's settings by default except where a full run would not fit a small machine."""

    roles: int | None = None  # None: every role in the library
    quick_roles: bool = False  # the QUICK_ROLES spread instead of a seeded subset
    questions: int = 240
    samples: int = 1
    max_tokens: int = 512
    temperature: float = 0.7
    top_p: float = 0.9
    judge: str = "local:same"
    screen: bool = False  # drop replies that present themselves as an AI before judging
    min_count: int = 50
    target_layer: int | None = None  # None: the middle block
    traits: int | None = None  # None: every trait of the library
    seed: int = 0
    batch_size: int = 8
    model_name: str | None = None  # what fills "You are {model_name}."

    def __post_init__(self) -> None:
        for name in ("questions", "samples", "max_tokens", "min_count", "batch_size"):
            if getattr(self, name) < 1:
                raise PersonaxisError(f"{name.replace('_', ' ')} must be at least 1, got {getattr(self, name)}")
        if self.roles is not None and self.roles < 2:
            raise PersonaxisError(f"persona space needs at least 2 roles, got {self.roles}")
        if self.traits is not None and self.traits < 0:
            raise PersonaxisError(f"the number of traits cannot be negative, got {self.traits}")

    @property
    def judged(self) -> bool:
        return self.judge != NO_JUDGE

    @property
    def filter_mode(self) -> str:
        """How role replies are filtered, in words, for the summary and the artifacts' metadata."""
        screened = "replies that present themselves as an AI are dropped"
        if self.judged:
            return "judged: role vectors keep replies scored 3" + (f" ({screened} unjudged)" if self.screen else "")
        if self.screen:
            return f"screened: {screened}, the rest kept (no judge)"
        return "unjudged: every role reply is kept (not the paper's score-3 filter)"


QUICK = BuildConfig(
    quick_roles=True, questions=6, samples=1, max_tokens=48, judge=NO_JUDGE, min_count=1, traits=6, batch_size=16
)
"""A build that finishes in minutes on a laptop CPU with the embedded default model: 8 roles spread along the axis,
6 questions, one sample, 48-token replies, 6 traits, and no judge (every role reply kept, recorded as unjudged):
a 135M model cannot judge role adoption (asked for 0-3 it answers "0" to nearly everything), and a second, larger
judge model would not fit the time. Pass `--judge` to filter as the paper does."""


@dataclass
class AxisBuild:
    """Everything a build computed; `summary` is what goes to summary.json."""

    axis: Vectors
    roles: Vectors
    traits: Vectors | None
    pca: PCA
    summary: dict[str, Any]
    files: dict[str, Path] = field(default_factory=dict)


# --- planning -----------------------------------------------------------------------------------------------------


def self_name(model: ChatModel) -> str:
    """What the model would call itself: the embedded model's title, else the last part of its id."""
    embedded = resolve_embedded(model.name)
    return embedded.title if embedded else Path(model.name.rstrip("/")).name


def sample_seed(run_seed: int, sample_id: str) -> int:
    """A per-sample seed: reproducible, independent of batching and order, different for every sample."""
    return int(hashlib.sha256(f"{run_seed}:{sample_id}".encode()).hexdigest()[:8], 16) & 0x7FFFFFFF


def _chat(system: str | None, question: str) -> list[dict[str, str]]:
    return ([{"role": "system", "content": system}] if system is not None else []) + [
        {"role": "user", "content": question}
    ]


def plan_rollouts(
    config: BuildConfig,
    roles: Sequence[Role],
    default_prompts: Sequence[str | None],
    questions: Sequence[str],
    traits: Sequence[AxisTrait],
) -> list[Rollout]:
    """Every role × its prompts × questions × samples, the default set likewise, and each trait's two sides."""
    base = Sampling(max_new_tokens=config.max_tokens, temperature=config.temperature, top_p=config.top_p)
    out: list[Rollout] = []

    def add(sample_id: str, system: str | None, q: int, **labels: Any) -> None:
        for k in range(config.samples):
            rid = f"{sample_id}/q{q}/s{k}"
            sampling = replace(base, seed=sample_seed(config.seed, rid))
            out.append(Rollout.make(rid, _chat(system, questions[q]), sampling, question=q, sample=k, **labels))

    for role in roles:
        for p, system in enumerate(role.prompts):
            for q in range(len(questions)):
                add(f"role/{role.name}/p{p}", system, q, kind="role", role=role.name, prompt=p)
    for p, system in enumerate(default_prompts):
        for q in range(len(questions)):
            add(f"default/p{p}", system, q, kind="default", role=DEFAULT_ROLE, prompt=p)
    for trait in traits:
        for side in ("pos", "neg"):
            for p, system in enumerate(getattr(trait, side)):
                for q in range(len(questions)):
                    add(f"trait/{trait.name}/{side}{p}", system, q, kind="trait", trait=trait.name, side=side, prompt=p)
    return out


# --- judging ------------------------------------------------------------------------------------------------------


@dataclass
class Judgement:
    scores: dict[str, int | None]  # rollout id -> 0..3, or None when undefined or failed
    undefined: int = 0
    failed: int = 0


def judge_roles(
    judge: Judge,
    rubric: RoleRubric,
    items: Sequence[tuple[str, Role, str, str]],
    *,
    retries: int = 1,
    progress: bool = True,
) -> Judgement:
    """Score role adoption 0..max for (rollout id, role, question, reply) items, asking for labels "0".."max".

    An answer with too little probability on the options is undefined and a failed call is retried `retries` times;
    both are counted and neither ever becomes a score.
    """
    labels = [str(i) for i in range(rubric.max_score + 1)]
    prompts = {rid: rubric.render(role, question, reply) for rid, role, question, reply in items}
    scores: dict[str, int | None] = {}
    undefined = 0
    todo = list(prompts)
    for attempt in range(retries + 1):
        again = []
        description = "judging role adoption" + (f" (retry {attempt})" if attempt else "")
        for chunk in in_chunks(todo, JUDGE_CHUNK, description, progress):
            for rid, result in zip(chunk, judge.classify_many([prompts[r] for r in chunk], labels), strict=True):
                if result.failed:
                    again.append(rid)
                    scores[rid] = None
                else:
                    scores[rid] = None if result.label is None else int(result.label)
                    undefined += result.label is None
        todo = again
        if not todo:
            break
    return Judgement(scores, undefined, failed=len(todo))


# --- analysis -----------------------------------------------------------------------------------------------------


def _finite(record: Record) -> torch.Tensor | None:
    mean = record.tensors.get("response")
    return mean if mean is not None and bool(torch.isfinite(mean).all()) else None


def analyse(
    model_info: dict[str, Any],
    records: dict[str, Record],
    labels: dict[str, dict[str, Any]],
    scores: dict[str, int | None] | None,
    *,
    min_count: int,
    target_layer: int,
    keep_score: int = 3,
    as_ai: Collection[str] = frozenset(),
    screen: bool = False,
) -> tuple[dict[str, torch.Tensor], torch.Tensor, torch.Tensor, dict[str, torch.Tensor], PCA, dict[str, Any]]:
    """Role vectors, default vector, axis, trait vectors, PCA and the summary numbers from stored rollouts.

    `scores` None means unjudged: every role reply counts as fully in role. With `screen`, the replies in `as_ai`
    (those that present themselves as an AI) never count.
    """
    role_samples, default_means, trait_sides = [], [], {}
    as_ai_by_role: dict[str, list[bool]] = {}  # per role, for each reply with content: does it speak as an AI
    dropped = as_ai if screen else frozenset()
    empty = 0
    for rid, record in records.items():
        label = labels[rid]
        mean = _finite(record)
        if mean is None:
            empty += 1
            if label["kind"] == "role":
                role_samples.append((label["role"], None, torch.tensor(math.nan)))  # counted, never averaged
            continue
        if label["kind"] == "role":
            score = None if rid in dropped else keep_score if scores is None else scores.get(rid)
            role_samples.append((label["role"], score, mean))
            as_ai_by_role.setdefault(label["role"], []).append(rid in as_ai)
        elif label["kind"] == "default":
            default_means.append(mean)
        elif label["kind"] == "trait":
            trait_sides.setdefault(label["trait"], {"pos": [], "neg": []})[label["side"]].append(mean)
    if not default_means:
        raise PersonaxisError("no default reply has any content: the default vector cannot be computed")
    filtered = role_vectors(role_samples, min_count=min_count, keep_score=keep_score)
    if len(filtered.vectors) < 2:
        if scores is not None:
            what, hint = f"replies scored {keep_score}", "; lower --min-count, use a stronger judge, or --judge none"
        elif screen:
            what, hint = "replies that do not present themselves as an AI", "; lower --min-count"
        else:
            what, hint = "replies with content", ""
        raise PersonaxisError(
            f"only {len(filtered.vectors)} role(s) have at least {min_count} {what}{hint} (counts: {filtered.counts})"
        )
    default = torch.stack(default_means).mean(dim=0)
    axis = assistant_axis(default, filtered.vectors)
    names = list(filtered.vectors)
    stacked = torch.stack([filtered.vectors[n] for n in names])  # [R, L, H]
    space = pca(stacked[:, target_layer], toward=axis[target_layer])
    cos_by_layer = pc1_cosine_by_layer(stacked, axis)
    traits = {
        name: torch.stack(sides["pos"]).mean(0) - torch.stack(sides["neg"]).mean(0)
        for name, sides in sorted(trait_sides.items())
        if sides["pos"] and sides["neg"]
    }
    n_pcs = min(3, space.components.shape[0])
    cumulative = torch.cumsum(space.variance_ratio, 0).tolist()
    default_coords = ((default[target_layer] - space.mean) @ space.components.T).tolist()
    score_table: dict[str, dict[str, int]] = {}
    for rid, label in labels.items():
        if label["kind"] != "role":
            continue
        row = score_table.setdefault(label["role"], {})
        if _finite(records[rid]) is None:
            key = "empty"
        elif rid in dropped:
            key = "screened"
        elif scores is None:
            key = "kept" if screen else "unjudged"
        else:
            key = "undefined" if scores.get(rid) is None else str(scores[rid])
        row[key] = row.get(key, 0) + 1
    summary = {
        **model_info,
        "target_layer": target_layer,
        "counts": {
            "rollouts": len(records),
            "empty_replies": empty,
            "role_replies": sum(1 for lab in labels.values() if lab["kind"] == "role"),
            "default_replies": len(default_means),
            "trait_replies": sum(len(s["pos"]) + len(s["neg"]) for s in trait_sides.values()),
        },
        "scores": dict(sorted(score_table.items())),
        "roles": {
            "kept": names,
            "dropped": {role: filtered.counts[role] for role in filtered.dropped},
            "fully_in_role_counts": filtered.counts,
            "min_count": min_count,
        },
        "pca": {
            "layer": target_layer,
            "variance_ratio": space.variance_ratio.tolist(),
            "cumulative": cumulative,
            "pcs_for_70_percent": next((i + 1 for i, c in enumerate(cumulative) if c >= 0.7), len(cumulative)),
            "pc1_variance": float(space.variance_ratio[0]),
            "orientation": "each PC's sign is chosen so that its cosine with the axis is non-negative",
            "role_coordinates": {n: space.scores[i, :n_pcs].tolist() for i, n in enumerate(names)},
            "default_coordinates": default_coords[:n_pcs],
        },
        "axis": {
            "norm_by_layer": axis.norm(dim=-1).tolist(),
            "pc1_cosine_by_layer": cos_by_layer,
            "pc1_cosine_at_target": cos_by_layer[target_layer],
        },
        "ai_self_reference": _self_reference(as_ai_by_role, names, space.scores[:, 0].tolist()),
        "traits": {
            name: {
                "cosine_with_axis": cosine(vector[target_layer], axis[target_layer]),
                "cosine_with_pcs": [cosine(vector[target_layer], space.components[k]) for k in range(n_pcs)],
            }
            for name, vector in traits.items()
        },
    }
    vectors = {**filtered.vectors, DEFAULT_ROLE: default}
    return vectors, default, axis, traits, space, summary


def _self_reference(replies: dict[str, list[bool]], kept: list[str], pc1: list[float]) -> dict[str, Any]:
    """How many replies present themselves as an AI, per role, and Spearman's ρ of that share with PC1 over roles.

    A ρ near ±1 says PC1 orders the roles by how often they were declined, not by what they are.
    """
    share = {role: sum(flags) / len(flags) for role, flags in sorted(replies.items())}
    rho = p = None
    xs = [share[n] for n in kept]
    if len(kept) >= 3 and len(set(xs)) > 1 and len(set(pc1)) > 1:
        from scipy.stats import spearmanr

        result = spearmanr(xs, pc1)
        rho, p = float(result.statistic), float(result.pvalue)
    total = sum(len(flags) for flags in replies.values())
    return {
        "replies": sum(sum(flags) for flags in replies.values()),
        "of": total,
        "share_by_role": share,
        "pc1_spearman": rho,
        "pc1_spearman_p": p,
    }


# --- the pipeline -------------------------------------------------------------------------------------------------


def build_axis(
    model: ChatModel,
    run_dir: str | Path,
    config: BuildConfig = BuildConfig(),
    *,
    judge: Judge | None = None,
    roles: Sequence[Role] | None = None,
    questions: Sequence[str] | None = None,
    traits: Sequence[AxisTrait] | None = None,
    rubric: RoleRubric | None = None,
    backend: Backend | None = None,
    progress: bool = True,
    log: Callable[[str], None] = lambda message: None,
) -> AxisBuild:
    """Run (or resume) a build in `run_dir` and write its artifacts, summary and plots there.

    `judge` is required unless `config.judge == "none"`; the libraries default to the packaged ones. `backend` runs
    the rollouts (default: a `LocalBackend` on `model` with `config.batch_size`); one given must capture `CAPTURES`
    at every layer of `model`.
    """
    if config.judged and judge is None:
        raise PersonaxisError(f"the build asks for judge {config.judge!r} but none was given")
    target = model.n_layers // 2 if config.target_layer is None else config.target_layer
    if not 0 <= target < model.n_layers:
        raise PersonaxisError(f"target layer {target} is outside the model's layers 0..{model.n_layers - 1}")
    layers = list(range(model.n_layers))
    if backend is None:
        backend = LocalBackend(model, layers, CAPTURES, batch_size=config.batch_size)
    else:
        check_backend(backend, model, layers, CAPTURES)
    library = load_roles() if roles is None else list(roles)
    if config.quick_roles:
        chosen_roles = quick_roles(library, seed=config.seed)
    elif config.roles is not None:
        chosen_roles = select(library, config.roles, seed=config.seed)
    else:
        chosen_roles = library
    chosen_questions = select(load_questions() if questions is None else list(questions), config.questions, config.seed)
    trait_library = load_axis_traits() if traits is None else list(traits)
    chosen_traits = trait_library if config.traits is None else select(trait_library, config.traits, config.seed)
    prompts = len(chosen_roles[0].prompts)  # the same for every role (the library's schema)
    if config.min_count > prompts * len(chosen_questions) * config.samples:
        raise PersonaxisError(
            f"--min-count {config.min_count} cannot be met: a role gets "
            f"{prompts * len(chosen_questions) * config.samples} replies ({prompts} prompts × "
            f"{len(chosen_questions)} questions × {config.samples} sample(s)); lower --min-count or raise --questions "
            "or --samples"
        )
    rubric = load_role_rubric() if rubric is None else rubric
    if config.screen and not rubric.ai_self_reference:
        raise PersonaxisError("--screen needs the rubric's ai_self_reference patterns, and this rubric has none")
    name = config.model_name or self_name(model)
    default_prompts = load_default_prompts(name)

    store = RunStore(run_dir)
    manifest = store.manifest
    if manifest.get("model") not in (None, model.name):
        raise PersonaxisError(f"{run_dir} holds a build of {manifest['model']}, not {model.name}: use another --run")
    store.update_manifest(
        kind="axis_build",
        model=model.name,
        config=asdict(config),
        judge=config.judge,
        judge_id=judge.judge_id if judge is not None else None,
    )
    plan = plan_rollouts(config, chosen_roles, default_prompts, chosen_questions, chosen_traits)
    log(
        f"{len(plan)} rollouts: {len(chosen_roles)} roles, {len(chosen_questions)} questions, "
        f"{config.samples} sample(s), {len(chosen_traits)} traits"
    )
    started = time.time()
    records = run_rollouts(store, plan, backend, stage=ROLLOUT_STAGE, progress=progress)
    labels = {r.id: r.labels for r in plan}

    as_ai = {r.id for r in plan if r.labels["kind"] == "role" and rubric.presents_as_ai(records[r.id].data["text"])}
    judgement = None
    if judge is not None and config.judged:
        by_name = {role.name: role for role in chosen_roles}
        items = [  # an empty reply has nothing to judge (and no response mean): it is counted as empty
            (r.id, by_name[r.labels["role"]], chosen_questions[r.labels["question"]], records[r.id].data["text"])
            for r in plan
            if r.labels["kind"] == "role"
            and records[r.id].data["text"].strip()
            and not (config.screen and r.id in as_ai)
        ]
        log(f"judging role adoption of {len(items)} replies with {judge.judge_id}")
        judgement = judge_roles(judge, rubric, items, progress=progress)

    info = {
        "model": model.name,
        "n_layers": model.n_layers,
        "hidden_size": model.hidden_size,
        "judge": {
            "spec": config.judge,
            "id": judge.judge_id if judge is not None else None,
            "mode": config.filter_mode,
            "undefined": judgement.undefined if judgement else 0,
            "failed": judgement.failed if judgement else 0,
            "stats": asdict(judge.stats) if judge is not None else None,
        },
        "config": asdict(config),
        "model_self_name": name,
        "questions": chosen_questions,
    }
    vectors, _, axis, trait_vectors, space, summary = analyse(
        info,
        records,
        labels,
        judgement.scores if judgement else None,
        min_count=config.min_count,
        target_layer=target,
        as_ai=as_ai,
        screen=config.screen,
    )
    summary["seconds"] = round(time.time() - started, 1)
    result = _artifacts(model, Path(run_dir), config, vectors, axis, trait_vectors, space, summary)
    store.update_manifest(summary=SUMMARY)
    return result


def _artifacts(
    model: ChatModel,
    run_dir: Path,
    config: BuildConfig,
    role_vectors_: dict[str, torch.Tensor],
    axis: torch.Tensor,
    traits: dict[str, torch.Tensor],
    space: PCA,
    summary: dict[str, Any],
) -> AxisBuild:
    from personaxis.axis import plots
    from personaxis.common.datasets import neutral_texts
    from personaxis.inference.capture import residual_norms
    from personaxis.store import atomic_write_text

    layers = list(range(model.n_layers))
    norms = residual_norms(model, neutral_texts())
    target = summary["target_layer"]
    config_dict = asdict(config)
    judged = config.filter_mode.partition(":")[0]
    common = dict(aggregation="response_mean", mean_norms=norms)
    counts = {"roles": len(role_vectors_) - 1, "default_replies": summary["counts"]["default_replies"]}
    axis_meta = meta_for(
        model,
        method=f"assistant_axis ({judged})",
        points_toward="the default Assistant (mean of default replies minus mean of role vectors)",
        counts=counts,
        config={"axis": config_dict},
        **common,
    )
    # "layer" is where servers and dashboards monitor a vector by default
    axis_meta.extra.update(layer=target, target_layer=target, judge=summary["judge"]["spec"], judged=config.judged)
    axis_vectors = Vectors(layers, {"axis": axis}, axis_meta)
    role_meta = meta_for(
        model,
        method=f"role_mean ({judged})",
        points_toward="each role's mean response activation (a position, not a difference); "
        "'default' is the mean of all default replies",
        counts=summary["roles"]["fully_in_role_counts"],
        config={"roles": config_dict},
        **common,
    )
    role_meta.extra.update(target_layer=target, judged=config.judged)
    roles = Vectors(layers, role_vectors_, role_meta)
    pcs = {f"pc{k + 1}": space.components[k][None] for k in range(space.components.shape[0])}
    pca_meta = meta_for(
        model,
        method="pca of role vectors (mean-centred)",
        points_toward="principal components; each oriented to have a non-negative cosine with the axis",
        counts={"roles": len(role_vectors_) - 1},
        config={"pca": config_dict},
        **common,
    )
    pca_meta.extra.update(variance_ratio=space.variance_ratio.tolist(), target_layer=target)
    pca_vectors = Vectors([target], pcs, pca_meta)
    trait_vectors = None
    if traits:
        trait_meta = meta_for(
            model,
            method="mean_diff (trait-eliciting minus trait-suppressing system prompts)",
            points_toward="more of each trait",
            counts={"traits": len(traits)},
            config={"traits": config_dict},
            **common,
        )
        trait_vectors = Vectors(layers, traits, trait_meta)

    out = run_dir / "artifacts"
    out.mkdir(parents=True, exist_ok=True)
    files = {
        "axis": axis_vectors.save(out / ARTIFACTS["axis"]),
        "roles": roles.save(out / ARTIFACTS["roles"]),
        "pca": pca_vectors.save(out / ARTIFACTS["pca"]),
    }
    if trait_vectors is not None:
        files["traits"] = trait_vectors.save(out / ARTIFACTS["traits"])
    files.update(plots.build_plots(run_dir / "plots", summary))
    space_view = persona_space_view(role_vectors_, axis[target], space, target)
    files["space"] = run_dir / SPACE
    atomic_write_text(files["space"], json.dumps(space_view, indent=2) + "\n")
    summary["artifacts"] = {k: str(p.relative_to(run_dir)) for k, p in files.items()}
    atomic_write_text(run_dir / SUMMARY, json.dumps(summary, indent=2) + "\n")
    return AxisBuild(axis_vectors, roles, trait_vectors, space, summary, files)


def persona_space_view(vectors: dict[str, torch.Tensor], axis: torch.Tensor, space: PCA, layer: int) -> dict[str, Any]:
    """Roles (and the default) on PC1 × PC2 for a dashboard, plus `axis_x` = (scale, offset) mapping a projection on
    â at `layer` to a PC1 coordinate: a least-squares line through the roles' own (projection, PC1) pairs."""
    unit = axis.float() / axis.norm()
    names = list(vectors)
    points = torch.stack([vectors[n][layer].float() for n in names])
    coords = (points - space.mean) @ space.components[:2].T
    projections = points @ unit
    design = torch.stack([projections, torch.ones_like(projections)], dim=1).double()
    scale, offset = torch.linalg.lstsq(design, coords[:, 0:1].double()).solution.flatten().tolist()
    return {
        "layer": layer,
        "points": [
            {"name": n, "x": float(c[0]), "y": float(c[1]) if c.numel() > 1 else 0.0}
            for n, c in zip(names, coords, strict=True)
        ],
        "axis_x": [scale, offset],
    }


def role_matrix(run_dir: str | Path, layer: int) -> tuple[list[str], torch.Tensor, torch.Tensor]:
    """A build's kept role names, their vectors [R, H] and the default vector [H] at `layer`, from its artifacts."""
    vectors = Vectors.load(Path(run_dir) / "artifacts" / ARTIFACTS["roles"])
    if layer not in vectors.layers:
        raise PersonaxisError(f"layer {layer} is not in the build (layers {vectors.layers[0]}–{vectors.layers[-1]})")
    if DEFAULT_ROLE not in vectors.names:
        raise PersonaxisError(f"{run_dir}: the role vectors lack the '{DEFAULT_ROLE}' vector")
    k = vectors.layers.index(layer)
    names = [n for n in vectors.names if n != DEFAULT_ROLE]
    return names, torch.stack([vectors.data[n][k] for n in names]), vectors.data[DEFAULT_ROLE][k]


def load_summary(run_dir: str | Path) -> dict[str, Any]:
    path = Path(run_dir) / SUMMARY
    if not path.is_file():
        raise PersonaxisError(f"{run_dir} has no {SUMMARY}: run `personaxis axis build --run {run_dir}` first")
    return read_json(path)
