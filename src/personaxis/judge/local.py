"""A judge run in-process: any Hugging Face causal LM and its tokenizer, already loaded.

The prompt is rendered with the tokenizer's chat template (or a plain ``User: ...\\nAssistant:`` when it has none)
and the judge's answer distribution is read from the model's logits, exactly, not from a top-20 list.

Why a tree: many tokenizers have no single token for "42" or "100" (Qwen, Gemma and Llama-2 split numbers into digits,
Llama-3 into groups of up to three), so the first token's distribution over "0".."9" cannot tell 1 from 10–19 or 100.
We therefore follow digit tokens: the probability that the answer is the integer k is the sum, over the ways of writing
k as tokens, of the probability of those tokens times the probability that the next token does not start with a digit.
One whitespace token may come before the number (SentencePiece models often emit "▁" first), and a first token may
carry leading whitespace (" 42"). Each level of the tree is one batched forward pass over all prompts.

Two rules keep it cheap, and say exactly what is computed:
- a prefix that no digit token can extend within 0..hi (say "42" for hi = 100, or "0") is a leaf: its continuation
  is not inspected (the same convention as reading only the first token of a single-token number);
- a prefix whose probability is below `prune` is a leaf as well. Each such prefix moves a 0–100 score by at most
  ``100 · prune / mass``, so the default 1e-4 keeps the error under a point even with dozens of pruned prefixes, while
  only the few prefixes the judge actually considers get expanded. `prune=0` expands every extendable prefix.
With a tokenizer that has every number as one token and a confident judge, nothing gets expanded beyond the first pass.
The prompt is encoded once: its keys and values are kept from the first pass and every deeper level runs only the
answer tokens on top of them (for models whose KV cache is plain tensors; others re-encode prompt and answer).
A token such as "5." or "5x" that starts with a digit but is not all digits neither counts nor ends a number.
"""

from __future__ import annotations

import inspect
import os
from collections import defaultdict
from dataclasses import dataclass
from typing import Any

import torch

from personaxis.judge.base import Judge
from personaxis.judge.scoring import MIN_MASS, Distribution, parse_integer
from personaxis.model.cache import cache_argument, returned_cache, row_kv, spliceable, stack_rows
from personaxis.store import RunStore


@dataclass(frozen=True)
class _Vocab:
    """Which tokens can start, continue or precede a number, from their decoded text."""

    first: tuple[tuple[int, str], ...]  # all digits after optional leading whitespace: (id, digits)
    more: tuple[tuple[int, str], ...]  # all digits, no leading whitespace: can continue a number
    blank: tuple[int, ...]  # whitespace only: may precede the number once
    digit_start: torch.Tensor  # ids whose text starts with a digit: the number would go on

    @classmethod
    def of(cls, tokenizer: Any) -> _Vocab:
        n = len(tokenizer)
        texts = tokenizer.batch_decode(
            [[i] for i in range(n)], skip_special_tokens=False, clean_up_tokenization_spaces=False
        )
        pieces = tokenizer.convert_ids_to_tokens(list(range(n)))
        special = set(tokenizer.all_special_ids)
        first, more, blank, digit_start = [], [], [], []
        for i, (text, piece) in enumerate(zip(texts, pieces, strict=True)):
            if i in special:
                continue
            body = text.lstrip()
            # SentencePiece may drop a token's leading space when decoding it alone; its piece still shows "▁".
            spaced = body != text or str(piece).startswith("▁")
            if body.isascii() and body.isdigit():
                first.append((i, body))
                if not spaced:
                    more.append((i, body))
            elif text and not body:
                blank.append(i)
            if not spaced and text[:1].isascii() and text[:1].isdigit():
                digit_start.append(i)
        return cls(tuple(first), tuple(more), tuple(blank), torch.tensor(digit_start, dtype=torch.long))


@dataclass(frozen=True)
class _Node:
    row: int  # which prompt
    ids: tuple[int, ...]  # answer tokens so far
    digits: str  # the number they spell so far ("" before the first digit)
    prob: float


