"""LocalJudge: the digit tree against hand computations and a slow brute force over a tiny random Llama."""

from collections import defaultdict

import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from personaxis.judge import LocalJudge, classify_prompt, score_from
from personaxis.judge.scoring import Distribution


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny matmuls are far faster on one thread, especially on a busy machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


SPECIALS = ["<pad>", "<eos>", "<unk>"]
WORDS = ["User:", "Assistant:", "rate", "this", "answer", "hello", "REFUSAL", " ", "\n", "5x"]


def make_tokenizer(numbers: list[str], split_digits: bool) -> PreTrainedTokenizerFast:
    vocab = {w: i for i, w in enumerate(SPECIALS + WORDS + numbers)}
    tk = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    splits = [pre_tokenizers.WhitespaceSplit()]
    if split_digits:
        splits.append(pre_tokenizers.Digits(individual_digits=True))
    tk.pre_tokenizer = pre_tokenizers.Sequence(splits)
    return PreTrainedTokenizerFast(tokenizer_object=tk, unk_token="<unk>", pad_token="<pad>", eos_token="<eos>")


# Every integer 0..100 is one token, as with OpenAI's tokenizers; " 42" carries a leading space.
WHOLE = make_tokenizer([str(i) for i in range(101)] + [" 42"], split_digits=False)
# Numbers split into digits, as Qwen does, plus a few multi-digit pieces and a spaced digit.
DIGITS = make_tokenizer([str(d) for d in range(10)] + ["10", "00", " 7"], split_digits=True)


def tiny_llama(vocab_size: int, seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        initializer_range=0.5,  # peaked, varied distributions rather than near-uniform ones
        pad_token_id=0,
    )
    return LlamaForCausalLM(config).eval()


def brute_force(model, tok, prompt_ids: list[int], hi: int = 100) -> dict[int, float]:
    """P(answer is integer k), walking every way of writing k as tokens, one unbatched forward per step."""
    texts = tok.batch_decode([[i] for i in range(len(tok))], skip_special_tokens=False)
    special = set(tok.all_special_ids)
    ids = [i for i in range(len(tok)) if i not in special]

    def digits(s: str) -> bool:
        return s.isascii() and s.isdigit()

    more = [i for i in ids if digits(texts[i])]
    digit_start = [i for i in ids if texts[i][:1].isdigit()]

    def next_probs(seq: list[int]) -> torch.Tensor:
        with torch.no_grad():
            return model(torch.tensor([seq])).logits[0, -1].double().softmax(-1)

    def extendable(s: str) -> bool:
        return s != "0" and any(int(s + texts[t]) <= hi for t in more)

    out: defaultdict[int, float] = defaultdict(float)

    def number(seq: list[int], s: str, prob: float) -> None:
        if not extendable(s):
            out[int(s)] += prob
            return
        p = next_probs(seq)
        out[int(s)] += prob * (1 - p[digit_start].sum().item())
        for t in more:
            if int(s + texts[t]) <= hi:
                number(seq + [t], s + texts[t], prob * p[t].item())

    def start(seq: list[int], prob: float, blank_allowed: bool) -> None:
        p = next_probs(seq)
        for t in ids:
            body = texts[t].lstrip()
            if digits(body) and (body == "0" or body[0] != "0") and int(body) <= hi:
                number(seq + [t], body, prob * p[t].item())
            elif blank_allowed and texts[t] and not body:
                start(seq + [t], prob * p[t].item(), False)

    start(prompt_ids, 1.0, True)
    return dict(out)


PROMPTS = ["rate this", "rate this answer hello 42 hello", "hello", "answer 7 rate this answer 100"]


