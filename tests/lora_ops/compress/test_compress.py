"""lora_ops.compress: factor-space trimming against dense float64 math, budgets, low-bit factors."""

from __future__ import annotations

import pytest
import torch
from support.dense_reference import truncated_factors

from lora_ops.compress import (
    CompressedPair,
    GramAccumulator,
    compress_factors,
    decompose,
    decompose_output,
    decompose_svd,
    dequantize,
    max_code,
    pack_int4,
    quantize,
    ranks_at_global_budget,
    ranks_at_global_threshold,
    ranks_at_module_energy,
    unpack_int4,
)
from lora_ops.lowrank import energy_rank

OUT, IN, RANK, TOKENS = 24, 20, 8, 300
SCALING = 0.5


def _pair(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(RANK, IN, generator=g, dtype=torch.float64),
            torch.randn(OUT, RANK, generator=g, dtype=torch.float64))


def _inputs(seed: int = 1, anisotropic: bool = True, tokens: int = TOKENS) -> torch.Tensor:
    """Inputs X (in x tokens); anisotropic: a random basis with variances spread over 4 decades."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(IN, tokens, generator=g, dtype=torch.float64)
    if anisotropic:
        basis, _ = torch.linalg.qr(torch.randn(IN, IN, generator=g, dtype=torch.float64))
        x = basis @ (torch.logspace(0, -2, IN, dtype=torch.float64)[:, None] * x)
    return x


def _dense_output_optimum(delta: torch.Tensor, c: torch.Tensor, k: int) -> torch.Tensor:
    """Spec §2 in dense form: truncated SVD of ΔW L mapped back by L⁻¹ (C = L Lᵀ)."""
    chol = torch.linalg.cholesky(c)
    u, s, vh = torch.linalg.svd(delta @ chol, full_matrices=False)
    best = u[:, :k] @ torch.diag(s[:k]) @ vh[:k]
    return torch.linalg.solve_triangular(chol, best, upper=False, left=False)


def _dense_svd_truncation(delta: torch.Tensor, k: int) -> torch.Tensor:
    u, s, vh = torch.linalg.svd(delta, full_matrices=False)
    return u[:, :k] @ torch.diag(s[:k]) @ vh[:k]


def _rel(x: torch.Tensor, ref: torch.Tensor) -> float:
    return float((x - ref).norm() / ref.norm())


def _output_error(delta: torch.Tensor, approx: torch.Tensor, x: torch.Tensor) -> float:
    return float(((delta - approx) @ x).norm())


# ------------------------------------------------------------------ trimming vs dense float64
@pytest.mark.parametrize("k", range(1, RANK))
def test_output_criterion_is_the_dense_whitened_optimum_and_beats_svd(k: int) -> None:
    a, b = _pair()
    x = _inputs()
    delta = SCALING * b @ a
    gram = a @ x @ x.t() @ a.t()
    out = decompose_output(a, b, SCALING, gram, ridge=0.0)
    plain = decompose_svd(a, b, SCALING)
    w_out, w_svd = out.update(k), plain.update(k)
    assert _rel(w_out, _dense_output_optimum(delta, x @ x.t(), k)) < 1e-10
    assert _rel(w_svd, _dense_svd_truncation(delta, k)) < 1e-12
    err_out, err_svd = _output_error(delta, w_out, x), _output_error(delta, w_svd, x)
    assert err_out < err_svd * (1 - 1e-3)  # strictly better on anisotropic inputs
    # the optimum's error is exactly the discarded output energy
    assert err_out**2 == pytest.approx(float(out.energies[k:].sum()), rel=1e-9)


def test_output_criterion_never_worse_on_isotropic_inputs() -> None:
    a, b = _pair(3)
    x = _inputs(4, anisotropic=False)
    delta = SCALING * b @ a
    out = decompose_output(a, b, SCALING, a @ x @ x.t() @ a.t(), ridge=0.0)
    plain = decompose_svd(a, b, SCALING)
    rounding = 1e-12 * float((delta @ x).norm())  # at full rank both errors are rounding noise
    for k in range(RANK + 1):
        err_out = _output_error(delta, out.update(k), x)
        assert err_out <= _output_error(delta, plain.update(k), x) + rounding
        assert err_out <= _output_error(delta, _dense_output_optimum(delta, x @ x.t(), k), x) + rounding


def test_output_criterion_optimal_with_fewer_tokens_than_input_features() -> None:
    """C = X Xᵀ singular (tokens < in): the spec's L⁻¹ route fails, the factor-space one still reaches
    the Eckart-Young bound of ΔW X (no rank-k Ŵ can beat the truncated SVD of ΔW X)."""
    a, b = _pair(6)
    x = _inputs(7, tokens=12)  # 12 tokens < IN = 20 features, but > RANK, so G is definite
    delta = SCALING * b @ a
    out = decompose_output(a, b, SCALING, a @ x @ x.t() @ a.t(), ridge=0.0)
    sigma = torch.linalg.svdvals(delta @ x)
    for k in range(1, RANK):
        assert _output_error(delta, out.update(k), x) ** 2 == pytest.approx(float((sigma[k:] ** 2).sum()), rel=1e-9)


def test_component_energies_are_output_energies_and_whitened_rows_c_orthonormal() -> None:
    a, b = _pair()
    x = _inputs()
    out = decompose_output(a, b, SCALING, a @ x @ x.t() @ a.t(), ridge=0.0)
    per_component = torch.stack([(out.left[:, i:i + 1] @ out.right[i:i + 1] @ x).pow(2).sum()
                                 for i in range(out.max_rank)])
    assert torch.allclose(per_component, out.energies, rtol=1e-10, atol=0)
    assert float(out.energies.sum()) == pytest.approx(float((SCALING * b @ a @ x).pow(2).sum()), rel=1e-12)
    whitened = out.right / out.singular_values[:, None]
    assert torch.allclose(whitened @ x @ x.t() @ whitened.t(), torch.eye(RANK, dtype=torch.float64), atol=1e-10)
    assert torch.allclose(out.left.t() @ out.left, torch.eye(RANK, dtype=torch.float64), atol=1e-12)


@pytest.mark.parametrize("criterion", ["svd", "output"])
def test_all_components_reproduce_the_update_even_with_ridge(criterion: str) -> None:
    a, b = _pair()
    x = _inputs()
    d = decompose(a, b, SCALING, criterion, gram=a @ x @ x.t() @ a.t())
    assert d.max_rank == RANK
    assert _rel(d.update(RANK), SCALING * b @ a) < 1e-11
    fa, fb = d.factors(RANK, scaling=SCALING)
    assert _rel(SCALING * fb @ fa, SCALING * b @ a) < 1e-11


@pytest.mark.parametrize("energy", [0.3, 0.6, 0.9, 0.99, 1.0])
def test_svd_criterion_equals_lowrank(energy: float) -> None:
    a, b = _pair(5)
    delta = SCALING * b @ a
    ref_a, ref_b, ref_k = truncated_factors(delta, energy)
    d = decompose_svd(a, b, SCALING)
    k = d.rank_at_energy(energy)
    assert k == ref_k
    fa, fb = d.factors(k)
    assert _rel(fb @ fa, ref_b @ ref_a) < 1e-12
    # same canonical signs: lowrank's B' = U S, A' = Vᵀ; ours B' = U, A' = S Vᵀ
    s = d.singular_values[:k]
    assert torch.allclose(fb * s, ref_b, atol=1e-10) and torch.allclose(fa / s[:, None], ref_a, atol=1e-12)


@pytest.mark.parametrize("criterion", ["svd", "output"])
def test_factorisation_invariance_and_determinism(criterion: str) -> None:
    """ΔW = s (B M)(M⁻¹ A) for any invertible M: the components must not depend on M (canonical signs)."""
    a, b = _pair()
    x = _inputs()
    m = torch.randn(RANK, RANK, generator=torch.Generator().manual_seed(9), dtype=torch.float64) + 3 * torch.eye(
        RANK, dtype=torch.float64)
    a2, b2 = torch.linalg.solve(m, a), b @ m
    d1 = decompose(a, b, SCALING, criterion, gram=a @ x @ x.t() @ a.t(), ridge=0.0)
    d2 = decompose(a2, b2, SCALING, criterion, gram=a2 @ x @ x.t() @ a2.t(), ridge=0.0)
    d3 = decompose(-a, -b, SCALING, criterion, gram=a @ x @ x.t() @ a.t(), ridge=0.0)
    assert torch.allclose(d1.left, d2.left, atol=1e-9) and torch.allclose(d1.right, d2.right, atol=1e-9)
    assert torch.equal(d1.left, decompose(a, b, SCALING, criterion, gram=a @ x @ x.t() @ a.t(), ridge=0.0).left)
    assert torch.allclose(d1.left, d3.left, atol=1e-12)


def test_all_zero_update_gets_rank_zero() -> None:
    a, b = _pair()
    x = _inputs()
    gram = a @ x @ x.t() @ a.t()
    for d in (decompose_svd(a, torch.zeros_like(b), SCALING), decompose_output(a, torch.zeros_like(b), SCALING, gram),
              decompose_svd(a, b, 0.0), decompose_output(torch.zeros_like(a), b, SCALING, torch.zeros_like(gram))):
        assert d.max_rank == 0 and d.rank_at_energy(0.9) == 0
        fa, fb = d.factors(0)
        assert fa.shape == (0, IN) and fb.shape == (OUT, 0)


def test_zero_padded_pair_needs_ridge_and_keeps_its_live_components() -> None:
    """A pair trimmed by svd_trim has zero rows in A: G is singular, the default ridge handles it."""
    a, b = _pair()
    a[5:] = 0.0
    b[:, 5:] = 0.0
    x = _inputs()
    gram = a @ x @ x.t() @ a.t()
    with pytest.raises(ValueError, match="not positive definite"):
        decompose_output(a, b, SCALING, gram, ridge=0.0)
    d = decompose_output(a, b, SCALING, gram)
    assert d.max_rank == 5
    delta = SCALING * b @ a
    for k in range(1, 5):
        best = _output_error(delta, _dense_output_optimum(delta, x @ x.t(), k), x)
        assert _output_error(delta, d.update(k), x) == pytest.approx(best, rel=1e-5)
    assert _rel(d.update(5), delta) < 1e-10


# ------------------------------------------------------------------ shared pairs: one Gram over modules
def test_gram_accumulator_sums_modules_and_skips_padding() -> None:
    a, b = _pair()
    x1, x2 = _inputs(11), _inputs(12, tokens=150)
    acc = GramAccumulator(RANK)
    # module 1: a (batch=3, seq=100) batch of A x with padding that must be ignored
    batch = (a @ x1).t().reshape(3, 100, RANK)
    padded = torch.cat([batch, torch.full((3, 7, RANK), 1e3, dtype=torch.float64)], dim=1)
    mask = torch.cat([torch.ones(3, 100), torch.zeros(3, 7)], dim=1)
    acc.add(padded, mask)
    # module 2 feeds raw inputs, projected in float64 by the accumulator
    acc.add_inputs(x2.t().reshape(2, 75, IN), a)
    c1, c2 = x1 @ x1.t(), x2 @ x2.t()
    assert acc.tokens == TOKENS + 150
    assert torch.allclose(acc.gram, a @ (c1 + c2) @ a.t(), rtol=1e-12, atol=1e-9)

    delta = SCALING * b @ a
    shared = decompose_output(a, b, SCALING, acc.gram, ridge=0.0)
    only_first = decompose_output(a, b, SCALING, a @ c1 @ a.t(), ridge=0.0)

    def summed_error(w: torch.Tensor) -> float:
        return _output_error(delta, w, x1) ** 2 + _output_error(delta, w, x2) ** 2

    for k in range(1, RANK):
        dense = _dense_output_optimum(delta, c1 + c2, k)
        assert _rel(shared.update(k), dense) < 1e-10
        assert summed_error(shared.update(k)) <= summed_error(only_first.update(k)) * (1 + 1e-12)


# ------------------------------------------------------------------ low-bit factors
@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("group_size", [None, 8, 7])
def test_quantisation_error_within_half_a_step(bits: int, group_size: int | None) -> None:
    g = torch.Generator().manual_seed(2)
    x = torch.randn(6, 20, generator=g, dtype=torch.float64) * torch.logspace(0, -3, 6, dtype=torch.float64)[:, None]
    x[2] = 0.0  # an all-zero row quantises exactly
    q = quantize(x, bits, group_size)
    codes = q.int_codes()
    assert int(codes.abs().max()) == max_code(bits)
    step = q.scales.double().repeat_interleave(q.group_size, dim=1)[:, :20]
    err = (dequantize(q, torch.float64) - x).abs()
    assert bool((err <= step / 2 * (1 + 1e-12)).all())
    assert bool((dequantize(q, torch.float64)[2] == 0).all())
    assert q.scales.shape == (6, -(-20 // (group_size or 20)))


def test_int4_pack_unpack_round_trips_exactly() -> None:
    codes = torch.arange(-8, 8, dtype=torch.int8).repeat(3)[:-1]  # every code, odd count
    packed = pack_int4(codes)
    assert packed.dtype == torch.uint8 and packed.numel() == (codes.numel() + 1) // 2
    assert torch.equal(unpack_int4(packed, codes.numel()), codes)
    assert pack_int4(torch.tensor([-8, 7], dtype=torch.int8)).tolist() == [0xF0]  # low nibble first, offset 8


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("group_size", [None, 8])
def test_compressed_pair_round_trips_bit_exact_through_safetensors(bits: int, group_size: int | None) -> None:
    from safetensors.torch import load, save

    a, b = _pair()
    x = _inputs()
    d = decompose_output(a, b, SCALING, a @ x @ x.t() @ a.t())
    k = 5
    fa, fb = d.factors(k, scaling=SCALING)
    pair = compress_factors(fa, fb, SCALING, bits, group_size)
    tensors = pair.to_tensors("model.layers.0.q_proj.")
    loaded = CompressedPair.from_tensors(load(save(tensors)), "model.layers.0.q_proj.")
    for x1, x2 in zip(pair.factors(torch.float64), loaded.factors(torch.float64)):
        assert torch.equal(x1, x2)
    assert torch.equal(pair.delta_weight(), loaded.delta_weight()) and loaded.scaling == SCALING
    payload = sum(t.nbytes for name, t in tensors.items() if name.endswith((".codes", ".scales")))
    assert pair.stored_bytes() == payload
    groups_a, groups_b = -(-IN // (group_size or IN)), -(-OUT // (group_size or OUT))
    codes = k * IN + k * OUT if bits == 8 else (k * IN + 1) // 2 + (k * OUT + 1) // 2
    assert payload == codes + 4 * k * (groups_a + groups_b)
    # the quantised update stays close to the trimmed one (int8 tighter than int4)
    assert _rel(loaded.delta_weight(), d.update(k)) < (0.01 if bits == 8 else 0.2)


def test_rank_zero_pair_round_trips() -> None:
    from safetensors.torch import load, save

    pair = compress_factors(torch.zeros(0, IN), torch.zeros(OUT, 0), SCALING, 4)
    loaded = CompressedPair.from_tensors(load(save(pair.to_tensors())))
    assert loaded.rank == 0 and loaded.stored_bytes() == 0
    assert torch.equal(loaded.delta_weight(), torch.zeros(OUT, IN, dtype=torch.float64))


def test_float16_scales_halve_scale_bytes_and_refuse_overflow() -> None:
    x = torch.randn(4, 16, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    assert quantize(x, 8, scale_dtype=torch.float16).stored_bytes() == 4 * 16 + 4 * 2
    with pytest.raises(ValueError, match="does not fit in torch.float16"):
        quantize(x * 1e7, 8, scale_dtype=torch.float16)


# ------------------------------------------------------------------ rank budgets
ENERGIES = {"m.q": [8.0, 4.0, 2.0, 1.0], "m.k": [0.5, 0.3, 0.2], "m.v": [0.0, 0.0]}


def test_global_threshold_picks_expected_components() -> None:
    # adapter-normalised scores: q = 8/15, 4/15, 2/15, 1/15; k = .5, .3, .2; v = 0
    assert ranks_at_global_threshold(ENERGIES, 0.25) == {"m.k": 2, "m.q": 2, "m.v": 0}
    assert ranks_at_global_threshold(ENERGIES, 0.1) == {"m.k": 3, "m.q": 3, "m.v": 0}
    base = {"m.q": 100.0, "m.k": 1.0, "m.v": 1.0}  # scores q = .08, .04, .02, .01; k = .5, .3, .2
    assert ranks_at_global_threshold(ENERGIES, 0.03, "base", base) == {"m.k": 3, "m.q": 2, "m.v": 0}


def test_global_budget_keeps_exactly_that_many_and_ties_are_deterministic() -> None:
    for budget in range(0, 8):
        ranks = ranks_at_global_budget(ENERGIES, budget)
        assert sum(ranks.values()) == budget
    assert ranks_at_global_budget(ENERGIES, 3) == {"m.k": 2, "m.q": 1, "m.v": 0}
    assert sum(ranks_at_global_budget(ENERGIES, 100).values()) == 7  # zero-energy components never kept
    tied = {"b": [1.0, 1.0], "a": [2.0, 2.0], "c": [1.0, 1.0]}  # all scores 0.5
    assert ranks_at_global_budget(tied, 3) == {"a": 2, "b": 1, "c": 0}
    assert ranks_at_global_budget(dict(reversed(list(tied.items()))), 3) == {"a": 2, "b": 1, "c": 0}


def test_module_energy_rule_matches_lowrank() -> None:
    s = torch.tensor([3.0, 2.0, 1.0, 0.5], dtype=torch.float64)
    for energy in (0.5, 0.9, 0.99, 1.0):
        assert ranks_at_module_energy({"m": s**2, "z": [0.0]}, energy) == {"m": energy_rank(s, energy), "z": 0}


# ------------------------------------------------------------------ bad arguments
@pytest.mark.parametrize(("call", "message"), [
    (lambda: quantize(torch.ones(2, 2), 3), "bits must be 4 or 8"),
    (lambda: compress_factors(torch.ones(1, 2), torch.ones(2, 1), 1.0, 16), "bits must be 4 or 8"),
    (lambda: ranks_at_module_energy({"m": [1.0]}, 0.0), r"energy must be in \(0, 1\]"),
    (lambda: ranks_at_module_energy({"m": [1.0]}, 1.5), r"energy must be in \(0, 1\]"),
    (lambda: decompose_svd(*_pair(), 1.0).rank_at_energy(-0.1), r"energy must be in \(0, 1\]"),
    (lambda: ranks_at_global_budget({"m": [1.0]}, -1), "budget must be an integer >= 0"),
    (lambda: ranks_at_global_threshold({"m": [1.0]}, 0.0), "threshold must be finite and > 0"),
    (lambda: ranks_at_global_threshold({"m": [1.0]}, 0.1, "base"), "needs base_energy"),
    (lambda: ranks_at_global_threshold({"m": [1.0]}, 0.1, "pooled"), "normalisation must be one of"),
    (lambda: ranks_at_global_threshold({"m": [1.0, 2.0]}, 0.1), "sorted descending"),
    (lambda: decompose(*_pair(), 1.0, "asvd"), "criterion must be one of svd, output"),
    (lambda: decompose(*_pair(), 1.0, "output"), "needs gram"),
    (lambda: decompose_output(*_pair(), 1.0, torch.eye(3)), "gram must be r x r"),
    (lambda: decompose_output(*_pair(), 1.0, torch.eye(RANK), ridge=-1.0), "ridge must be >= 0"),
    (lambda: quantize(torch.ones(2, 4), 8, group_size=0), "group_size must be a positive integer"),
    (lambda: GramAccumulator(RANK).add(torch.ones(5, RANK), torch.ones(4)), "token mask has 4 entries"),
])
def test_bad_arguments_raise_value_error(call, message: str) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(ValueError, match=message):
        call()
