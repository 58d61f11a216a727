"""Is a screened build's lower |cos(PC1, axis)| the screen's doing, or only fewer replies per role?

Reads an unjudged axis build's stored rollouts and compares, at one layer, the build screened (replies that present
themselves as an AI dropped, roles with at least MIN_KEPT left) with builds of random replies in the same number per
role, drawn without looking at what the replies say. Usage:

    python docs/results/scripts/screen_control.py RUN_DIR [LAYER] [REPEATS]
"""

import random
import statistics
import sys

import torch

from personaxis.axis.library import load_role_rubric
from personaxis.axis.rollouts import ROLLOUT_STAGE
from personaxis.axis.space import assistant_axis, pca
from personaxis.store import RunStore

MIN_KEPT = 3


def figures(default: torch.Tensor, replies: dict[str, list[torch.Tensor]]) -> tuple[float, float]:
    """|cos(PC1, axis)| and PC1's variance share of role vectors averaged from `replies`."""
    vectors = {role: torch.stack(means).mean(0) for role, means in replies.items()}
    axis = assistant_axis(default, vectors)
    space = pca(torch.stack(list(vectors.values())), toward=axis)
    return abs(torch.nn.functional.cosine_similarity(space.components[0], axis, dim=0).item()), float(
        space.variance_ratio[0]
    )


def main(run: str, layer: int = 14, repeats: int = 10) -> None:
    rubric = load_role_rubric()
    roles: dict[str, list[tuple[bool, torch.Tensor]]] = {}
    default = []
    for _, record in RunStore(run).items(ROLLOUT_STAGE):
        labels, mean = record.data["labels"], record.tensors.get("response")
        if mean is None or not torch.isfinite(mean).all():
            continue
        if labels["kind"] == "default":
            default.append(mean[layer].float())
        elif labels["kind"] == "role":
            roles.setdefault(labels["role"], []).append(
                (rubric.presents_as_ai(record.data["text"]), mean[layer].float())
            )
    default_vector = torch.stack(default).mean(0)
    kept = {role: [m for as_ai, m in replies if not as_ai] for role, replies in roles.items()}
    kept = {role: means for role, means in kept.items() if len(means) >= MIN_KEPT}
    cos, share = figures(default_vector, kept)
    print(f"screened: {len(kept)} roles, {statistics.fmean(map(len, kept.values())):.1f} replies each on average")
    print(f"  |cos(PC1, axis)| {cos:.3f}, PC1 {100 * share:.1f}%")
    rng = random.Random(0)
    draws = [
        figures(default_vector, {role: [m for _, m in rng.sample(roles[role], len(kept[role]))] for role in kept})
        for _ in range(repeats)
    ]
    cosines, shares = [c for c, _ in draws], [s for _, s in draws]
    print(f"random replies, same count per role ({repeats} draws):")
    print(
        f"  |cos(PC1, axis)| {statistics.fmean(cosines):.3f} ± {statistics.stdev(cosines):.3f}, "
        f"PC1 {100 * statistics.fmean(shares):.1f}%"
    )


if __name__ == "__main__":
    main(sys.argv[1], *(int(a) for a in sys.argv[2:]))
