"""The chunked causal-LM loss (lora_ops/training/lm_loss.py): the same loss and gradients as the full logits
(float64, every chunk size), as transformers' own ``.loss`` on an adapted tiny Llama with padding, the same
training; refusals where it cannot stand in."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from support.adapter_cases import build, tiny_llama

from lora_ops.data import BatchSource
from lora_ops.training import TrainConfig, train, trainable_state
from lora_ops.training.lm_loss import causal_lm_loss, chunked_loss_unsupported, linear_cross_entropy


def _grads(fn, *tensors):
    for t in tensors:
        t.grad = None
    loss = fn()
    loss.backward()
    return loss.detach(), [t.grad.clone() if t.grad is not None else None for t in tensors]


@pytest.mark.parametrize("chunk", [1, 3, 7, 64])
@pytest.mark.parametrize("with_bias", [False, True])
def test_equals_full_cross_entropy_in_float64(chunk: int, with_bias: bool) -> None:
    gen = torch.Generator().manual_seed(0)
    hidden = torch.randn(13, 8, generator=gen, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(21, 8, generator=gen, dtype=torch.float64, requires_grad=True)
    bias = torch.randn(21, generator=gen, dtype=torch.float64, requires_grad=True) if with_bias else None
    targets = torch.randint(0, 21, (13,), generator=gen)
    leaves = [hidden, weight] + ([bias] if with_bias else [])
    full, full_grads = _grads(lambda: F.cross_entropy(F.linear(hidden, weight, bias), targets), *leaves)
    ours, grads = _grads(lambda: linear_cross_entropy(hidden, weight, targets, bias, chunk=chunk), *leaves)
    torch.testing.assert_close(ours, full, rtol=1e-13, atol=0)
    for g, ref in zip(grads, full_grads):
        torch.testing.assert_close(g, ref, rtol=1e-12, atol=1e-15)
    # a frozen projection gets no gradient, and the hidden states' gradient is unchanged by it
    weight.requires_grad_(False)
    _, (g_hidden, g_weight) = _grads(lambda: linear_cross_entropy(hidden, weight, targets, bias, chunk), hidden,
                                     weight)
    assert g_weight is None
    torch.testing.assert_close(g_hidden, full_grads[0], rtol=1e-12, atol=1e-15)


def _lm_batch(n: int = 6, length: int = 10, vocab: int = 120) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(0, vocab, (n, length), generator=gen)
    mask = torch.ones(n, length, dtype=torch.long)
    for i in range(0, n, 2):  # right padding of different lengths, as stages.common.lm.tokenize_lm makes it
        mask[i, length - 1 - i:] = 0
    labels = ids.masked_fill(mask == 0, -100)
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def _reference_loss(model, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """transformers' causal-LM loss (next-token targets, -100 ignored), kept in float64: its own upcasts to
    float32, which would hide any difference below float32 rounding."""
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    return F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), batch["labels"][:, 1:].reshape(-1),
                           ignore_index=-100)


def test_same_loss_and_gradients_as_the_models_own_loss() -> None:
    case = build("lora", model=tiny_llama())
    model = case.model.double()
    for p in model.parameters():
        p.requires_grad_(True)  # every weight, the tied embedding / output projection included
    batch = _lm_batch()
    params = [p for p in model.parameters()]

    ref, ref_grads = _grads(lambda: _reference_loss(model, batch), *params)
    ours, grads = _grads(lambda: causal_lm_loss(model, batch, chunk=5), *params)
    torch.testing.assert_close(ours, ref, rtol=1e-12, atol=0)
    for (name, _), g, r in zip(model.named_parameters(), grads, ref_grads):
        torch.testing.assert_close(g, r, rtol=1e-9, atol=1e-12, msg=name)
    # and it is the model's own .loss (computed by transformers in float32)
    own = model(**batch).loss
    assert own.dtype == torch.float32 and abs(own.item() - ours.item()) < 1e-6 * ours.item()


def test_bf16_autocast_projects_in_bf16_and_takes_the_softmax_in_float32() -> None:
    model = build("lora", model=tiny_llama()).model
    batch = _lm_batch()
    head = model.get_output_embeddings()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        own = model(**batch).loss
        ours = causal_lm_loss(model, batch, chunk=16)
        hidden = model.get_decoder()(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])[0]
    rows = hidden[:, :-1].reshape(-1, hidden.shape[-1])
    targets = batch["labels"][:, 1:].reshape(-1)
    keep = targets != -100
    # the reference made by hand: bf16 projection, float32 cross-entropy (what transformers does under autocast)
    bf16 = F.cross_entropy(F.linear(rows[keep].bfloat16(), head.weight.bfloat16()).float(), targets[keep])
    fp32 = F.cross_entropy(F.linear(rows[keep].float(), head.weight.float()), targets[keep])
    assert abs(ours.item() - bf16.item()) <= 1e-6 * bf16.item()
    assert abs(ours.item() - fp32.item()) > 10 * abs(ours.item() - bf16.item())  # it did not run in fp32
    assert abs(own.item() - ours.item()) <= 1e-4 * own.item()


def test_fp16_gradients_survive_a_large_vocabulary_before_loss_scaling() -> None:
    # (softmax - onehot) / count is ~1e-9 per logit here, below fp16's smallest subnormal (6e-8): dividing
    # before the fp16 product would zero most of the hidden states' gradient
    gen = torch.Generator().manual_seed(2)
    hidden = torch.randn(2048, 16, generator=gen, requires_grad=True)
    weight = torch.randn(8192, 16, generator=gen) * 0.1
    targets = torch.randint(0, 8192, (2048,), generator=gen)
    full = F.cross_entropy(F.linear(hidden.double(), weight.double()), targets)
    (ref,) = torch.autograd.grad(full * 65536.0, hidden)
    with torch.autocast("cpu", dtype=torch.float16):
        loss = linear_cross_entropy(hidden, weight, targets, chunk=512)
    (grad,) = torch.autograd.grad(loss * 65536.0, hidden)  # as a GradScaler scales it
    rel = float((grad.double() - ref).norm() / ref.norm())
    assert rel < 2e-3, rel


def test_no_gradient_work_under_no_grad() -> None:
    hidden = torch.randn(5, 4, requires_grad=True)
    weight = torch.randn(7, 4, requires_grad=True)
    targets = torch.tensor([0, 1, 2, 3, 4])
    with torch.no_grad():
        loss = linear_cross_entropy(hidden, weight, targets, chunk=2)
    assert not loss.requires_grad
    torch.testing.assert_close(loss, F.cross_entropy(F.linear(hidden, weight), targets).detach())


def test_training_with_the_chunked_loss_is_the_same_training() -> None:
    def run(chunk: int) -> dict[str, torch.Tensor]:
        case = build("lora", model=tiny_llama())
        model = case.model.double()
        data = BatchSource(_lm_batch(n=16), batch_size=4, shuffle=True, seed=0)
        cfg = TrainConfig(epochs=1, lr=1e-2, progress=False, checkpoint_every=0, lm_loss_chunk=chunk)
        train(model, data, cfg, loss_fn=None if chunk else _reference_loss)
        return trainable_state(model)

    full, chunked = run(0), run(7)
    assert full.keys() == chunked.keys() and full
    for name in full:
        torch.testing.assert_close(chunked[name], full[name], rtol=1e-9, atol=1e-12, msg=name)


def test_refusals() -> None:
    model = tiny_llama()
    assert chunked_loss_unsupported(model) == ""
    hidden, weight, targets = torch.randn(3, 4), torch.randn(5, 4), torch.tensor([0, 1, 2])
    with pytest.raises(ValueError, match="chunk must be >= 1"):
        linear_cross_entropy(hidden, weight, targets, chunk=0)
    with pytest.raises(ValueError, match="every label is ignored"):
        linear_cross_entropy(hidden[:0], weight, targets[:0])
    model.config.final_logit_softcapping = 30.0  # Gemma 2's logits are not the plain projection
    assert "final_logit_softcapping" in chunked_loss_unsupported(model)
    with pytest.raises(ValueError, match="chunked LM loss: .*final_logit_softcapping"):
        causal_lm_loss(model, _lm_batch())
    bert = build("lora").model  # a classifier: no decoder, no output projection
    assert chunked_loss_unsupported(bert)
    adapted_head = tiny_llama()
    adapted_head.lm_head = torch.nn.Sequential(adapted_head.lm_head)  # e.g. an adapter wrapped around lm_head
    assert "nn.Linear output projection" in chunked_loss_unsupported(adapted_head)
    seq2seq = tiny_llama()
    seq2seq.config.is_encoder_decoder = True
    assert "encoder-decoder" in chunked_loss_unsupported(seq2seq)
    with pytest.raises(ValueError, match="lm_loss_chunk"):
        train(tiny_llama(), BatchSource(_lm_batch(), batch_size=2), TrainConfig(epochs=1, progress=False,
              lm_loss_chunk=4), loss_fn=lambda m, b: m(**b).loss)
