import pytest
import torch

from dmoe_train.models import build_model
from dmoe_train.models.block_diffusion import (
    block_diffusion_block_mask,
    block_diffusion_mask,
    noised_forward,
)
from dmoe_train.objectives.masked_diffusion import mask_tokens, masked_diffusion_loss, row_uniforms
from dmoe_train.routing import RoutingPolicy


def test_block_diffusion_mask_by_hand():
    # n = 4 positions in blocks of 2; rows/cols: xt0 xt1 xt2 xt3 | x00 x01 x02 x03
    expected = torch.tensor(
        [
            [1, 1, 0, 0, 0, 0, 0, 0],  # xt block 0: own block of xt, no earlier x0 block
            [1, 1, 0, 0, 0, 0, 0, 0],
            [0, 0, 1, 1, 1, 1, 0, 0],  # xt block 1: own block of xt + x0 block 0
            [0, 0, 1, 1, 1, 1, 0, 0],
            [0, 0, 0, 0, 1, 1, 0, 0],  # x0 block 0: itself only, never xt
            [0, 0, 0, 0, 1, 1, 0, 0],
            [0, 0, 0, 0, 1, 1, 1, 1],  # x0 block 1: x0 blocks 0 and 1
            [0, 0, 0, 0, 1, 1, 1, 1],
        ],
        dtype=torch.bool,
    )
    assert torch.equal(block_diffusion_mask(4, 2), expected)


@pytest.mark.parametrize("seed", range(5))
def test_prompt_tokens_are_never_masked(seed):
    g = torch.Generator().manual_seed(seed)
    x0 = torch.randint(3, 50, (16, 24), generator=g)
    prompt_len = torch.randint(1, 20, (16, 1), generator=g)
    response = torch.arange(24)[None] >= prompt_len
    xt, masked, t = mask_tokens(x0, response, 1, 0.99, 1.0, torch.rand(16, 25, generator=g))
    assert torch.equal(xt[~response], x0[~response])
    assert not masked[~response].any()
    assert masked[response].float().mean() > 0.95  # t near 1 masks (almost) every response token
    assert ((t >= 0.99) & (t <= 1.0)).all()


def test_loss_normalised_by_masked_count_and_inv_t():
    logits = torch.zeros(2, 3, 4)
    logits[0, 0, 1] = 10.0  # confident and right at (0, 0)
    x0 = torch.tensor([[1, 2, 3], [0, 0, 0]])
    masked = torch.tensor([[True, True, False], [True, False, False]])
    t = torch.tensor([0.5, 0.25])
    ce = torch.nn.functional.cross_entropy(logits.transpose(1, 2), x0, reduction="none")
    expected = (ce[0, 0] + ce[0, 1] + ce[1, 0]) / 3
    torch.testing.assert_close(masked_diffusion_loss(logits, x0, masked, t, "none"), expected)
    weighted = (ce[0, 0] / 0.5 + ce[0, 1] / 0.5 + ce[1, 0] / 0.25) / 3
    torch.testing.assert_close(masked_diffusion_loss(logits, x0, masked, t, "inv_t"), weighted)


def test_row_noise_depends_on_its_key_alone():
    batch = row_uniforms([7, 8, 9], 5)
    assert batch.shape == (3, 6) and ((batch >= 0) & (batch < 1)).all()
    assert torch.equal(row_uniforms([8], 5)[0], batch[1])  # another batch, rank or world size
    assert not torch.equal(batch[0], batch[1])


def test_flex_block_mask_is_the_dense_mask():
    from torch.nn.attention.flex_attention import create_mask

    for n, block in ((16, 8), (24, 4), (130, 32)):  # 260 positions: partial 128-tiles too
        block_mask = block_diffusion_block_mask(n, block)
        dense = create_mask(block_mask.mask_mod, None, None, 2 * n, 2 * n, device="cpu")
        assert torch.equal(dense[0, 0], block_diffusion_mask(n, block))


@pytest.mark.parametrize("policy", ["token", "topp"])
def test_flex_attention_gives_the_dense_outputs(policy):
    model = build_model("tiny", seed=0)
    model.set_routing(
        RoutingPolicy.from_record(dict(name=policy, block_size=8, top_p=0.6, min_experts=4))
    )
    x0 = torch.randint(3, 40, (2, 16), generator=torch.Generator().manual_seed(0))
    response = torch.zeros_like(x0, dtype=torch.bool)
    response[:, 5:] = True
    uniforms = torch.rand(2, 17, generator=torch.Generator().manual_seed(1))
    args = (model, x0, response, model.config.mask_token_id, 0.3, 0.8)
    with torch.no_grad():  # flex_attention itself (it has no backward on the CPU)
        dense = noised_forward(*args, "block_diffusion", 8, uniforms)
        flex = noised_forward(*args, "block_diffusion_flex", 8, uniforms)
    torch.testing.assert_close(flex.logits, dense.logits, rtol=1e-5, atol=1e-5)
    for a, b in zip(flex.routing, dense.routing, strict=True):
        assert torch.equal(a.ids, b.ids)
    # with gradients on the CPU: the dense fallback, the same loss and router gradients
    grads = []
    for mode in ("block_diffusion", "block_diffusion_flex"):
        model.zero_grad()
        out = noised_forward(*args, mode, 8, uniforms)
        masked_diffusion_loss(out.logits, x0, out.masked, out.t, "none").backward()
        grads.append(model.model.layers[1].mlp.gate.weight.grad.clone())
    torch.testing.assert_close(grads[1], grads[0], rtol=1e-5, atol=1e-6)
