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

import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from personaxis.axis.analysis import AxisAnalysis, analyse, persona_space_view
from personaxis.axis.library import (
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
from personaxis.axis.report import write_report
from personaxis.axis.rollouts import CAPTURES, ROLLOUT_STAGE, plan_rollouts, self_name
from personaxis.axis.runfiles import ARTIFACTS, ARTIFACTS_DIR, NO_JUDGE, PLOTS, SPACE, SUMMARY, write_json
from personaxis.axis.space import PCA
from personaxis.backends.runs import Backend, LocalBackend, Rollout, check_backend, run_rollouts
from personaxis.common.progress import in_chunks
from personaxis.errors import PersonaxisError
from personaxis.inference.means import meta_for
from personaxis.judge import Judge
from personaxis.model.loading import ChatModel
from personaxis.store import Record, RunStore
from personaxis.vectors import Vectors

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


# --- the pipeline -------------------------------------------------------------------------------------------------


@dataclass
class _Chosen:
    roles: list[Role]
    questions: list[str]
    traits: list[AxisTrait]


def _choose(
    config: BuildConfig,
    roles: Sequence[Role] | None,
    questions: Sequence[str] | None,
    traits: Sequence[AxisTrait] | None,
) -> _Chosen:
    """The roles, questions and traits of the build (seeded subsets of the libraries), checked against min_count."""
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
    return _Chosen(chosen_roles, chosen_questions, chosen_traits)


def _open_store(run_dir: str | Path, model: ChatModel, config: BuildConfig, judge: Judge | None) -> RunStore:
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
    return store


def _judge_plan(
    judge: Judge,
    config: BuildConfig,
    rubric: RoleRubric,
    chosen: _Chosen,
    plan: Sequence[Rollout],
    records: dict[str, Record],
    as_ai: set[str],
    progress: bool,
    log: Callable[[str], None],
) -> Judgement:
    by_name = {role.name: role for role in chosen.roles}
    items = [  # an empty reply has nothing to judge (and no response mean): it is counted as empty
        (r.id, by_name[r.labels["role"]], chosen.questions[r.labels["question"]], records[r.id].data["text"])
        for r in plan
        if r.labels["kind"] == "role" and records[r.id].data["text"].strip() and not (config.screen and r.id in as_ai)
    ]
    log(f"judging role adoption of {len(items)} replies with {judge.judge_id}")
    return judge_roles(judge, rubric, items, progress=progress)


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
    """Run (or resume) a build in `run_dir` and write its artifacts, summary, plots and report there.

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
    chosen = _choose(config, roles, questions, traits)
    rubric = load_role_rubric() if rubric is None else rubric
    if config.screen and not rubric.ai_self_reference:
        raise PersonaxisError("--screen needs the rubric's ai_self_reference patterns, and this rubric has none")
    name = config.model_name or self_name(model)
    store = _open_store(run_dir, model, config, judge)
    plan = plan_rollouts(config, chosen.roles, load_default_prompts(name), chosen.questions, chosen.traits)
    log(
        f"{len(plan)} rollouts: {len(chosen.roles)} roles, {len(chosen.questions)} questions, "
        f"{config.samples} sample(s), {len(chosen.traits)} traits"
    )
    started = time.time()
    records = run_rollouts(store, plan, backend, stage=ROLLOUT_STAGE, progress=progress)
    as_ai = {r.id for r in plan if r.labels["kind"] == "role" and rubric.presents_as_ai(records[r.id].data["text"])}
    judgement = None
    if judge is not None and config.judged:
        judgement = _judge_plan(judge, config, rubric, chosen, plan, records, as_ai, progress, log)
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
        "questions": chosen.questions,
    }
    labels = {r.id: r.labels for r in plan}
    scores = judgement.scores if judgement else None
    found = analyse(
        info,
        records,
        labels,
        scores,
        min_count=config.min_count,
        target_layer=target,
        as_ai=as_ai,
        screen=config.screen,
    )
    found.summary["seconds"] = round(time.time() - started, 1)
    result = _artifacts(model, Path(run_dir), config, found)
    store.update_manifest(summary=SUMMARY)
    write_report(run_dir)
    return result


def _vectors(model: ChatModel, config: BuildConfig, found: AxisAnalysis) -> dict[str, Vectors]:
    """The build's artifacts, each with its method and counts in the metadata: axis, roles, pca and traits."""
    from personaxis.common.datasets import neutral_texts
    from personaxis.inference.capture import residual_norms

    summary, space = found.summary, found.space
    layers = list(range(model.n_layers))
    target = summary["target_layer"]
    config_dict = asdict(config)
    judged = config.filter_mode.partition(":")[0]
    common = dict(aggregation="response_mean", mean_norms=residual_norms(model, neutral_texts()))
    counts = {"roles": len(found.vectors) - 1, "default_replies": summary["counts"]["default_replies"]}
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
    pcs = {f"pc{k + 1}": space.components[k][None] for k in range(space.components.shape[0])}
    pca_meta = meta_for(
        model,
        method="pca of role vectors (mean-centred)",
        points_toward="principal components; each oriented to have a non-negative cosine with the axis",
        counts={"roles": len(found.vectors) - 1},
        config={"pca": config_dict},
        **common,
    )
    pca_meta.extra.update(variance_ratio=space.variance_ratio.tolist(), target_layer=target)
    out = {
        "axis": Vectors(layers, {"axis": found.axis}, axis_meta),
        "roles": Vectors(layers, found.vectors, role_meta),
        "pca": Vectors([target], pcs, pca_meta),
    }
    if found.traits:
        trait_meta = meta_for(
            model,
            method="mean_diff (trait-eliciting minus trait-suppressing system prompts)",
            points_toward="more of each trait",
            counts={"traits": len(found.traits)},
            config={"traits": config_dict},
            **common,
        )
        out["traits"] = Vectors(layers, found.traits, trait_meta)
    return out


def _artifacts(model: ChatModel, run_dir: Path, config: BuildConfig, found: AxisAnalysis) -> AxisBuild:
    """Save the artifacts, space.json and summary.json (which lists them, and the plots the report draws)."""
    from personaxis.axis.plots import build_plot_paths

    vectors = _vectors(model, config, found)
    summary, target = found.summary, found.summary["target_layer"]
    out = run_dir / ARTIFACTS_DIR
    out.mkdir(parents=True, exist_ok=True)
    files = {
        name: vectors[name].save(out / ARTIFACTS[name])
        for name in ("axis", "roles", "pca", "traits")
        if name in vectors
    }
    files.update(build_plot_paths(run_dir / PLOTS, summary))
    files["space"] = write_json(
        run_dir / SPACE, persona_space_view(found.vectors, found.axis[target], found.space, target)
    )
    summary["artifacts"] = {k: str(p.relative_to(run_dir)) for k, p in files.items()}
    write_json(run_dir / SUMMARY, summary)
    return AxisBuild(vectors["axis"], vectors["roles"], vectors.get("traits"), found.space, summary, files)