@pytest.mark.parametrize("tok", [WHOLE, DIGITS], ids=["whole-numbers", "digit-split"])
def test_tree_matches_brute_force(tok):
    model = tiny_llama(len(tok))
    judge = LocalJudge(model, tok, batch_size=3, prune=0.0, min_mass=0.0)
    dists = judge.number_probs(PROMPTS)
    for prompt, dist in zip(PROMPTS, dists, strict=True):
        reference = brute_force(model, tok, judge.prompt_ids(prompt))
        assert set(dist.probs) == set(reference)
        for k, p in reference.items():
            assert dist.probs[k] == pytest.approx(p, rel=1e-4, abs=1e-9), k
        assert 0.0 < dist.mass <= 1.0
        expected = sum(k * p for k, p in reference.items()) / sum(reference.values())
        assert judge.score([prompt])[0].value == pytest.approx(expected, rel=1e-4)


def test_small_classification_over_digit_tokens():
    model = tiny_llama(len(DIGITS), seed=1)
    judge = LocalJudge(model, DIGITS, prune=0.0)
    [dist] = judge.number_probs(["rate this"], hi=3)
    assert dist.probs == pytest.approx(brute_force(model, DIGITS, judge.prompt_ids("rate this"), hi=3))
    [result] = judge.classify_many(["rate this"], ["a", "b", "c", "d"])
    [options] = judge.number_probs([classify_prompt("rate this", ["a", "b", "c", "d"])], hi=3)
    assert result.probs == pytest.approx(tuple(options.probs.get(i, 0.0) for i in range(4)))
    if result.mass >= judge.min_mass:
        assert result.index == max(range(4), key=result.probs.__getitem__)


def test_pruning_changes_little():
    model = tiny_llama(len(DIGITS), seed=2)
    exact = LocalJudge(model, DIGITS, prune=0.0, min_mass=0.0).score(PROMPTS)
    pruned = LocalJudge(model, DIGITS, prune=1e-3, min_mass=0.0).score(PROMPTS)
    for a, b in zip(exact, pruned, strict=True):
        assert abs(a.value - b.value) < 100 * 10 * 1e-3 / a.numeric_mass


class ToyLM(torch.nn.Module):
    """A 'model' whose next-token distribution is a lookup on the answer so far (tokens after "Assistant:")."""

    def __init__(self, tok, table: dict[tuple[str, ...], dict[str, float]], positions: bool = True) -> None:
        super().__init__()
        self.tok, self.table = tok, table
        self.anchor = tok.convert_tokens_to_ids("Assistant:")
        self.dummy = torch.nn.Parameter(torch.zeros(1))
        if not positions:  # a model without position_ids: the judge must right-pad
            self.forward = self.forward_plain  # type: ignore[method-assign]

    def forward(self, input_ids, attention_mask, position_ids=None, use_cache=None):
        return self.forward_plain(input_ids, attention_mask)

    def forward_plain(self, input_ids, attention_mask):
        batch, width = input_ids.shape
        logits = torch.full((batch, width, len(self.tok)), -torch.inf)
        for b in range(batch):
            for t in range(width):
                seq = [int(i) for i, m in zip(input_ids[b, : t + 1], attention_mask[b, : t + 1], strict=True) if m]
                if self.anchor not in seq:
                    logits[b, t, 1] = 0.0
                    continue
                answer = seq[len(seq) - seq[::-1].index(self.anchor) :]
                dist = self.table.get(tuple(self.tok.convert_ids_to_tokens(answer)), {"<eos>": 1.0})
                for token, p in dist.items():
                    logits[b, t, self.tok.convert_tokens_to_ids(token)] = torch.tensor(p).log()
        return type("Output", (), {"logits": logits})()


@pytest.mark.parametrize("positions", [True, False], ids=["left-padded", "right-padded"])
def test_digit_tree_by_hand(positions):
    table = {
        (): {"4": 0.5, "1": 0.3, "hello": 0.2},
        ("4",): {"2": 0.6, "<eos>": 0.4},
        ("1",): {"0": 0.5, "<eos>": 0.5},
        ("1", "0"): {"0": 1.0},
    }
    judge = LocalJudge(ToyLM(DIGITS, table, positions), DIGITS, prune=0.0)
    [dist] = judge.number_probs(["rate this"])
    # 4 then stop; 4, 2 ("42" cannot grow within 0..100); 1 then stop; 1, 0, 0 (10 never stops)
    assert dist.probs == pytest.approx({4: 0.2, 42: 0.3, 1: 0.15, 10: 0.0, 100: 0.15})
    assert score_from(dist).value == pytest.approx((4 * 0.2 + 42 * 0.3 + 1 * 0.15 + 100 * 0.15) / 0.8)
    assert dist.raw == "4"
    # reading only the first token would have said (4·0.5 + 1·0.3) / 0.8 = 2.875


