"""Starting a run from another run's weights (`--init-from RUN`), on data with its own
vocabulary, as ULMFiT (Howard & Ruder 2018) adapts a model trained on a large corpus to a
small one.

The LSTM layers carry over as they are. The word-indexed weights (the embedding, the
decoder's rows and biases) are rebuilt for the new vocabulary: a word that both vocabularies
hold keeps its trained row, and a new word starts from the mean of the trained rows (as in
ULMFiT), which training on the new data then corrects. The mean draws nothing from the random
generator; rows drawn as at initialisation did as well on Penn Treebank (docs/results.md).
"""

from __future__ import annotations

import torch

from . import checkpoint as ckpt
from .data import Vocab
from .model import LSTMLM

# Rows indexed by word id, whatever the decoder (an adaptive softmax's tail matrices are
# handled cluster by cluster below).
WORD_ROWS = ("embedding.weight", "decoder.weight", "decoder.bias")


def word_rows(trained: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """Row i is `trained[ids[i]]`, or the mean row where `ids[i]` is -1 (a new word)."""
    rows = trained.mean(0).expand(len(ids), *trained.shape[1:]).clone()
    known = ids >= 0
    rows[known] = trained[ids[known]]
    return rows


def cluster_ids(ids: torch.Tensor, new_bounds: list[int], old_bounds: list[int],
                k: int) -> torch.Tensor:
    """For the words of the new model's cluster k: their rows in the trained model's cluster k
    matrix, -1 for a word that was not in that cluster (its row there means nothing: each
    cluster has its own projection)."""
    old = ids[new_bounds[k]:new_bounds[k + 1]]
    inside = (old >= old_bounds[k]) & (old < old_bounds[k + 1])
    return torch.where(inside, old - old_bounds[k], -1)


def transfer_weights(model: LSTMLM, vocab: Vocab, trained: LSTMLM,
                     trained_vocab: Vocab) -> tuple[int, list[str]]:
    """Set `model` (built for `vocab`) from `trained`, a model of the same shape settings built
    for `trained_vocab`. Returns how many words kept their trained rows, and the parameters
    that keep (some of) their fresh initial values: an adaptive softmax's tail clusters that
    only the new, larger vocabulary reaches (a cutoff at or past a vocabulary's size makes no
    cluster)."""
    ids = torch.tensor([trained_vocab.index.get(w, -1) for w in vocab.words], dtype=torch.long)
    tensors = ckpt.model_tensors(trained)
    fresh = []
    with torch.no_grad():
        for name, param in ckpt.model_tensors(model).items():
            weight = tensors.get(name)
            if weight is None:  # a tail cluster the trained model did not have
                fresh.append(name)
                continue
            if name in WORD_ROWS:
                weight = word_rows(weight, ids)
            elif name.startswith("decoder.words."):
                k = int(name.rsplit(".", 1)[1])
                weight = word_rows(weight, cluster_ids(ids, model.decoder.bounds,
                                                       trained.decoder.bounds, k))
            elif name in ("decoder.clusters", "decoder.cluster_bias"):  # a row per tail cluster
                shared = min(len(weight), len(param))
                if shared < len(param):
                    fresh.append(name)
                weight = torch.cat([weight[:shared], param[shared:].to(weight.device)])
            param.copy_(weight)
    return int((ids >= 0).sum()), fresh
