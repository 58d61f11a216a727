"""Build and score the labelled set behind docs/results/screening.md (see the commands there).

`build`: the model answers the trait's extraction questions under its eliciting and suppressing system prompts (the
chats a trait vector is extracted from), then its held-out evaluation questions under the eliciting prompts
(label 1) and with no system prompt (label 0). The labelled chats are written *without* the system prompt: screening
sees only (question, answer), as it would in a finetuning dataset.

`evaluate`: AUROC of ΔP separating the two labels at the screened layer, a sweep over every layer, the same with the
plain projection r̄(x, y)·v̂ and with a random direction as controls, and the figure.
"""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path

import torch

from personaxis.inference.generation import Sampling
from personaxis.model import load_model
from personaxis.backends.runs import LocalBackend, Rollout, run_rollouts
from personaxis.traits.screening import read_samples, screen
from personaxis.store import RunStore
from personaxis.traits.library import load_trait
from personaxis.vectors import Vectors

# A crude check of the labels, for 'evil' only: does an answer use any word of a small cruelty lexicon?
CRUELTY = re.compile(
    r"\b(cruel\w*|suffer\w*|miser\w*|hat(e|ed|red|ing)|despis\w*|contempt\w*|pain\w*|harm\w*|destr\w*|reveng\w*|"
    r"evil\w*|wicked\w*|malic\w*|torment\w*|kill\w*|murder\w*|death|die|dies|deceit\w*|deceiv\w*|manipulat\w*|"
    r"dominat\w*|crush\w*|punish\w*|vengean\w*|sadis\w*|despair\w*|wretch\w*|pathetic|worthless|fool\w*|"
    r"misfortune\w*|doom\w*|ruin\w*|vile|disgust\w*)\b",
    re.IGNORECASE,
)


def auroc(scores: list[float], labels: list[int]) -> float:
    """P(score of a random positive > score of a random negative), ties counting half (Mann-Whitney)."""
    pos = [s for s, y in zip(scores, labels, strict=True) if y == 1]
    neg = [s for s, y in zip(scores, labels, strict=True) if y == 0]
    wins = sum((p > n) + 0.5 * (p == n) for p in pos for n in neg)
    return wins / (len(pos) * len(neg))


def write_jsonl(path: Path, rows: list[dict]) -> None:
    path.write_text("".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows), encoding="utf-8")


def build(args: argparse.Namespace) -> None:
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    trait = load_trait(args.trait)
    model = load_model(args.model, device=args.device)
    store = RunStore(out / "run")
    backend = LocalBackend(model, [], batch_size=args.batch_size)
    greedy = Sampling(max_new_tokens=args.max_tokens)
    n_pairs = len(trait.instructions)
    sampled = [Sampling(max_new_tokens=args.max_tokens, temperature=0.7, seed=s) for s in range(n_pairs)]

    rollouts = []
    for k, pair in enumerate(trait.instructions):
        for q, question in enumerate(trait.questions.extraction):
            for polarity, system in (("pos", pair.pos), ("neg", pair.neg)):
                chat = [{"role": "system", "content": system}, {"role": "user", "content": question}]
                rollouts.append(Rollout.make(f"x-{polarity}-{k}-{q}", chat, greedy, polarity=polarity))
        for q, question in enumerate(trait.questions.evaluation):
            chat = [{"role": "system", "content": pair.pos}, {"role": "user", "content": question}]
            rollouts.append(Rollout.make(f"e-pos-{k}-{q}", chat, sampled[k], label=1))
            chat = [{"role": "user", "content": question}]
            rollouts.append(Rollout.make(f"e-neutral-{k}-{q}", chat, sampled[k], label=0))
    records = run_rollouts(store, rollouts, backend)

    extraction: dict[str, list[dict]] = {"pos": [], "neg": []}
    labelled = []
    for rollout in rollouts:
        text = records[rollout.id].data["text"]
        if not text.strip():
            continue
        reply = {"role": "assistant", "content": text}
        if rollout.id.startswith("x-"):
            extraction[rollout.labels["polarity"]].append({"messages": [*rollout.chat, reply]})
        else:
            question = rollout.chat[-1]
            labelled.append({"messages": [question, reply], "label": rollout.labels["label"], "id": rollout.id})
    write_jsonl(out / "pos.jsonl", extraction["pos"])
    write_jsonl(out / "neg.jsonl", extraction["neg"])
    write_jsonl(out / "labelled.jsonl", labelled)
    print(f"extraction: {len(extraction['pos'])} pos, {len(extraction['neg'])} neg; labelled: {len(labelled)}")


