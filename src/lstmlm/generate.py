"""Sampling text from a trained model: temperature, top-k, nucleus (top-p), several samples at once."""

from __future__ import annotations

from collections.abc import Iterator

import torch

from .data import EOS, Vocab
from .errors import LstmlmError
from .model import LSTMLM

MAX_TOKENS_LIMIT = 100_000


def check_sampling(max_tokens: int, temperature: float, top_k: int, top_p: float,
                   num_samples: int) -> None:
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
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        logits[drop] = float("-inf")
    return logits


def encode_prompt(vocab: Vocab, prompt: str) -> tuple[list[int], list[str]]:
    """Token ids of a prompt (`<eos>` at each line end but the last) and its unknown words."""
    lines = prompt.split("\n")
    if not prompt.split():
        raise LstmlmError("the prompt is empty; pass some words, e.g. --prompt 'The meaning of'")
    words = [w for i, line in enumerate(lines)
             for w in line.split() + ([EOS] if i < len(lines) - 1 else [])]
    unknown = [w for w in words if w not in vocab.index]
    return [vocab.index.get(w, vocab.unk_id) for w in words], unknown


@torch.no_grad()
def sample(model: LSTMLM, prompt_ids: list[int], max_tokens: int, temperature: float = 1.0,
           top_k: int = 0, top_p: float = 1.0, num_samples: int = 1,
           seed: int | None = None) -> Iterator[torch.Tensor]:
    """Yield, at each step, the next token of each of `num_samples` continuations (one batch)."""
    model.eval()
    device = model.decoder.weight.device
    generator = torch.Generator(device=device)
    if seed is None:
        generator.seed()  # not torch.seed(), which would reseed the global generator
    else:
        generator.manual_seed(seed)
    prompt = torch.tensor(prompt_ids, device=device).unsqueeze(1)
    logits, hidden = model(prompt, model.init_hidden(1))
    logits = logits[-1].expand(num_samples, -1)
    hidden = [(h.expand(-1, num_samples, -1).contiguous(), c.expand(-1, num_samples, -1).contiguous())
              for h, c in hidden]
    for _ in range(max_tokens):
        if temperature == 0:
            next_ids = logits.argmax(-1)
        else:
            probs = torch.softmax(filter_logits(logits / temperature, top_k, top_p), dim=-1)
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
