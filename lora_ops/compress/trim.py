"""Rank trimming of a LoRA update ``ΔW = s·B·A`` in its small factor space (no dense ``out x in``).

Two criteria (``shared/spec/compress.md`` §1-2):

* ``svd``: the truncated SVD of ``ΔW`` (PEFT ``convert_to_lora``): best rank-k ``Ŵ`` in Frobenius
  norm, i.e. on isotropic inputs. ``B = Q_B R_B``, ``Aᵀ = Q_A R_A`` (thin QR), core
  ``K = s R_B R_Aᵀ = U S Vᵀ``; then ``ΔW = (Q_B U) S (Q_A V)ᵀ``.
* ``output``: the rank-k ``Ŵ`` minimising ``‖(ΔW − Ŵ) X‖_F`` on the calibration inputs ``X``
  (ASVD / SVD-LLM data whitening). Only ``G = A X Xᵀ Aᵀ`` (r x r) is needed: with ``G = Rᵀ R``
  (``R = chol(G)ᵀ``) the matrix ``Q_X = (A X)ᵀ R⁻¹`` has orthonormal columns and ``A X = Rᵀ Q_Xᵀ``, so
  ``ΔW X = Q_B K Q_Xᵀ`` with ``K = s R_B Rᵀ = U S Vᵀ``. Its best rank-k approximation is
  ``Q_B U_k S_k V_kᵀ Q_Xᵀ = Ŵ X`` with ``Ŵ = (Q_B U_k)(S_k V_kᵀ R⁻ᵀ A)``, and no rank-k matrix can do
  better because ``Ŵ X`` already is the Eckart–Young optimum of ``ΔW X``. This argument needs only ``G``
  to be invertible, not ``C = X Xᵀ`` (the spec's route through ``L⁻¹`` needs more tokens than input
  features); a ridge ``ε I`` with ``ε = ridge · tr(G) / r`` keeps ``G`` invertible when ``A X`` is rank
  deficient (e.g. a zero-padded trimmed pair). ``S_i²`` is the output energy of component ``i`` summed
  over the calibration tokens (plus its share of the ridge), and the energies add up to ``‖ΔW X‖²``.

Both criteria give components ``left[:, i] ⊗ right[i]`` with orthonormal ``left`` columns and the
singular value carried by ``right``'s rows (the split that keeps per-row quantisation scales
meaningful, see :mod:`lora_ops.compress.quantize`). With all components kept, ``left @ right = ΔW``
exactly for both criteria. Everything is float64.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from lora_ops.lowrank import energy_rank

CRITERIA: tuple[str, ...] = ("svd", "output")
#: default ridge, relative to the mean eigenvalue tr(G)/r of the activation Gram matrix
DEFAULT_RIDGE = 1e-6


@dataclass(frozen=True)
class Decomposition:
    """A LoRA update as ``p`` orthogonal components, sorted by energy (largest first).

    ``left`` (out x p) has orthonormal columns, ``right`` (p x in) has rows ``S_i v_iᵀ``;
    ``left[:, :k] @ right[:k]`` is the criterion's best rank-``k`` approximation of ``ΔW``.
    Components whose singular value is zero to float64 precision are dropped, so ``p`` is the
    numerical rank (0 for an all-zero update, or an update the calibration inputs never excite).
    """

    left: torch.Tensor
    right: torch.Tensor
    singular_values: torch.Tensor
    criterion: str

    @property
    def max_rank(self) -> int:
        return int(self.singular_values.numel())

    @property
    def energies(self) -> torch.Tensor:
        """``S_i²``: the share of ``‖ΔW‖²`` (svd) or of the calibration output energy (output) per component."""
        return self.singular_values**2

    def rank_at_energy(self, energy: float) -> int:
        """PEFT's rule: the smallest ``k`` whose components hold ``energy`` of ``Σ S_i²`` (0 if none)."""
        return energy_rank(self.singular_values, energy)

    def factors(self, rank: int, scaling: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
        """``(A' (k x in), B' (out x k))`` with ``scaling · B' A'`` the rank-``k`` truncation.

        ``B'`` keeps orthonormal columns; ``1 / scaling`` goes into ``A'`` so a layer that keeps its
        LoRA scaling ``s`` reproduces the truncation."""
        if not 0 <= rank <= self.max_rank:
            raise ValueError(f"rank must lie in [0, {self.max_rank}], got {rank}")
        if scaling == 0.0:
            raise ValueError("scaling must be non-zero")
        return self.right[:rank] / scaling, self.left[:, :rank]

    def update(self, rank: int) -> torch.Tensor:
        """Dense rank-``k`` truncation ``Ŵ_k`` (out x in, float64); for checks on small layers."""
        a, b = self.factors(rank)
        return b @ a


def _validate_factors(lora_a: torch.Tensor, lora_b: torch.Tensor) -> None:
    if lora_a.dim() != 2 or lora_b.dim() != 2 or lora_a.shape[0] != lora_b.shape[1]:
        raise ValueError(f"LoRA factors must be A (r x in) and B (out x r), got A {tuple(lora_a.shape)} "
                         f"and B {tuple(lora_b.shape)}")


def _from_core(q_b: torch.Tensor, core: torch.Tensor, right_basis: torch.Tensor, criterion: str) -> Decomposition:
    """Components of ``Q_B · core · right_basis`` (``Q_B`` orthonormal columns) via the SVD of the small core."""
    u, s, vh = torch.linalg.svd(core, full_matrices=False)
    # numerical rank: a singular value at rounding level of the largest one carries nothing
    tol = (float(s[0]) if s.numel() else 0.0) * max(core.shape) * torch.finfo(torch.float64).eps
    keep = int((s > tol).sum())
    left = q_b @ u[:, :keep]
    right = (s[:keep, None] * vh[:keep]) @ right_basis
    if keep:
        # canonical signs (as lora_ops/lowrank.py): each left column's largest-magnitude entry positive,
        # so the result depends on ΔW and G alone, not on the LAPACK path
        pivot = left.abs().argmax(dim=0)
        sign = torch.sign(left[pivot, torch.arange(keep)])
        sign[sign == 0] = 1.0
        left, right = left * sign, right * sign[:, None]
    return Decomposition(left=left, right=right, singular_values=s[:keep].clone(), criterion=criterion)


def _empty(lora_a: torch.Tensor, lora_b: torch.Tensor, criterion: str) -> Decomposition:
    f64 = {"dtype": torch.float64, "device": lora_a.device}
    return Decomposition(left=torch.zeros(lora_b.shape[0], 0, **f64), right=torch.zeros(0, lora_a.shape[1], **f64),
                         singular_values=torch.zeros(0, **f64), criterion=criterion)


def decompose_svd(lora_a: torch.Tensor, lora_b: torch.Tensor, scaling: float) -> Decomposition:
    """Plain SVD of ``ΔW = scaling · B · A`` computed from the factors (thin QRs + an r x r SVD)."""
    _validate_factors(lora_a, lora_b)
    a, b = lora_a.detach().double(), lora_b.detach().double()
    if scaling == 0.0 or a.shape[0] == 0:
        return _empty(a, b, "svd")
    q_b, r_b = torch.linalg.qr(b, mode="reduced")
    q_a, r_a = torch.linalg.qr(a.t(), mode="reduced")  # QR of Aᵀ, not chol(A Aᵀ): no squared condition number
    return _from_core(q_b, scaling * (r_b @ r_a.t()), q_a.t(), "svd")


def decompose_output(lora_a: torch.Tensor, lora_b: torch.Tensor, scaling: float, gram: torch.Tensor,
                     ridge: float = DEFAULT_RIDGE) -> Decomposition:
    """Output-weighted SVD of ``ΔW = scaling · B · A`` given ``gram = G = Σ_tokens (A x)(A x)ᵀ`` (r x r).

    For a pair shared by several modules pass the summed ``G`` (:class:`GramAccumulator` over all of
    them): the result then minimises ``Σ_m ‖(ΔW − Ŵ) X_m‖²``. ``ridge`` (≥ 0) adds
    ``ridge · tr(G) / r`` to the diagonal; with ``ridge = 0`` ``G`` must be positive definite."""
    _validate_factors(lora_a, lora_b)
    if not ridge >= 0.0:
        raise ValueError(f"ridge must be >= 0, got {ridge}")
    r = lora_a.shape[0]
    if gram.shape != (r, r):
        raise ValueError(f"gram must be r x r = {r} x {r} (the LoRA rank), got {tuple(gram.shape)}")
    a, b = lora_a.detach().double(), lora_b.detach().double()
    g = gram.detach().to(device=a.device, dtype=torch.float64)
    g = (g + g.t()) / 2  # a sum of outer products is symmetric up to rounding; make it exactly so
    trace = float(torch.trace(g)) if r else 0.0
    if not torch.isfinite(g).all():
        raise ValueError("gram has non-finite entries")
    if scaling == 0.0 or r == 0 or trace <= 0.0:
        return _empty(a, b, "output")  # no output energy on the calibration tokens: nothing to keep
    g = g + (ridge * trace / r) * torch.eye(r, dtype=g.dtype, device=g.device)
    chol, info = torch.linalg.cholesky_ex(g)  # lower L with L Lᵀ = G, i.e. Rᵀ = L
    if int(info) != 0:
        raise ValueError("gram is not positive definite; pass ridge > 0 (A x is rank deficient on these tokens)")
    q_b, r_b = torch.linalg.qr(b, mode="reduced")
    whitened_a = torch.linalg.solve_triangular(chol, a, upper=False)  # R⁻ᵀ A: C-orthonormal rows
    return _from_core(q_b, scaling * (r_b @ chol), whitened_a, "output")


def decompose(lora_a: torch.Tensor, lora_b: torch.Tensor, scaling: float, criterion: str,
              gram: torch.Tensor | None = None, ridge: float = DEFAULT_RIDGE) -> Decomposition:
    """Dispatch on ``criterion`` (``svd`` or ``output``; ``output`` needs ``gram``)."""
    if criterion == "svd":
        return decompose_svd(lora_a, lora_b, scaling)
    if criterion == "output":
        if gram is None:
            raise ValueError("criterion 'output' needs gram = Σ (A x)(A x)ᵀ over the calibration tokens")
        return decompose_output(lora_a, lora_b, scaling, gram, ridge)
    raise ValueError(f"criterion must be one of {', '.join(CRITERIA)}, got {criterion!r}")


class GramAccumulator:
    """``G = Σ_tokens (A x)(A x)ᵀ`` (r x r, float64) for one LoRA pair, padding tokens excluded.

    A pair shared by several modules (LoRA-drop) gets ONE accumulator that every module using it
    feeds, so ``G = Σ_m A C_m Aᵀ`` and the pair is trimmed once for the summed objective."""

    def __init__(self, rank: int, device: torch.device | str | None = None) -> None:
        if rank < 0:  # rank 0: a pair a rank allocator pruned away (AdaLoRA, DoRA-DR); its G is 0 x 0
            raise ValueError(f"rank must be >= 0, got {rank}")
        self.rank = rank
        self.gram = torch.zeros(rank, rank, dtype=torch.float64, device=device)
        self.tokens = 0

    def add(self, projected: torch.Tensor, token_mask: torch.Tensor | None = None) -> None:
        """Add a batch of LoRA intermediates ``A x`` (``(..., r)``); ``token_mask`` (``(...)``) marks real tokens."""
        if projected.shape[-1] != self.rank:
            raise ValueError(f"projected inputs must end in the rank {self.rank}, got shape {tuple(projected.shape)}")
        z = projected.detach().reshape(-1, self.rank).to(device=self.gram.device, dtype=torch.float64)
        if token_mask is not None:
            if token_mask.numel() != z.shape[0]:
                raise ValueError(f"token mask has {token_mask.numel()} entries for {z.shape[0]} tokens")
            z = z[token_mask.reshape(-1).to(self.gram.device).bool()]
        self.gram.addmm_(z.t(), z)
        self.tokens += int(z.shape[0])

    def add_inputs(self, inputs: torch.Tensor, lora_a: torch.Tensor, token_mask: torch.Tensor | None = None) -> None:
        """Add layer inputs ``x`` (``(..., in)``), projecting by ``A`` in float64 (more exact than a bf16 ``A x``)."""
        a = lora_a.detach().to(device=self.gram.device, dtype=torch.float64)
        x = inputs.detach().reshape(-1, inputs.shape[-1]).to(device=self.gram.device, dtype=torch.float64)
        self.add(x @ a.t(), token_mask)