def test_whitespace_and_non_numbers_by_hand():
    table = {
        (): {" ": 0.4, "7": 0.6},
        (" ",): {"9": 1.0},
        ("7",): {"5": 0.5, "5x": 0.25, "\n": 0.25},
        ("7", "5"): {"0": 1.0},  # "750" is out of range: "75" is a leaf and this is never asked
    }
    [dist] = LocalJudge(ToyLM(DIGITS, table), DIGITS, prune=0.0).number_probs(["rate this"])
    assert dist.probs == pytest.approx({9: 0.4, 7: 0.15, 75: 0.3})
    assert dist.mass == pytest.approx(0.85)  # "5x" after "7" is neither 7 nor 75


def test_numeric_mass_rule():
    assert score_from(Distribution({10: 0.1, 90: 0.1})).value is None
    assert score_from(Distribution({10: 0.1, 90: 0.2})).value == pytest.approx((10 * 0.1 + 90 * 0.2) / 0.3)
    assert score_from(Distribution({})).value is None


def test_chat_template_or_plain_fallback():
    tok = make_tokenizer([str(i) for i in range(101)], split_digits=False)
    judge = LocalJudge(tiny_llama(len(tok)), tok)
    plain = judge.prompt_ids("rate this")
    assert tok.convert_ids_to_tokens(plain) == ["User:", "rate", "this", "Assistant:"]
    tok.chat_template = "{% for m in messages %}User: {{ m['content'] }} hello {% endfor %}Assistant:"
    assert tok.convert_ids_to_tokens(judge.prompt_ids("rate this")) == ["User:", "rate", "this", "hello", "Assistant:"]


def test_cache_skips_the_model(tmp_path):
    model = tiny_llama(len(WHOLE))
    calls = []
    model.register_forward_hook(lambda *a: calls.append(1))
    first = LocalJudge(model, WHOLE, cache=tmp_path).score(PROMPTS)
    n = len(calls)
    second_judge = LocalJudge(model, WHOLE, cache=tmp_path)
    second = second_judge.score(PROMPTS)
    assert len(calls) == n and second_judge.stats.cache_hits == len(PROMPTS)
    assert [r.value for r in second] == pytest.approx([r.value for r in first])


def test_deeper_levels_run_only_the_answer_tokens_on_the_kept_prompt():
    """The prompt is encoded once; later tree levels feed just the answer tokens, with the same result as
    re-encoding prompt + answer every time."""
    model = tiny_llama(len(DIGITS), seed=3)
    widths: list[int] = []
    handle = model.register_forward_pre_hook(lambda m, a, kw: widths.append(kw["input_ids"].shape[1]), with_kwargs=True)
    try:
        kept = LocalJudge(model, DIGITS, prune=0.0, min_mass=0.0).number_probs(PROMPTS)
    finally:
        handle.remove()
    longest = max(len(LocalJudge(model, DIGITS).prompt_ids(p)) for p in PROMPTS)
    first_pass = [w for w in widths if w > 3]
    assert first_pass and max(first_pass) == longest and all(w <= 3 for w in widths[len(first_pass) :])
    assert len(widths) > len(first_pass)  # the tree did go deeper
    encoded = LocalJudge(model, DIGITS, prune=0.0, min_mass=0.0)
    encoded._reuse = False
    for a, b in zip(kept, encoded.number_probs(PROMPTS), strict=True):
        assert set(a.probs) == set(b.probs)
        for k in a.probs:
            assert a.probs[k] == pytest.approx(b.probs[k], rel=1e-4, abs=1e-9), k  # float32 rounding
