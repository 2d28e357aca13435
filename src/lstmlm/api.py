"""The Python API: `lstmlm.load(run_dir)` and what the loaded model can do."""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import torch

from .allocator import keep_freed_memory
from .checkpoint import load_run
from .data import EOS, split_lines
from .errors import LstmlmError
from .evaluate import perplexity, progress_bar
from .generate import check_sampling, detokenize, encode_prompt, sample


class LanguageModel:
    """A trained model with its vocabulary and config, ready for inference."""

    def __init__(self, run_dir: str | Path, device: str = "cpu"):
        if not isinstance(run_dir, (str, os.PathLike)):
            raise LstmlmError(f"run_dir must be a path, got {type(run_dir).__name__} "
                              f"{run_dir!r:.40}")
        keep_freed_memory()
        self.run_dir = Path(run_dir).expanduser()
        self.config, self.vocab, self.model = load_run(self.run_dir, device)

    def encode(self, prompt: str) -> list[int]:
        """Token ids of a prompt, read as the start of a line (after `<eos>`)."""
        (ids,) = self._encode([prompt])
        return ids

    def _encode(self, prompts: list[str]) -> list[list[int]]:
        """Ids of each prompt; one warning, pointing at the caller of the public method
        (encode, generate), for all their unknown words."""
        encoded = [encode_prompt(self.vocab, text_argument(p, "a prompt")) for p in prompts]
        unknown = [w for _, words in encoded for w in words]
        if unknown:
            warnings.warn(unknown_words(unknown, "prompt word(s)", "read"), stacklevel=3)
        return [ids for ids, _ in encoded]

    def generate(self, prompt: str | list[str] = "", max_tokens: int = 50, temperature: float = 1.0,
                 top_k: int = 0, top_p: float = 1.0, seed: int | None = None,
                 num_samples: int = 1):
        """Continuation(s) of `prompt` (without the prompt; with none, the text starts a new
        line). Greedy when temperature is 0.

        One prompt gives a string (a list of `num_samples` strings if more than one). A list of
        prompts, of any lengths, gives a list with one such answer per prompt: prompts are read
        in groups of equal length (an LSTM cannot left-pad without masking), then all the
        continuations are sampled as one batch."""
        check_sampling(max_tokens, temperature, top_k, top_p, num_samples, seed)
        if not isinstance(prompt, (str, list, tuple)):
            raise LstmlmError(f"prompt must be a string or a list of strings, got "
                              f"{type(prompt).__name__}")
        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        if not prompts:
            raise LstmlmError("no prompts given; pass a string or a non-empty list of strings")
        steps = list(sample(self.model, self._encode(prompts), max_tokens,
                            temperature, top_k, top_p, num_samples, seed))
        ids = torch.stack(steps, dim=1).tolist()  # prompt-major: prompt 0's samples first
        texts = [detokenize(self.vocab.decode(row)) for row in ids]
        answers = [texts[i] if num_samples == 1 else texts[i: i + num_samples]
                   for i in range(0, len(texts), num_samples)]
        return answers[0] if isinstance(prompt, str) else answers

    def score(self, texts: list[str], continue_state: bool = False,
              per_token: bool = False, progress: str = "") -> list[dict]:
        """Log-probability (natural log) of each text, every line of it ending with `<eos>`.

        Each result is {"text", "logprob", "tokens" (words + <eos>), "ppl"}, plus "per_token"
        ([{"token", "logprob"}, ...]) when asked. Unknown words are scored as `<unk>`. Each
        text starts from a fresh state that has just read `<eos>`, as if it began a new line of
        the corpus; with `continue_state`, from the state the previous text left (one document).
        With a `progress` label, a bar of the tokens scored is shown while stderr is a terminal.
        """
        if isinstance(texts, str):
            raise LstmlmError("score takes a list of texts; for one text pass [text]")
        for name, value in (("continue_state", continue_state), ("per_token", per_token)):
            if not isinstance(value, bool):
                raise LstmlmError(f"{name} must be True or False, got {value!r:.40}")
        try:
            texts = list(texts)
        except TypeError:
            raise LstmlmError(f"score takes a list of texts, got {type(texts).__name__}") from None
        return self._score(texts, continue_state, per_token, progress)

    @torch.no_grad()
    def _score(self, texts: list[str], continue_state: bool = False,
               per_token: bool = False, progress: str = "") -> list[dict]:
        # The warning points at the caller of score or perplexity: stacklevel 4, as this
        # method's no_grad wrapper is a frame of its own.
        word_lists = [[w for line in split_lines(text_argument(text, "a text"))
                       for w in line.split() + [EOS]] for text in texts]
        unknown = [w for words in word_lists for w in words if w not in self.vocab.index]
        if unknown:
            warnings.warn(unknown_words(unknown, "word(s)", "scored"), stacklevel=4)
        model = self.model.eval()
        eos = torch.tensor([[self.vocab.eos_id]], device=model.embedding.weight.device)
        fresh_features, _, fresh_hidden = model.features(eos, model.init_hidden(1))
        features, hidden = fresh_features[-1], fresh_hidden
        results = []
        with progress_bar(sum(map(len, word_lists)), progress) as bar:
            for text, words in zip(texts, word_lists):
                ids = torch.tensor([self.vocab.index.get(w, self.vocab.unk_id) for w in words],
                                   device=eos.device)
                log_probs, next_features, next_hidden = self._read(ids, features, hidden)
                if continue_state:
                    features, hidden = next_features, next_hidden
                logprob = log_probs.double().sum().item()
                result = {"text": text, "logprob": logprob, "tokens": len(words),
                          "ppl": perplexity(-logprob / len(words))}
                if per_token:
                    result["per_token"] = [{"token": w, "logprob": lp}
                                           for w, lp in zip(words, log_probs.tolist())]
                results.append(result)
                bar.update(len(words))
        return results

    def _read(self, ids: torch.Tensor, features: torch.Tensor, hidden, chunk: int = 1024):
        """Log-probabilities of `ids` given the last layer's output `features` (1, size) that
        predicts the first of them and the state `hidden`, then the features and state after
        reading them. In chunks of `chunk` tokens, each scored by the model's
        `target_log_probs`, which never holds the chunk's logits."""
        log_probs = []
        for start in range(0, len(ids), chunk):
            x = ids[start: start + chunk]
            out, _, hidden = self.model.features(x.unsqueeze(1), hidden)
            predicting = torch.cat([features, out[:-1, 0]])
            log_probs.append(self.model.target_log_probs(predicting, x))
            features = out[-1:, 0]
        return torch.cat(log_probs), features, hidden

    def perplexity(self, text: str) -> float:
        """Perplexity of `text` (an `<eos>` after each line), starting from a fresh state
        after an `<eos>`, as if the text began a new line of the corpus."""
        return self._score([text])[0]["ppl"]


def unknown_words(unknown: list[str], what: str, done: str) -> str:
    """The warning for words the vocabulary lacks: how many, and the first five."""
    shown = ", ".join(unknown[:5]) + (", ..." if len(unknown) > 5 else "")
    return f"{len(unknown)} {what} not in the vocabulary, {done} as <unk>: {shown}"


def text_argument(value, what: str) -> str:
    if not isinstance(value, str):
        raise LstmlmError(f"{what} must be a string, got {type(value).__name__} {value!r:.40}")
    return value


def load(run_dir: str | Path, device: str = "cpu") -> LanguageModel:
    """Load a run directory's best weights for generation and scoring, on `device` (cpu, cuda
    or auto: cuda when there is one)."""
    return LanguageModel(run_dir, device)