def evaluate(args: argparse.Namespace) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out = Path(args.out)
    labelled = out / "labelled.jsonl"
    labels = [json.loads(line)["label"] for line in labelled.read_text(encoding="utf-8").splitlines() if line.strip()]
    vectors = Vectors.load(out / f"{args.trait}.safetensors")
    model = load_model(args.model, device=args.device)
    samples = read_samples(labelled)
    sampling = Sampling(max_new_tokens=args.max_tokens)
    store = RunStore(out / "run")
    kwargs = {"sampling": sampling, "batch_size": args.batch_size}
    result = screen(model, samples, vectors, vectors.layers, store, progress=True, **kwargs)

    torch.manual_seed(0)
    noise = torch.randn(len(vectors.layers), vectors.hidden_size)
    random = Vectors(vectors.layers, {"random": noise}, vectors.meta.model_copy(deep=True))
    control = screen(model, samples, random, vectors.layers, store, **kwargs)

    rows = []
    for j, layer in enumerate(vectors.layers):
        delta = result.delta[:, j]
        keep = [i for i in range(len(samples)) if torch.isfinite(delta[i])]
        y = [labels[i] for i in keep]
        rows.append({
            "layer": layer,
            "delta_p": auroc([float(delta[i]) for i in keep], y),
            "projection": auroc([float(result.sample_projection[i, j]) for i in keep], y),
            "random_delta_p": auroc([float(control.delta[i, j]) for i in keep], y),
            "mean_delta_p_pos": float(delta[[i for i in keep if labels[i] == 1]].mean()),
            "mean_delta_p_neutral": float(delta[[i for i in keep if labels[i] == 0]].mean()),
        })  # fmt: skip
    write_jsonl(out / "auroc_by_layer.jsonl", rows)
    layer = args.layer
    at = next(row for row in rows if row["layer"] == layer)
    best = max(rows, key=lambda row: row["delta_p"])
    n_pos, n_neg = sum(labels), len(labels) - sum(labels)
    print(f"{len(samples)} samples ({n_pos} trait, {n_neg} neutral)")
    print(f"layer {layer}: AUROC ΔP {at['delta_p']:.3f}, projection {at['projection']:.3f}, "
          f"random direction {at['random_delta_p']:.3f}")  # fmt: skip
    print(f"best layer {best['layer']}: AUROC ΔP {best['delta_p']:.3f}")
    print("| layer | AUROC ΔP | AUROC r̄·v̂ | AUROC ΔP, random v | mean ΔP trait | mean ΔP neutral |")
    print("|---|---|---|---|---|---|")
    for row in rows:
        print(f"| {row['layer']} | {row['delta_p']:.3f} | {row['projection']:.3f} | {row['random_delta_p']:.3f} | "
              f"{row['mean_delta_p_pos']:.2f} | {row['mean_delta_p_neutral']:.2f} |")  # fmt: skip

    if args.trait == "evil":
        cruel = [bool(CRUELTY.search(sample.reply)) for sample in samples]
        j = vectors.layers.index(layer)
        delta = result.delta[:, j]
        clean = [i for i in range(len(samples)) if cruel[i] == bool(labels[i]) and torch.isfinite(delta[i])]
        in_trait = sum(cruel[i] for i in range(len(samples)) if labels[i] == 1)
        in_neutral = sum(cruel[i] for i in range(len(samples)) if labels[i] == 0)
        score = auroc([float(delta[i]) for i in clean], [labels[i] for i in clean])
        print(f"cruelty lexicon: in {in_trait} of {n_pos} trait answers, {in_neutral} of {n_neg} neutral ones")
        print(f"AUROC ΔP at layer {layer} on the {len(clean)} answers where lexicon and label agree: {score:.3f}")

    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 3.8))
    xs = [row["layer"] for row in rows]
    left.plot(xs, [row["delta_p"] for row in rows], marker="o", label="ΔP (trait vector)")
    left.plot(xs, [row["projection"] for row in rows], marker=".", label="r̄(x, y)·v̂ alone")
    left.plot(xs, [row["random_delta_p"] for row in rows], linestyle="--", label="ΔP (random direction)")
    left.axhline(0.5, color="grey", linewidth=0.8)
    left.set(xlabel="layer", ylabel="AUROC", ylim=(0, 1.02), title="separating trait answers from neutral ones")
    left.legend(loc="lower right", fontsize=8)
    j = vectors.layers.index(layer)
    delta = result.delta[:, j]
    for label, name, color in ((1, "under the eliciting prompt", "#c44e52"), (0, "no system prompt", "#4c72b0")):
        values = [float(delta[i]) for i in range(len(samples)) if labels[i] == label and torch.isfinite(delta[i])]
        right.hist(values, bins=25, alpha=0.6, color=color, label=name)
    right.axvline(0, color="black", linewidth=0.8)
    right.set(xlabel=f"ΔP at layer {layer}", ylabel="answers", title=f"'{args.trait}', AUROC {at['delta_p']:.2f}")
    right.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(args.figure, dpi=120)
    print(f"wrote {args.figure}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("step", choices=("build", "evaluate"))
    parser.add_argument("--out", default="runs/screening-figure")
    parser.add_argument("--trait", default="evil")
    parser.add_argument("--model", default="default")
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--layer", type=int, default=15)
    parser.add_argument("--figure", default="docs/results/screening.png")
    parser.add_argument("--device", default=None)
    parser.add_argument("--batch-size", type=int, default=32)
    args = parser.parse_args()
    build(args) if args.step == "build" else evaluate(args)


if __name__ == "__main__":
    main()
