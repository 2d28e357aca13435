"""Starting a model from a trained one on another vocabulary (`init_from`): which rows carry
over, what new words start from, and that a model moved to the same words computes the same."""

import pytest
import torch

from lstmlm.config import Config
from lstmlm.data import Vocab
from lstmlm.model import LSTMLM
from lstmlm.transfer import cluster_ids, transfer_weights, word_rows


def model(vocab: Vocab, seed: int, **kw) -> LSTMLM:
    values = dict(embedding_size=6, hidden_size=6, num_layers=2, dropout_input=0.0,
                  dropout_hidden=0.0, dropout_output=0.0)
    values.update(kw)
    torch.manual_seed(seed)
    return LSTMLM(Config(**values), len(vocab)).eval()


def vocab(*words: str) -> Vocab:
    return Vocab(["<eos>", "<unk>", *words])


def moved(trained: LSTMLM, trained_vocab: Vocab, new_vocab: Vocab, **kw):
    new = model(new_vocab, seed=99, **kw)
    kept, fresh = transfer_weights(new, new_vocab, trained, trained_vocab)
    return new, kept, fresh


def log_probs(m: LSTMLM, v: Vocab, words: list[str]) -> torch.Tensor:
    """log p of each word of `words` after the one before it, from a fresh state."""
    ids = torch.tensor([v.index[w] for w in words]).unsqueeze(1)
    with torch.no_grad():
        logits, _ = m(ids[:-1], m.init_hidden(1))
        return torch.log_softmax(logits.view(-1, len(v)), -1).gather(1, ids[1:]).squeeze(1)


def test_word_rows_copies_known_words_and_gives_new_ones_the_mean():
    trained = torch.tensor([[1.0, 2.0], [3.0, 4.0], [5.0, 9.0]])
    rows = word_rows(trained, torch.tensor([2, -1, 0, -1]))
    assert rows.tolist() == [[5.0, 9.0], [3.0, 5.0], [1.0, 2.0], [3.0, 5.0]]
    assert word_rows(torch.tensor([1.0, 2.0, 6.0]), torch.tensor([-1, 1])).tolist() == [3.0, 2.0]


@pytest.mark.parametrize("tie", [False, True])
def test_a_model_moved_to_the_same_words_in_another_order_computes_the_same(tie):
    words = ["the", "cat", "sat", "on", "mat", "dog"]
    trained_vocab, new_vocab = vocab(*words), vocab(*reversed(words))
    trained = model(trained_vocab, seed=1, tie_weights=tie)
    new, kept, fresh = moved(trained, trained_vocab, new_vocab, tie_weights=tie)
    assert kept == len(new_vocab) and fresh == []
    text = ["<eos>", "the", "cat", "sat", "on", "the", "mat", "<eos>", "dog"]
    assert torch.allclose(log_probs(new, new_vocab, text), log_probs(trained, trained_vocab, text),
                          atol=1e-6)


def test_shared_words_keep_their_rows_and_new_words_start_from_the_mean():
    trained_vocab, new_vocab = vocab("the", "cat", "sat"), vocab("dog", "cat", "ran", "the")
    trained = model(trained_vocab, seed=1)
    trained.decoder.bias.data.uniform_(-1, 1)  # zero at initialisation: make it tell rows apart
    new, kept, fresh = moved(trained, trained_vocab, new_vocab)
    assert kept == 4 and fresh == []  # <eos>, <unk>, cat, the
    for name in ("embedding.weight", "decoder.weight", "decoder.bias"):
        old, now = trained.get_parameter(name), new.get_parameter(name)
        for word in ("<eos>", "<unk>", "cat", "the"):
            assert torch.equal(now[new_vocab.index[word]], old[trained_vocab.index[word]])
        for word in ("dog", "ran"):
            assert torch.allclose(now[new_vocab.index[word]], old.mean(0))
    for name, weight in trained.layers.named_parameters():  # the LSTM carries over as it is
        assert torch.equal(new.layers.get_parameter(name), weight)


def test_cluster_ids_keep_only_the_words_that_stay_in_their_cluster():
    # New cluster 1 holds new ids 3..5; their trained ids: 4 (in trained cluster 1 = ids 2..5),
    # 1 (the head) and -1 (a new word).
    ids = torch.tensor([0, 1, 2, 4, 1, -1])
    assert cluster_ids(ids, [0, 3, 6], [0, 2, 6], 1).tolist() == [2, -1, -1]


ADAPTIVE = dict(softmax="adaptive", adaptive_cutoffs="4,8", adaptive_div_value=2.0)


def test_adaptive_clusters_take_rows_only_from_the_same_cluster():
    # Ids 0..3 are the head, 4..7 the first tail, 8.. the second (<eos> and <unk> are 0, 1).
    trained_vocab = vocab(*[f"w{i}" for i in range(10)])
    new_vocab = vocab("w0", "w2", "w1", "w3", "w6", "w4", "w5", "new", "w7", "w8", "w9")
    trained = model(trained_vocab, seed=1, **ADAPTIVE)
    new, kept, fresh = moved(trained, trained_vocab, new_vocab, **ADAPTIVE)
    assert kept == 12 and fresh == []
    old = [trained.decoder.words[k] for k in "012"]
    now = [new.decoder.words[k] for k in "012"]
    assert torch.equal(now[0][2], old[0][2])  # w0 stays in the head
    assert torch.allclose(now[0][3], old[0].mean(0))  # w2 came up from the first tail
    assert torch.allclose(now[1][0], old[1].mean(0))  # w1 went down from the head
    assert torch.equal(now[1][1], old[1][1]) and torch.equal(now[1][3], old[1][2])  # w3, w4
    assert torch.allclose(now[1][2], old[1].mean(0))  # w6 came up from the second tail
    assert torch.allclose(now[2][1], old[2].mean(0))  # a new word
    assert torch.equal(now[2][2:], old[2][1:])  # w7, w8, w9
    for name in ("clusters", "cluster_bias", "projections.0", "projections.1"):
        assert torch.equal(new.decoder.get_parameter(name), trained.decoder.get_parameter(name))


def test_a_larger_vocabulary_keeps_fresh_values_for_the_clusters_only_it_has():
    trained_vocab, new_vocab = vocab("a", "b", "c", "d"), vocab(*"abcdefghij")
    trained = model(trained_vocab, seed=1, **ADAPTIVE)  # 6 words: cutoff 8 gives no cluster
    assert len(trained.decoder.bounds) == 3
    new, kept, fresh = moved(trained, trained_vocab, new_vocab, **ADAPTIVE)
    start = model(new_vocab, seed=99, **ADAPTIVE)
    assert kept == 6 and fresh == ["decoder.clusters", "decoder.cluster_bias",
                                   "decoder.words.2", "decoder.projections.1"]
    assert torch.equal(new.decoder.clusters[0], trained.decoder.clusters[0])
    assert torch.equal(new.decoder.clusters[1], start.decoder.clusters[1])
    assert torch.equal(new.decoder.projections[1], start.decoder.projections[1])
    # ... and the other way, the trained model's extra cluster is left behind.
    back, _, fresh = moved(new, new_vocab, trained_vocab, **ADAPTIVE)
    assert fresh == [] and torch.equal(back.decoder.clusters, new.decoder.clusters[:1])
