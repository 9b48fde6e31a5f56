"""`estimate_memory.py`'s terms that measurements forced: DDP's wrap-time broadcast buckets
(hand-computed against torch's bucketing) and FSDP2's gathered root unit."""

import pytest
from helpers import PROJECT_ROOT

from dmoe_train.models import TRAINABLE_SETS  # noqa: E402
from dmoe_train.models.families.diffusion_gemma import text_only_config
from dmoe_train.studies.estimate_memory import (
    BF16,
    CANVAS_26B,
    DIFFUSION_GEMMA_26B,
    Layout,
    broadcast_bucket,
    estimate,
    parameter_counts,
    read_config,
)

MiB = 2**20
TINY = PROJECT_ROOT / "assets" / "tiny-llada2"


def test_a_lone_large_tensor_is_sent_in_place():
    assert broadcast_bucket([(False, 600 * MiB)]) == 0


def test_a_large_tensor_closes_the_bucket_it_joins_and_is_copied_with_it():
    # measured: 0.67 GiB transient for [1000 elements, 0.6 GiB] on two gloo ranks
    assert broadcast_bucket([(False, 2000), (False, 600 * MiB)]) == 600 * MiB + 2000


def test_buckets_close_at_the_limit_and_the_rest_stays_open():
    # [2000 B, 200 MiB, 200 MiB] reaches 250 MiB and closes; the last 200 MiB is alone
    sizes = [(False, 2000), (False, 200 * MiB), (False, 200 * MiB), (False, 200 * MiB)]
    assert broadcast_bucket(sizes) == 400 * MiB + 2000


def test_dtypes_fill_buckets_of_their_own():
    sizes = [(False, 200 * MiB), (True, 200 * MiB), (False, 200 * MiB), (True, 10)]
    assert broadcast_bucket(sizes) == 400 * MiB  # the fp32 pair (200 MiB + 10 B) never closes
    assert broadcast_bucket([(True, 10), (True, 20)]) == 30  # an open bucket is sent too


def test_ddp_peaks_at_the_wrap_on_short_sequences_only():
    cfg = read_config(TINY)
    counts = parameter_counts(cfg, "router")
    one, ddp = Layout("1", 1), Layout("ddp", 1, broadcast=True)
    short = estimate(cfg, 1, 1, ddp)
    assert counts.broadcast_bucket > 0
    assert short["total"] == pytest.approx(
        (counts.total - counts.trained) * BF16 + counts.broadcast_bucket
    )
    assert short["total"] > estimate(cfg, 1, 1, one)["total"]
    assert estimate(cfg, 4096, 8, ddp)["total"] == estimate(cfg, 4096, 8, one)["total"]


def test_fsdp_holds_the_root_unit_gathered_beside_two_layers():
    cfg = read_config(TINY)
    counts = parameter_counts(cfg, "router")
    weights = estimate(cfg, 16, 1, Layout("fsdp", 2))["weights"]
    frozen_shard = (counts.total - counts.trained) * BF16 / 2
    assert counts.root > 0
    assert weights == pytest.approx(frozen_shard + 2 * counts.layer * BF16 + counts.root * BF16)


def test_every_trainable_set_counts_its_own_weights():
    cfg = read_config(TINY)
    counts = {t: parameter_counts(cfg, t).trained for t in TRAINABLE_SETS}
    h, e, i = cfg.hidden_size, cfg.num_experts, cfg.moe.expert_width
    layers = cfg.num_hidden_layers - cfg.first_k_dense_replace
    shared = layers * 3 * h * cfg.moe.shared_width
    lora = layers * 3 * 8 * e * (h + i)  # rank 8: A [8 E, in] and B [out, 8 E] per projection
    assert counts["router+shared"] - counts["router"] == shared
    assert counts["router+lora"] - counts["router"] == lora
    assert counts["router+lora+shared"] - counts["router"] == lora + shared
    assert counts["router+experts"] - counts["router"] == layers * 3 * e * h * i


def test_fsdp_holds_every_diffusion_gemma_layer_gathered():
    # the encoder's and the decoder's layer i are one unit, gathered from one pass to the other
    cfg = text_only_config(CANVAS_26B, **DIFFUSION_GEMMA_26B)
    counts = parameter_counts(cfg, "router")
    weights = estimate(cfg, 16, 1, Layout("fsdp", 8))["weights"]
    layers = cfg.text_config.num_hidden_layers
    frozen_shard = (counts.total - counts.trained) * BF16 / 8
    assert weights == pytest.approx(
        frozen_shard + layers * counts.layer * BF16 + counts.root * BF16
    )
