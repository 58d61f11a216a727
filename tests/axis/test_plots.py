"""Which roles the persona-space scatter names: all of a small space, the ends of each PC in a large one."""

import random

from personaxis.axis.plots import LABEL_ALL, _labelled


def test_a_small_space_labels_every_role():
    xs = [float(i) for i in range(LABEL_ALL)]
    assert _labelled(xs, xs[::-1]) == set(range(LABEL_ALL))


def test_a_large_space_labels_the_ends_of_pc1_and_pc2():
    rng = random.Random(0)
    xs = [rng.gauss(0, 1) for _ in range(100)]
    ys = [rng.gauss(0, 1) for _ in range(100)]
    ends = set()
    for values in (xs, ys):
        ranked = sorted(values)
        ends |= {i for i, v in enumerate(values) if v <= ranked[5] or v >= ranked[-6]}
    assert _labelled(xs, ys) == ends
