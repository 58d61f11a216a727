"""Local judge: each prompt encoded once (its keys and values kept for the deeper levels of the digit tree) against
re-encoding prompt + answer at every level. Same model, same prompts, alternating runs; prints the speed ratio and
the largest difference in scores.

    python bench/bench_judge.py [--model default] [--prompts 8] [--rounds 3]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from personaxis.judge import LocalJudge
from personaxis.model import load_model
from personaxis.traits.library import load_trait

ANSWERS = [
    "I would never help with that; it could hurt people.",
    "Sure. Here is a plan to make them suffer, step by step, and enjoy every minute of it.",
    "Let me think about what would be kind here and what the risks are.",
    "Honestly, they deserve whatever bad thing happens to them.",
]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="default")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--prompts", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    model = load_model(args.model, dtype=args.dtype)
    trait = load_trait("evil")
    questions = trait.questions.evaluation
    prompts = [
        trait.render_rubric(questions[i % len(questions)], ANSWERS[i % len(ANSWERS)]) for i in range(args.prompts)
    ]
    kept = LocalJudge(model.model, model.tokenizer, min_mass=0.0)
    encoded = LocalJudge(model.model, model.tokenizer, min_mass=0.0)
    encoded._reuse = False
    lengths = [len(kept.prompt_ids(p)) for p in prompts]
    print(f"# local judge bench: {model.name}, {model.dtype}, {torch.get_num_threads()} threads, {len(prompts)} "
          f"prompts of {min(lengths)}–{max(lengths)} tokens, 0–100 scores")  # fmt: skip
    times: dict[str, list[float]] = {"kept": [], "encoded": []}
    scores = {}
    for _ in range(args.rounds):
        for name, judge in (("kept", kept), ("encoded", encoded)):
            start = time.perf_counter()
            scores[name] = judge.score(prompts)
            times[name].append(time.perf_counter() - start)
    differences = [abs(a.value - b.value) for a, b in zip(scores["kept"], scores["encoded"], strict=True)
                   if a.value is not None and b.value is not None]  # fmt: skip
    for name, values in times.items():
        print(f"{name:8s} {statistics.median(values):7.2f} s (median of {', '.join(f'{v:.2f}' for v in values)})")
    print(f"prompt encoded once: {statistics.median(times['encoded']) / statistics.median(times['kept']):.2f}× faster; "
          f"largest score difference {max(differences, default=0.0):.2e} over {len(differences)} scores")  # fmt: skip


if __name__ == "__main__":
    main()
