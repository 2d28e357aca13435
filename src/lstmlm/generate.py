"""Sampling text from a trained model: temperature, top-k, nucleus (top-p), several samples at once."""

from __future__ import annotations

import sys
from collections.abc import Iterator

import torch

from .config import fits_a_seed
from .data import EOS, Vocab
from .errors import LstmlmError
from .model import LSTMLM

MAX_TOKENS_LIMIT = 100_000


def check_sampling(max_tokens: int, temperature: float, top_k: int, top_p: float,
                   num_samples: int, seed: int | None = None) -> None:
    integers = {"max tokens": max_tokens, "top-k": top_k, "number of samples": num_samples}
    if seed is not None:
        integers["seed"] = seed
    for name, value in integers.items():
        if not isinstance(value, int) or isinstance(value, bool):
            raise LstmlmError(f"{name} must be an integer, got {value!r}")
    for name, value in {"temperature": temperature, "top-p": top_p}.items():
        if not isinstance(value, (int, float)) or isinstance(value, bool):
            raise LstmlmError(f"{name} must be a number, got {value!r}")
        if abs(value) > sys.float_info.max:  # an int beyond any float
            raise LstmlmError(f"{name} is too large, got {value}")
    if not 1 <= max_tokens <= MAX_TOKENS_LIMIT:
        raise LstmlmError(f"max tokens must be between 1 and {MAX_TOKENS_LIMIT:,}, got {max_tokens}")
    if not temperature >= 0:  # also refuses nan
        raise LstmlmError(f"temperature must be >= 0 (0: greedy), got {temperature}")
    if top_k < 0:
        raise LstmlmError(f"top-k must be >= 0 (0: off), got {top_k}")
    if not 0 < top_p <= 1:
        raise LstmlmError(f"top-p must be in (0, 1] (1: off), got {top_p}")
    if not 1 <= num_samples <= 1024:
        raise LstmlmError(f"number of samples must be between 1 and 1024, got {num_samples}")
    if seed is not None and not fits_a_seed(seed):
        raise LstmlmError(f"seed must be a 64-bit integer, got {seed}")


def filter_logits(logits: torch.Tensor, top_k: int = 0, top_p: float = 1.0) -> torch.Tensor:
    """Set to -inf every logit outside the top-k and outside the smallest set whose
    probability reaches top-p (the most likely token is always kept). Shape (batch, vocab)."""
    logits = logits.clone()
    if 0 < top_k < logits.size(-1):
        kth = torch.topk(logits, top_k, dim=-1).values[..., -1:]
        logits[logits < kth] = float("-inf")
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        probs = torch.softmax(sorted_logits, dim=-1)
        # Drop a token when the tokens ranked before it already reach top_p.
        drop_sorted = probs.cumsum(-1) - probs >= top_p
        drop_sorted[..., 0] = False  # even when top_p rounds to 0 in the logits' dtype
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        logits[drop] = float("-inf")
    return logits


def encode_prompt(vocab: Vocab, prompt: str) -> tuple[list[int], list[str]]:
    """Token ids of a prompt and its unknown words: `<eos>` first, so the prompt is read as
    the start of a line of the corpus (as `score` reads a text), then at each line end but
    the last. An empty prompt is `<eos>` alone: the text starts a new line."""
    lines = prompt.split("\n")
    words = [EOS] + [w for i, line in enumerate(lines)
                     for w in line.split() + ([EOS] if i < len(lines) - 1 else [])]
    unknown = [w for w in words if w not in vocab.index]
    return [vocab.index.get(w, vocab.unk_id) for w in words], unknown


@torch.no_grad()
def read_prompts(model: LSTMLM, prompts: list[list[int]]):
    """Next-token logits (prompts, vocab) and hidden state (batch = prompts) after each prompt.

    Prompts of one length are read as one batch; prompts of different lengths separately, as
    padding would feed the LSTM tokens that are not in the prompt.
    """
    device = model.embedding.weight.device
    by_length: dict[int, list[int]] = {}
    for i, ids in enumerate(prompts):
        by_length.setdefault(len(ids), []).append(i)
    order, logits, states = [], [], []
    for group in by_length.values():
        tokens = torch.tensor([prompts[i] for i in group], device=device).t()  # (time, group)
        out, hidden = model(tokens, model.init_hidden(len(group)))
        order += group
        logits.append(out[-1])
        states.append(hidden)
    back = torch.argsort(torch.tensor(order, device=device))  # back to the prompts' order
    hidden = [(torch.cat([s[layer][0] for s in states], 1)[:, back],
               torch.cat([s[layer][1] for s in states], 1)[:, back])
              for layer in range(len(model.layers))]
    return torch.cat(logits)[back], hidden


@torch.no_grad()
def sample(model: LSTMLM, prompt_ids: list[int] | list[list[int]], max_tokens: int,
           temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0, num_samples: int = 1,
           seed: int | None = None) -> Iterator[torch.Tensor]:
    """Yield, at each step, the next token of each of `num_samples` continuations of each
    prompt (one prompt's ids, or a list of prompts), all as one batch, prompt-major."""
    model.eval()
    device = model.embedding.weight.device
    generator = torch.Generator(device=device)
    if seed is None:
        generator.seed()  # not torch.seed(), which would reseed the global generator
    else:
        generator.manual_seed(seed)
    prompts = prompt_ids if prompt_ids and isinstance(prompt_ids[0], list) else [prompt_ids]
    logits, hidden = read_prompts(model, prompts)
    logits = logits.repeat_interleave(num_samples, 0)
    hidden = [(h.repeat_interleave(num_samples, 1), c.repeat_interleave(num_samples, 1))
              for h, c in hidden]
    for _ in range(max_tokens):
        if temperature == 0:
            next_ids = logits.argmax(-1)
        else:
            # Shifted so the largest is 0, and the temperature kept above what the dtype rounds
            # to 0: a tiny temperature then gives 0 and -inf (greedy), never inf - inf or 0 / 0.
            shifted = logits - logits.max(-1, keepdim=True).values
            scaled = shifted / max(float(temperature), torch.finfo(logits.dtype).tiny)
            probs = torch.softmax(filter_logits(scaled, top_k, top_p), dim=-1)
            next_ids = torch.multinomial(probs, 1, generator=generator).squeeze(1)
        yield next_ids
        logits, hidden = model(next_ids.unsqueeze(0), hidden)
        logits = logits[0]


def detokenize(words: list[str]) -> str:
    """Words joined by spaces, `<eos>` as a line break."""
    lines, line = [], []
    for word in words:
        if word == EOS:
            lines.append(" ".join(line))
            line = []
        else:
            line.append(word)
    return "\n".join(lines + [" ".join(line)])
