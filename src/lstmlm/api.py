"""The Python API: `lstmlm.load(run_dir)` and what the loaded model can do."""

from __future__ import annotations

import warnings
from pathlib import Path

import torch
import torch.nn.functional as F

from .allocator import keep_freed_memory
from .checkpoint import load_run
from .data import EOS
from .evaluate import perplexity
from .generate import check_sampling, detokenize, encode_prompt, sample


class LanguageModel:
    """A trained model with its vocabulary and config, ready for inference."""

    def __init__(self, run_dir: str | Path):
        keep_freed_memory()
        self.run_dir = Path(run_dir)
        self.config, self.vocab, self.model = load_run(self.run_dir)

    def encode(self, prompt: str) -> list[int]:
        ids, unknown = encode_prompt(self.vocab, prompt)
        if unknown:
            shown = ", ".join(unknown[:5]) + (", ..." if len(unknown) > 5 else "")
            warnings.warn(f"{len(unknown)} prompt word(s) not in the vocabulary, read as <unk>: "
                          f"{shown}", stacklevel=3)
        return ids

    def generate(self, prompt: str, max_tokens: int = 50, temperature: float = 1.0,
                 top_k: int = 0, top_p: float = 1.0, seed: int | None = None,
                 num_samples: int = 1) -> str | list[str]:
        """Continuation(s) of `prompt` (without the prompt). Greedy when temperature is 0."""
        check_sampling(max_tokens, temperature, top_k, top_p, num_samples)
        steps = list(sample(self.model, self.encode(prompt), max_tokens, temperature, top_k,
                            top_p, num_samples, seed))
        ids = torch.stack(steps, dim=1).tolist()
        texts = [detokenize(self.vocab.decode(row)) for row in ids]
        return texts[0] if num_samples == 1 else texts

    @torch.no_grad()
    def perplexity(self, text: str) -> float:
        """Perplexity of `text` (an `<eos>` after each line), starting from a fresh state
        after an `<eos>`, as if the text began a new line of the corpus."""
        lines = text.splitlines() or [""]
        words = [w for line in lines for w in line.split() + [EOS]]
        ids = [self.vocab.index.get(w, self.vocab.unk_id) for w in words]
        inputs = torch.tensor([self.vocab.eos_id] + ids[:-1]).unsqueeze(1)
        logits, _ = self.model(inputs, self.model.init_hidden(1))
        loss = F.cross_entropy(logits.squeeze(1), torch.tensor(ids))
        return perplexity(loss.item())


def load(run_dir: str | Path) -> LanguageModel:
    """Load a run directory's best weights for generation and scoring."""
    return LanguageModel(run_dir)
