"""The plugin's metrics: a worker's totals, written to the shared folder, summed by the API process's collector."""

import torch
from prometheus_client import CollectorRegistry, generate_latest

from personaxis.engine.ops import Add, Cap, Project
from personaxis.serve.metrics import PROJECTION_BUCKETS
from personaxis.vllm.steps import RequestOps
from personaxis.vllm.telemetry import Collector, Totals


def _request(values: dict[int, float], prompt_len: int, hits: int, ops) -> RequestOps:
    state = RequestOps(ops, prompt_len)
    state.projections = {"monitor:axis": {3: values}}
    state.cap_hits = hits
    return state


def test_totals_of_two_processes_are_summed_at_each_scrape(tmp_path):
    unit = torch.ones(4)
    monitor, cap, steer = Project("monitor:axis", {3: unit}), Cap({3: unit}, floor=0.0), Add({3: unit})
    first, second = Totals(tmp_path, "engine-1"), Totals(tmp_path, "engine-2")
    # prompt of 3 tokens: positions 0 and 1 are prompt-only and must not count; 2.. are the reply's
    first.finished(_request({0: 100.0, 1: 100.0, 2: 1.0, 3: 3.0}, 3, 5, [monitor, cap]))
    first.finished(_request({2: -30.0}, 3, 0, [steer, monitor]))
    second.finished(_request({2: 0.5, 3: float("nan")}, 3, 2, [cap, monitor]))
    second.finished(RequestOps([steer], 3))
    first.flush(), second.flush()
    registry = CollectorRegistry()
    registry.register(Collector(tmp_path))
    text = generate_latest(registry).decode()

    def value(line_start: str) -> float:
        return float(next(line for line in text.splitlines() if line.startswith(line_start)).rsplit(" ", 1)[1])

    assert value('personaxis_requests_with_ops_total{op="cap"}') == 2
    assert value('personaxis_requests_with_ops_total{op="steer"}') == 2
    assert value('personaxis_requests_with_ops_total{op="monitor"}') == 3
    assert value("personaxis_cap_hits_total") == 7
    means = [2.0, -30.0, 0.5]  # reply positions only; a NaN is left out
    assert value('personaxis_turn_projection_count{vector="axis"}') == 3
    assert value('personaxis_turn_projection_sum{vector="axis"}') == sum(means)
    for bound in PROJECTION_BUCKETS:
        line = f'personaxis_turn_projection_bucket{{le="{float(bound)}",vector="axis"}}'
        assert value(line) == sum(m <= bound for m in means), bound


def test_reply_means_and_counts_of_one_process(tmp_path):
    unit = torch.ones(4)
    totals = Totals(tmp_path)
    totals.finished(_request({0: 100.0, 1: 100.0, 2: 1.0, 3: 3.0}, 3, 5, [Project("monitor:axis", {3: unit})]))
    totals.finished(_request({2: -30.0}, 3, 1, [Add({3: unit}), Cap({3: unit}, floor=0.0)]))
    snapshot = totals.snapshot()
    assert snapshot["requests"] == {"steer": 1, "cap": 1, "monitor": 1} and snapshot["cap_hits"] == 6
    row = snapshot["projections"]["axis"]
    means = [2.0, -30.0]  # (1 + 3) / 2 from the first reply; the prompt positions 0, 1 are left out
    assert row[-1] == 2 and row[-2] == sum(means)
    for i, bound in enumerate(PROJECTION_BUCKETS):
        assert row[i] == sum(m <= bound for m in means)
    totals.flush()
    assert list(tmp_path.glob("*.json"))
