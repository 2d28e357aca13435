"""The CUDA path: the same numbers as on the CPU, mixed precision, exact resume.

Skipped where torch sees no CUDA GPU (CI has none); run on a GPU machine with
`python -m pytest tests/test_gpu.py`."""

import contextlib
import json

import pytest
import torch

import lstmlm
from lstmlm import checkpoint as ckpt
from lstmlm.config import Config
from lstmlm.model import LSTMLM
from lstmlm.train import run_training
from tests.helpers import metrics, run

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU")

TINY = dict(embedding_size=16, hidden_size=24, num_layers=2, batch_size=4, bptt=8,
            valid_batch_size=2, test_batch_size=1, lr=5.0, clip=0.5, seed=5, device="cuda")
AWD = dict(TINY, variational_dropout=True, dropout_input=0.3, dropout_hidden=0.2,
           dropout_output=0.3, dropout_embedding=0.1, weight_drop=0.3, variable_bptt=True,
           ar_alpha=2.0, tar_beta=1.0, tie_weights=True, hidden_size=16, ntasgd=True,
           nonmono=1, eval_interval=4)
NO_DROPOUT = dict(dropout_input=0.0, dropout_hidden=0.0, dropout_output=0.0)


@contextlib.contextmanager
def full_fp32():
    """Plain fp32 products on the GPU (no TF32), for comparisons with the CPU."""
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


@pytest.mark.parametrize("head", [dict(), dict(tie_weights=True, last_hidden_size=16),
                                  dict(softmax="adaptive", adaptive_cutoffs="6", tie_weights=True,
                                       last_hidden_size=16)])
def test_a_step_on_the_gpu_gives_the_cpus_loss_and_gradients(tiny_corpus, head):
    cfg = Config(data=str(tiny_corpus), **dict(TINY, **NO_DROPOUT, ar_alpha=2.0, tar_beta=1.0,
                                               **head))
    torch.manual_seed(0)
    cpu = LSTMLM(cfg, 30).train()
    gpu = LSTMLM(cfg, 30).train().cuda()
    gpu.load_state_dict(cpu.state_dict())
    tokens, targets = torch.randint(0, 30, (8, 4)), torch.randint(0, 30, (32,))
    results = []
    with full_fp32():
        for model, device in ((cpu, "cpu"), (gpu, "cuda")):
            loss, penalty, _ = model.loss(tokens.to(device), targets.to(device),
                                          model.init_hidden(4))
            (loss + penalty).backward()
            results.append((loss.item(), penalty.item(),
                            {k: p.grad.cpu() for k, p in model.named_parameters()}))
    (loss_cpu, penalty_cpu, grads_cpu), (loss_gpu, penalty_gpu, grads_gpu) = results
    assert loss_gpu == pytest.approx(loss_cpu, rel=1e-5)
    assert penalty_gpu == pytest.approx(penalty_cpu, rel=1e-4) and penalty_cpu > 0
    for name, grad in grads_cpu.items():
        torch.testing.assert_close(grads_gpu[name], grad, rtol=1e-4, atol=1e-6, msg=name)


def test_awd_training_on_the_gpu_resumes_where_it_stopped(tiny_corpus, tmp_path):
    """The CUDA generator's state travels in the checkpoint: a resumed run draws the same
    dropout masks as one that never stopped."""
    cfg = dict(AWD, data=str(tiny_corpus), max_steps=16)
    straight = run_training(Config(**cfg), out=tmp_path / "a", quiet=True)
    run_training(Config(**dict(cfg, max_steps=7)), out=tmp_path / "b", quiet=True)
    resumed = run_training(resume=tmp_path / "b", overrides={"max_steps": 16}, quiet=True)
    assert resumed["steps"] == straight["steps"] == 16
    a = {m["step"]: m for m in metrics(tmp_path / "a")}
    b = {m["step"]: m for m in metrics(tmp_path / "b")}
    for step in (8, 12, 16):  # validations after the stop at step 7
        assert b[step]["train_loss"] == pytest.approx(a[step]["train_loss"], rel=1e-4)
        assert b[step]["valid_loss"] == pytest.approx(a[step]["valid_loss"], rel=1e-4)
    assert resumed["test_loss"] == pytest.approx(straight["test_loss"], rel=1e-4)


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_mixed_precision_on_the_gpu_learns_as_fp32_does(tiny_corpus, tmp_path, precision,
                                                        capsys):
    cfg = dict(TINY, data=str(tiny_corpus), epochs=2, lr=20.0, clip=0.25, **NO_DROPOUT)
    full = run_training(Config(**cfg), out=tmp_path / "fp32", quiet=True)
    mixed = run_training(Config(**cfg, precision=precision), out=tmp_path / precision)
    name = torch.cuda.get_device_name()
    assert f"parameters | on cuda ({name}), {precision} | run directory" in capsys.readouterr().err
    assert mixed["test_ppl"] < 10  # of ~30 words: the sentences' order is learnt
    assert mixed["test_ppl"] == pytest.approx(full["test_ppl"], rel=0.15)
    tensors, _ = ckpt.read_tensors(tmp_path / precision / ckpt.WEIGHTS)
    assert {t.dtype for t in tensors.values()} == {torch.float32}


@pytest.mark.filterwarnings("error:RNN module weights")  # cuDNN gathering weights at each call
def test_a_gpu_run_scores_evaluates_and_generates_as_on_the_cpu(tiny_corpus, tmp_path, capsys):
    run_dir = tmp_path / "run"
    run_training(Config(**dict(AWD, data=str(tiny_corpus), max_steps=30,
                               softmax="adaptive", adaptive_cutoffs="6")), out=run_dir, quiet=True)
    on_gpu, on_cpu = lstmlm.load(run_dir, device="cuda"), lstmlm.load(run_dir)
    assert on_gpu.model.embedding.weight.is_cuda
    text = "the cat sat on the mat\na dog ate my bone"
    greedy = dict(max_tokens=12, temperature=0)
    with full_fp32():
        assert on_gpu.perplexity(text) == pytest.approx(on_cpu.perplexity(text), rel=1e-5)
        assert on_gpu.generate("the", **greedy) == on_cpu.generate("the", **greedy)
        for method in ([], ["--cache"], ["--dynamic"]):
            ppl = {}
            for device in ("cuda", "cpu"):
                code, out, err = run(capsys, "evaluate", run_dir, "--json", "--device", device,
                                     *method)
                assert code == 0, err
                ppl[device] = json.loads(out)["ppl"]
            assert ppl["cuda"] == pytest.approx(ppl["cpu"], rel=1e-4), method
    code, out, err = run(capsys, "generate", run_dir, "--prompt", "the", "--device", "cuda",
                         "--max-tokens", "5", "--seed", "1")
    assert code == 0 and out.startswith("the"), err
