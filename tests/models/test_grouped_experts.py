import pytest
import torch
import torch.nn.functional as F

from dmoe_train.models import grouped_experts
from dmoe_train.models.grouped_experts import expert_mlp, grouped_mm_runs


def _refuse(*args, **kwargs):
    raise AssertionError("grouped_mm called where its kernel does not run")


def test_where_grouped_mm_runs():
    assert grouped_mm_runs("cpu", torch.float32, None) and grouped_mm_runs(
        "cpu", torch.bfloat16, None
    )
    assert grouped_mm_runs("cuda", torch.bfloat16, (8, 0)) and grouped_mm_runs(
        "cuda", torch.bfloat16, (9, 0)
    )
    assert not grouped_mm_runs("cuda", torch.float32, (9, 0))  # the tiny base loads in float32
    assert not grouped_mm_runs("cuda", torch.float16, (9, 0))
    assert not grouped_mm_runs("cuda", torch.bfloat16, (7, 5))  # before Ampere
    assert not grouped_mm_runs("mps", torch.bfloat16, None)


def loop_reference(x, ids, weights, gate_proj, up_proj, down_proj):
    """Plain per-token, per-slot loop: the definition of the MoE output."""
    out = torch.zeros_like(x)
    for t in range(x.shape[0]):
        for slot in range(ids.shape[1]):
            e = int(ids[t, slot])
            if e >= 0:
                h = F.silu(x[t] @ gate_proj[e].T) * (x[t] @ up_proj[e].T)
                out[t] = out[t] + weights[t, slot] * (h @ down_proj[e].T)
    return out


def _case(seed: int):
    g = torch.Generator().manual_seed(seed)
    n, k, e, h, i = 12, 3, 8, 16, 8
    x = torch.randn(n, h, generator=g)
    ids = torch.randint(0, e, (n, k), generator=g)
    ids[ids == 5] = 6  # expert 5 gets no token
    ids[0, 2] = -1  # an empty slot
    weights = torch.rand(n, k, generator=g)
    params = [
        torch.randn(e, i, h, generator=g),
        torch.randn(e, i, h, generator=g),
        torch.randn(e, h, i, generator=g),
    ]
    return [x, ids, weights, *params]


def _forward_and_grads(fn, args):
    leaves = [a.clone().requires_grad_() if a.is_floating_point() else a for a in args]
    out = fn(*leaves)
    out.backward(torch.ones_like(out) + torch.arange(out.numel()).view_as(out) * 1e-3)
    return out.detach(), [a.grad for a in leaves if a.is_floating_point()]


@pytest.mark.parametrize("seed", range(3))
@pytest.mark.parametrize("path", ["grouped_mm", "missing", "unsupported"])
def test_grouped_matches_loop(seed, path, monkeypatch):
    if path == "missing":  # an older torch
        monkeypatch.delattr(F, "grouped_mm")
    if path == "unsupported":  # as on CUDA in float32: the kernel must not be called
        monkeypatch.setattr(grouped_experts, "grouped_mm_runs", lambda *a: False)
        monkeypatch.setattr(F, "grouped_mm", _refuse)
    args = _case(seed)
    out, grads = _forward_and_grads(expert_mlp, args)
    ref, ref_grads = _forward_and_grads(loop_reference, args)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    for got, want in zip(grads, ref_grads, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-4)
    # the unused expert gets exactly zero gradient: it was never touched
    assert (grads[2][5] == 0).all() and (grads[4][5] == 0).all()


def test_fp32_experts_under_a_bf16_stream():
    """Training the experts beside a frozen bf16 base: fp32 expert weights, bf16 activations.
    The experts compute in fp32, return bf16, and their fp32 gradients are the fp32 ones."""
    x, ids, weights, *params = _case(0)
    out, grads = _forward_and_grads(expert_mlp, [x.bfloat16(), ids, weights, *params])
    ref, ref_grads = _forward_and_grads(expert_mlp, [x.bfloat16().float(), ids, weights, *params])
    assert out.dtype == torch.bfloat16 and grads[2].dtype == torch.float32
    scale = ref.abs().max().item()  # the k slots are summed in bf16: its rounding, no more
    torch.testing.assert_close(out.float(), ref, rtol=1e-2, atol=1e-2 * scale)
    # the gradient reaching them passed through bf16: its rounding, relative to its scale
    g_scale = ref_grads[2].abs().max().item()
    torch.testing.assert_close(grads[2], ref_grads[2], rtol=1e-2, atol=1e-2 * g_scale)


@pytest.mark.parametrize("rank", [1, 2, 4, 8])
def test_narrow_low_rank_paths_train_where_grouped_mm_runs(rank):
    """A rank-r adapter's rows are 4r bytes wide in fp32: grouped_mm's backward wants 16-byte
    strides, so narrow ones take the loop; forward and backward equal the loop's either way."""
    gen = torch.Generator().manual_seed(rank)
    x = torch.randn(24, 32, generator=gen, requires_grad=True)
    rhs = torch.randn(4, rank, 32, generator=gen, requires_grad=True)
    counts = torch.tensor([6, 0, 10, 8])
    was = torch.are_deterministic_algorithms_enabled()
    results = []
    try:
        for deterministic in (False, True):  # grouped_mm where aligned, then the loop
            torch.use_deterministic_algorithms(deterministic)
            out = grouped_experts.grouped_linear(x, rhs, counts)
            (grad_x, grad_w) = torch.autograd.grad(out.square().sum(), (x, rhs))
            results.append((out, grad_x, grad_w))
    finally:
        torch.use_deterministic_algorithms(was)
    for fast, loop in zip(*results, strict=True):
        torch.testing.assert_close(fast, loop, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("rank", [1, 2, 3, 8])
def test_adapters_of_any_rank_take_grouped_mm_and_equal_the_loop(rank):
    """`adapted_linear` zero-pads the rank to 16-byte rows, so grouped_mm (and its backward)
    runs for every rank; the padding adds nothing."""
    gen = torch.Generator().manual_seed(rank)
    x = torch.randn(40, 32, generator=gen)
    weight = torch.randn(4, 16, 32, generator=gen)
    lhs, rhs = torch.randn(4, 16, rank, generator=gen), torch.randn(4, rank, 32, generator=gen)
    counts = torch.tensor([10, 0, 20, 10])
    was = torch.are_deterministic_algorithms_enabled()
    results = []
    try:
        for deterministic in (False, True):
            torch.use_deterministic_algorithms(deterministic)
            leaves = [t.clone().requires_grad_() for t in (x, lhs, rhs)]
            out = grouped_experts.adapted_linear(leaves[0], weight, counts, (*leaves[1:], 0.5))
            results.append((out, *torch.autograd.grad(out.square().sum(), leaves)))
    finally:
        torch.use_deterministic_algorithms(was)
    for fast, loop in zip(*results, strict=True):
        torch.testing.assert_close(fast, loop, rtol=1e-5, atol=1e-4)
