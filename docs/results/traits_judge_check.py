"""How usable is a local model as the trait judge? Numeric mass and scores on a trait run's extraction replies.

usage: python docs/results/traits_judge_check.py RUN_DIR TRAIT JUDGE_MODEL [N]
Reads N rollouts of the run (half pos, half neg), asks the judge for the trait and coherence scores and prints
how much probability it put on numbers (a score needs ≥ 0.25), the scores, and the time per judgement.
"""

import statistics
import sys
import time

from personaxis.judge import LocalJudge, coherence_prompt, trait_prompt
from personaxis.model import load_model
from personaxis.store import RunStore
from personaxis.traits.library import load_trait

run, trait_name, judge_model = sys.argv[1:4]
n = int(sys.argv[4]) if len(sys.argv) > 4 else 1000
trait = load_trait(trait_name)
model = load_model(judge_model)
everything = [r for _, r in RunStore(run).items("trait_rollouts", tensors=False)]
by_polarity = {p: [r for r in everything if r.data["labels"]["polarity"] == p] for p in ("pos", "neg")}
records = by_polarity["pos"][: n // 2] + by_polarity["neg"][: n // 2]
items = [(trait.questions.extraction[r.data["labels"]["question"]], r.data["text"]) for r in records]
judge = LocalJudge(model.model, model.tokenizer, prune=1e-2)  # prune only speeds the digit tree; mass is unaffected
start = time.time()
traits = judge.score([trait_prompt(trait.rubric, q, a) for q, a in items])
coherence = judge.score([coherence_prompt(q, a) for q, a in items])
seconds = (time.time() - start) / (2 * len(items))
for name, results in (("trait", traits), ("coherence", coherence)):
    masses = [r.numeric_mass for r in results]
    defined = [r.value for r in results if r.value is not None]
    print(
        f"{name}: {len(defined)}/{len(results)} defined; numeric mass median {statistics.median(masses):.3f}, "
        f"max {max(masses):.3f}; first answers {sorted({r.raw for r in results})[:8]}"
    )
    for polarity in ("pos", "neg"):
        values = [r.value for r, rec in zip(results, records, strict=True) if rec.data["labels"]["polarity"] == polarity
                  and r.value is not None]  # fmt: skip
        if values:
            print(f"  {polarity}: mean {statistics.mean(values):.1f} over {len(values)}")
print(f"{seconds:.1f} s per judgement on this machine ({judge_model})")
