import os
from pathlib import Path

import pytest
import torch

# The tests use tiny models, which only lose time to threads waiting for each other.
torch.set_num_threads(1)
os.environ.setdefault("OMP_NUM_THREADS", "1")  # for the CLI subprocesses


@pytest.fixture(autouse=True)
def isolated_cache(monkeypatch, tmp_path):
    """Tokenized corpora go to a per-test folder, never to ~/.cache."""
    monkeypatch.setenv("LSTMLM_CACHE", str(tmp_path / "cache"))


@pytest.fixture
def two_threads():
    """Both cores, for work at real sizes (the tiny models run on one thread, above)."""
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """The real corpora (`../shared/data` beside the repo, or `$LSTMLM_TEST_DATA`).

    Missing data skips the test locally and fails it in CI (`$CI` set).
    """
    root = Path(os.environ.get("LSTMLM_TEST_DATA",
                               Path(__file__).resolve().parents[1].parent / "shared" / "data"))
    if not root.is_dir():
        message = f"test data not found at {root} (set LSTMLM_TEST_DATA)"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    return root


# Five sentences without shared words: a tiny LSTM learns their word order in one epoch.
TINY_SENTENCES = ("the cat sat on the mat", "a dog ate my bone", "some birds sang in trees",
                  "his fish swam through ponds", "our cow grazed near hills")


@pytest.fixture(scope="session")
def tiny_corpus(tmp_path_factory) -> Path:
    """A data directory (train/valid/test.txt) of the TINY_SENTENCES in a seeded random order."""
    import random

    directory = tmp_path_factory.mktemp("tiny_corpus")
    rng = random.Random(0)
    for split, lines in (("train", 1200), ("valid", 100), ("test", 100)):
        text = "".join(rng.choice(TINY_SENTENCES) + "\n" for _ in range(lines))
        (directory / f"{split}.txt").write_text(text, encoding="utf-8")
    return directory


@pytest.fixture(scope="session")
def tiny_run(tiny_corpus, tmp_path_factory) -> Path:
    """A run directory trained for one epoch on `tiny_corpus` (about a second on one thread).

    Treat it as read-only: copy it (shutil.copytree) before damaging or resuming it.
    """
    from lstmlm.config import Config
    from lstmlm.train import run_training

    root = tmp_path_factory.mktemp("tiny_run")
    cfg = Config(data=str(tiny_corpus), embedding_size=16, hidden_size=16, num_layers=1,
                 batch_size=4, bptt=8, valid_batch_size=2, test_batch_size=2, epochs=1, lr=1.0)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("LSTMLM_CACHE", str(root / "cache"))
        run_training(cfg, out=root / "run", quiet=True)
    return root / "run"


@pytest.fixture(scope="module")
def lm(tiny_run):
    """The tiny run loaded through the Python API."""
    import lstmlm

    return lstmlm.load(tiny_run)


@pytest.fixture(scope="module")
def repeated(lm) -> torch.Tensor:
    """20 vocabulary words in a random order (nothing like the training text), 5 times: text
    that the cache pointer and dynamic evaluation should find easier than the model alone."""
    import random

    rng = random.Random(0)
    words = [w for w in lm.vocab.words if w not in ("<eos>", "<unk>")]
    sequence = [rng.choice(words) for _ in range(20)]
    return torch.tensor([lm.vocab.index[w] for w in sequence * 5])