class LocalJudge(Judge):
    """Judge with a local causal LM (duck-typed: ``model(input_ids=..., attention_mask=...).logits``).

    Pass the model in eval mode, on the device you want it to run on. The default `judge_id`, which keys the cache,
    is the model's name and, when it was loaded from the Hub, its commit; pass your own to tell apart finetunes saved
    under one name. `chat_template_kwargs` go to the chat template (the default turns thinking off where a template
    supports it: the judge must answer at once).
    """

    def __init__(
        self,
        model: Any,
        tokenizer: Any,
        *,
        batch_size: int = 8,
        prune: float = 1e-4,
        cache: RunStore | str | os.PathLike[str] | None = None,
        min_mass: float = MIN_MASS,
        judge_id: str | None = None,
        chat_template_kwargs: dict[str, Any] | None = None,
    ) -> None:
        config = getattr(model, "config", None)
        name = getattr(config, "_name_or_path", "") or type(model).__name__
        commit = getattr(config, "_commit_hash", None)
        super().__init__(judge_id or f"local:{name}" + (f"@{commit}" if commit else ""), cache=cache, min_mass=min_mass)
        self.model = model
        self.tokenizer = tokenizer
        self.batch_size = batch_size
        self.prune = prune
        self.chat_template_kwargs = {"enable_thinking": False} if chat_template_kwargs is None else chat_template_kwargs
        self._vocab = _Vocab.of(tokenizer)
        self._pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        params = inspect.signature(model.forward).parameters
        self._takes = {p for p in ("position_ids", "logits_to_keep", "use_cache") if p in params}
        self._cache_name = cache_argument(model)
        # prompts keep their keys and values until a cache turns out not to splice:
        self._reuse = {"position_ids", "use_cache"} <= self._takes and self._cache_name is not None

    def prompt_ids(self, prompt: str) -> list[int]:
        """The judge prompt as the model sees it: one user turn, then the start of the assistant's reply."""
        tok = self.tokenizer
        if getattr(tok, "chat_template", None):
            text = tok.apply_chat_template(
                [{"role": "user", "content": prompt}],
                tokenize=False,
                add_generation_prompt=True,
                **self.chat_template_kwargs,
            )
            return list(tok(text, add_special_tokens=False)["input_ids"])
        return list(tok(f"User: {prompt}\nAssistant:")["input_ids"])

    def _number_probs(self, prompts: list[str], hi: int) -> list[Distribution]:
        vocab = self._vocab
        first = [(i, d) for i, d in vocab.first if parse_integer(d, hi) is not None]
        first_ids = torch.tensor([i for i, _ in first], dtype=torch.long)
        more_ids = torch.tensor([i for i, _ in vocab.more], dtype=torch.long)
        blank_ids = torch.tensor(vocab.blank, dtype=torch.long)
        can_grow = _Grower(tuple(d for _, d in vocab.more), hi)

        starts = [self.prompt_ids(p) for p in prompts]
        found: list[defaultdict[int, float]] = [defaultdict(float) for _ in prompts]
        raw: list[str | None] = [None] * len(prompts)
        frontier = [_Node(row, (), "", 1.0) for row in range(len(prompts))]
        kept: dict[int, list] = {}  # prompt row -> its keys and values, from the first pass
        while frontier:
            if not frontier[0].ids:
                dists = self._next_token_probs(starts, keep=kept if self._reuse else None)
            elif len(kept) == len(starts):
                dists = self._answer_probs([kept[n.row] for n in frontier], [len(starts[n.row]) for n in frontier],
                                           [n.ids for n in frontier])  # fmt: skip
            else:
                dists = self._next_token_probs([starts[n.row] + list(n.ids) for n in frontier])
            grown: list[_Node] = []
            for node, p in zip(frontier, dists, strict=True):
                if not node.ids:
                    raw[node.row] = self.tokenizer.decode([int(p.argmax())], skip_special_tokens=False)
                if node.digits:
                    stop = 1.0 - float(p[vocab.digit_start].sum())
                    found[node.row][int(node.digits)] += node.prob * max(stop, 0.0)
                    options = [(i, node.digits + d) for i, d in vocab.more]
                    probs = p[more_ids].tolist()
                else:
                    options = first
                    probs = p[first_ids].tolist()
                    if not node.ids:  # one whitespace token may come before the number
                        for i, q in zip(vocab.blank, p[blank_ids].tolist(), strict=True):
                            if q * node.prob >= self.prune and q > 0:
                                grown.append(_Node(node.row, (i,), "", node.prob * q))
                for (i, digits), q in zip(options, probs, strict=True):
                    q *= node.prob
                    if q <= 0 or int(digits) > hi:
                        continue
                    if q >= self.prune and can_grow(digits):
                        grown.append(_Node(node.row, (*node.ids, i), digits, q))
                    else:
                        found[node.row][int(digits)] += q
            frontier = grown
        return [Distribution(dict(f), r) for f, r in zip(found, raw, strict=True)]

    @torch.inference_mode()
    def _answer_probs(
        self, prompt_kv: list[list], prompt_lens: list[int], answers: list[tuple[int, ...]]
    ) -> torch.Tensor:
        """Next-token probabilities after prompt + answer tokens, running only the answers on the prompts' kept
        keys and values (every answer of one tree level has the same length). [len(answers), vocab], float64, CPU."""
        device = getattr(self.model, "device", None) or next(self.model.parameters()).device
        out = []
        for start in range(0, len(answers), self.batch_size):
            chunk = range(start, min(start + self.batch_size, len(answers)))
            width, steps = max(prompt_lens[i] for i in chunk), len(answers[start])
            mask = torch.zeros(len(chunk), width + steps, dtype=torch.long)
            for r, i in enumerate(chunk):
                mask[r, width - prompt_lens[i] :] = 1
            positions = torch.tensor([[prompt_lens[i] + k for k in range(steps)] for i in chunk])
            kwargs: dict[str, Any] = {
                "input_ids": torch.tensor([answers[i] for i in chunk]).to(device),
                "attention_mask": mask.to(device),
                "position_ids": positions.to(device),
                self._cache_name: stack_rows([prompt_kv[i] for i in chunk]),
                "use_cache": True,
            }
            if "logits_to_keep" in self._takes:
                kwargs["logits_to_keep"] = 1
            out.append(self.model(**kwargs).logits[:, -1].float().softmax(-1).double().cpu())
        return torch.cat(out)

    @torch.inference_mode()
    def _next_token_probs(self, seqs: list[list[int]], keep: dict[int, list] | None = None) -> torch.Tensor:
        """Next-token probabilities after each sequence, [len(seqs), vocab], float64 on the CPU.

        Sequences are batched by length. With `position_ids` support they are left-padded (positions counted from
        each row's first real token), so only the last position's logits are needed; otherwise right-padded.
        `keep` (left padding only) receives each sequence's keys and values, by index, when the cache allows it.
        """
        order = sorted(range(len(seqs)), key=lambda i: len(seqs[i]))
        out: list[torch.Tensor] = [torch.empty(0)] * len(seqs)
        device = getattr(self.model, "device", None) or next(self.model.parameters()).device
        left = "position_ids" in self._takes
        for start in range(0, len(order), self.batch_size):
            rows = order[start : start + self.batch_size]
            width = max(len(seqs[i]) for i in rows)
            ids = torch.full((len(rows), width), self._pad, dtype=torch.long)
            mask = torch.zeros_like(ids)
            for r, i in enumerate(rows):
                span = slice(width - len(seqs[i]), width) if left else slice(0, len(seqs[i]))
                ids[r, span] = torch.tensor(seqs[i], dtype=torch.long)
                mask[r, span] = 1
            kwargs: dict[str, Any] = {"input_ids": ids.to(device), "attention_mask": mask.to(device)}
            if left:
                kwargs["position_ids"] = (mask.cumsum(-1) - 1).clamp(min=0).to(device)
                if "logits_to_keep" in self._takes:
                    kwargs["logits_to_keep"] = 1
            if "use_cache" in self._takes:
                kwargs["use_cache"] = keep is not None and left
            result = self.model(**kwargs)
            if kwargs.get("use_cache"):
                cache = returned_cache(result)
                if spliceable(cache):
                    keep.update({i: row_kv(cache, r, len(seqs[i])) for r, i in enumerate(rows)})
                else:  # sliding windows or recurrent state: re-encode the prompts instead
                    self._reuse = False
                    keep = None
            logits = result.logits
            last = logits[:, -1] if left else logits[torch.arange(len(rows)), mask.sum(-1).to(logits.device) - 1]
            probs = last.float().softmax(-1).double().cpu()
            for r, i in enumerate(rows):
                out[i] = probs[r]
        return torch.stack(out)


class _Grower:
    """Whether some continuation token keeps a digit prefix a number within 0..hi (memoized)."""

    def __init__(self, more: tuple[str, ...], hi: int) -> None:
        self.more, self.hi = more, hi
        self.memo: dict[str, bool] = {}

    def __call__(self, digits: str) -> bool:
        if digits not in self.memo:
            self.memo[digits] = digits != "0" and any(int(digits + d) <= self.hi for d in self.more)
        return self.memo[digits]
