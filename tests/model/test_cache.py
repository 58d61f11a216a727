"""The KV cache under either of its names: `cache` (transformers 5.24 on) and `past_key_values` (before)."""

import torch

from personaxis.model.cache import cache_argument, returned_cache, spliceable


def test_a_cache_passed_under_the_model_s_own_name_continues_the_sequence(tiny):
    ids = torch.tensor([[5, 6, 7, 8]])
    with torch.inference_mode():
        whole = tiny.model(input_ids=ids).logits[0, -1]
        cache = returned_cache(tiny.model(input_ids=ids[:, :3], use_cache=True))
        assert spliceable(cache) and cache.get_seq_length() == 3
        name = cache_argument(tiny.model)
        step = tiny.model(input_ids=ids[:, 3:], position_ids=torch.tensor([[3]]), use_cache=True, **{name: cache})
    assert returned_cache(step).get_seq_length() == 4
    torch.testing.assert_close(step.logits[0, -1], whole, rtol=1e-4, atol=1e-5)


def test_either_name_is_found_in_signatures_and_outputs():
    def old(self, input_ids, past_key_values=None, use_cache=None): ...
    def new(self, input_ids, cache=None, use_cache=None): ...
    def neither(self, input_ids, **kwargs): ...

    names = [cache_argument(type("M", (torch.nn.Module,), {"forward": f})()) for f in (old, new, neither)]
    assert names == ["past_key_values", "cache", None]
    marker = object()
    assert returned_cache({"logits": 0, "cache": marker}) is marker
    assert returned_cache({"logits": 0, "past_key_values": marker}) is marker
    assert returned_cache({"logits": 0}) is None
