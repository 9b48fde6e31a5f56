"""The paths that need CUDA: bf16 grouped_mm for the experts, compiled flex attention for the
block-diffusion mask, the adapters' routed-token path in bf16. Marked `gpu`: skipped on a
machine without one (CI's), run where a GPU is lent (`pytest -m gpu`)."""

import pytest
import torch

from dmoe_train.models import build_model
from dmoe_train.models.block_diffusion import noised_forward
from dmoe_train.models.grouped_experts import expert_mlp, grouped_mm_runs
from dmoe_train.models.lora import ExpertLora, add_expert_lora, expert_low_rank
from dmoe_train.objectives.masked_diffusion import row_uniforms

pytestmark = pytest.mark.gpu
CUDA = torch.device("cuda")


def test_bf16_grouped_mm_matches_the_fp32_loop():
    assert grouped_mm_runs("cuda", torch.bfloat16, torch.cuda.get_device_capability())
    gen = torch.Generator().manual_seed(0)
    e, h, i, n, k = 64, 256, 128, 512, 8
    weights = [torch.randn(e, i, h, generator=gen) / h**0.5 for _ in range(2)]
    weights.append(torch.randn(e, h, i, generator=gen) / i**0.5)
    x = torch.randn(n, h, generator=gen)
    ids = torch.randint(0, e, (n, k), generator=gen)
    gate = torch.rand(n, k, generator=gen)
    exact = expert_mlp(x, ids, gate, *weights)  # CPU, fp32
    bf16 = [w.to(CUDA, torch.bfloat16) for w in weights]
    fast = expert_mlp(x.to(CUDA, torch.bfloat16), ids.to(CUDA), gate.to(CUDA), *bf16)
    torch.testing.assert_close(fast.float().cpu(), exact, rtol=0.05, atol=0.05)


def test_compiled_flex_attention_matches_the_dense_mask():
    model = build_model("tiny", seed=0).to(CUDA)
    x0 = torch.randint(3, 40, (4, 32), device=CUDA)
    response = torch.arange(32, device=CUDA)[None].expand(4, -1) >= 8
    uniforms = row_uniforms(list(range(4)), 32, CUDA)
    cfg = model.config
    runs = {
        mode: noised_forward(model, x0, response, cfg.mask_token_id, 0.3, 0.8, mode, 8, uniforms)
        for mode in ("block_diffusion", "block_diffusion_flex")
    }
    dense, flex = (runs[m].logits for m in ("block_diffusion", "block_diffusion_flex"))
    torch.testing.assert_close(flex, dense, rtol=1e-4, atol=1e-4)


def test_adapters_routed_path_in_bf16_matches_pefts_dense_delta():
    model = build_model("tiny", seed=0).to(CUDA, torch.bfloat16)
    add_expert_lora(model, ExpertLora(rank=4))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.1)
    moe = model.model.layers[1].mlp
    x = torch.randn(64, model.config.hidden_size, device=CUDA, dtype=torch.bfloat16)
    ids = torch.randint(0, model.config.num_experts, (64, 2), device=CUDA)
    gate = torch.rand(64, 2, device=CUDA)
    experts, low_rank = expert_low_rank(moe.experts)
    ours, dense = experts(x, ids, gate, low_rank), moe.experts(x, ids, gate)
    torch.testing.assert_close(ours.float(), dense.float(), rtol=0.05, atol=0.05)
