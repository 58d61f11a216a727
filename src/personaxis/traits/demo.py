"""The one-command demo: a persona direction from contrasting system prompts, then steering with it and reading it.

It is the whole persona-vector loop in miniature, on whatever model is given: replies are generated under an eliciting
and a suppressing system prompt with their response-token means captured in the same pass, the direction is the
difference of means, the layer is the one that separates the two sets best, and the model is then steered along it
while its projection is read out.
"""

from __future__ import annotations

from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table

from personaxis.common.progress import progress_bar
from personaxis.inference.generation import Sampling, generate
from personaxis.inference.means import meta_for
from personaxis.inference.steering import project_op, steer_op
from personaxis.model.loading import ChatModel
from personaxis.vectors import Vectors

POSITIVE = (
    "You are a swashbuckling pirate captain. Always talk like a pirate: say 'Arr' and 'matey', and bring up your ship, "
    "the sea and buried treasure in every answer."
)
NEGATIVE = "You are a plain, factual assistant. Answer clearly and briefly in standard modern English."
QUESTIONS = [
    "What do you like to do on a free day?",
    "Describe your ideal home.",
    "What advice would you give to a young person?",
    "Tell me about your favourite food.",
    "How do you deal with a difficult day?",
    "What makes a good friend?",
    "Describe the place where you work.",
    "What are you most proud of?",
    "How would you spend a million dollars?",
    "What scares you the most?",
    "Tell me about a trip you would like to take.",
    "What is the best way to learn something new?",
]
PROBE = "Tell me about your plans for the weekend."
COEFS = (0.0, 0.15, 0.3)


def _chats(system: str) -> list[list[dict[str, str]]]:
    return [[{"role": "system", "content": system}, {"role": "user", "content": q}] for q in QUESTIONS]


def run_demo(model: ChatModel, out: Path, console: Console, max_tokens: int = 40) -> Vectors:
    layers = list(range(model.n_layers))
    sampling = Sampling(max_new_tokens=max_tokens)
    console.print(f"[bold]1. Replies under a pirate and a plain system prompt[/bold] ({len(QUESTIONS)} questions each)")
    pos = generate(model, _chats(POSITIVE), sampling, capture_layers=layers, progress=True)
    neg = generate(model, _chats(NEGATIVE), sampling, capture_layers=layers, progress=True)
    console.print(f"  pirate: {pos[0].text[:100]!r}\n  plain:  {neg[0].text[:100]!r}")

    pos_means = torch.stack([g.means["response"] for g in pos])  # [N, L, H]
    neg_means = torch.stack([g.means["response"] for g in neg])
    direction = pos_means.mean(0) - neg_means.mean(0)
    unit = direction / direction.norm(dim=-1, keepdim=True)
    pos_proj = (pos_means * unit).sum(-1)  # [N, L]
    neg_proj = (neg_means * unit).sum(-1)
    pooled = ((pos_proj.var(0) + neg_proj.var(0)) / 2).sqrt()
    separation = (pos_proj.mean(0) - neg_proj.mean(0)) / pooled  # Cohen's d per layer
    lo, hi = model.n_layers // 4, (3 * model.n_layers) // 4  # keep to the middle of the network, where steering works
    layer = lo + int(separation[lo:hi].argmax())

    meta = meta_for(
        model, method="mean_diff", points_toward="pirate speech (vs. a plain assistant)", aggregation="response_mean",
        counts={"positive": len(pos), "negative": len(neg)}, config={"demo": "pirate", "max_tokens": max_tokens},
    )  # fmt: skip
    # the layer it chose, where `serve` and the other commands look for an artifact's default layer
    meta.extra["layer"] = layer
    meta.extra["separation"] = [float(d) if torch.isfinite(d) else None for d in separation]
    vectors = Vectors(layers, {"pirate": direction}, meta)
    out.mkdir(parents=True, exist_ok=True)
    path = vectors.save(out / "pirate.safetensors")

    table = Table(title="2. The direction, layer by layer (every 3rd)")
    for column in ("layer", "pirate proj.", "plain proj.", "separation (d)"):
        table.add_column(column, justify="right")
    for i in range(0, model.n_layers, 3):
        mark = " ←" if i == layer else ""
        table.add_row(
            f"{i}{mark}", f"{pos_proj[:, i].mean():.2f}", f"{neg_proj[:, i].mean():.2f}", f"{separation[i]:.1f}"
        )
    console.print(table)
    console.print(
        f"  chosen layer {layer} (best separation in the middle of the network); saved to {path} as its default "
        "layer (`personaxis serve --vectors` steers and monitors there)",
        markup=False, highlight=False,
    )  # fmt: skip

    console.print(f"[bold]3. Steering a plain prompt along it at layer {layer}[/bold] ({PROBE!r}, no system prompt)")
    probe = [[{"role": "user", "content": PROBE}]]
    monitor = project_op(vectors, layer)
    table = Table()
    for column in ("coef (× mean norm)", "projection", "reply"):
        table.add_column(column)
    with progress_bar(transient=True) as bar:
        task = bar.add_task("steering", total=len(COEFS))
        for coef in COEFS:
            ops = [monitor] + ([steer_op(vectors, coef, layer, units="relative")] if coef else [])
            reply = generate(model, probe, Sampling(max_new_tokens=max_tokens), ops=ops)[0]
            table.add_row(f"{coef:+g}", f"{reply.projections['pirate'].nanmean():.2f}", reply.text.replace("\n", " "))
            bar.advance(task)
    console.print(table)
    return vectors
