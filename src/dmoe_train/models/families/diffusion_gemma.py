"""DiffusionGemma, transformers' own MoE dLLM, under our routing policies.

The model is transformers' `DiffusionGemmaForBlockDiffusion`, loaded from a local directory by its
own `from_pretrained`; nothing of its modeling code is copied. Routing enters through each
layer's router: the router keeps its parameters (`proj`, `scale`, `per_expert_scale`) and its
scores (softmax over all experts in fp32), and only the choice of experts goes through `route`
(the `MoeSpec` of `moe_spec`: softmax scores, no groups, renormalised, the per-expert scale after
renormalisation). The decoder refines a canvas of `canvas_length` positions: its routers route by
the policy over blocks of `policy.block_size` canvas positions; the encoder's routers (the prompt,
and every finished canvas) keep token routing unless `encoder="policy"`. The encoder's and the
decoder's layers share their weights (transformers ties them), so one router serves both.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from accelerate import init_empty_weights
from torch import Tensor, nn
from transformers import DiffusionGemmaConfig, DiffusionGemmaForBlockDiffusion
from transformers.models.diffusion_gemma.modeling_diffusion_gemma import (
    DiffusionGemmaTextRouter,
)

from dmoe_train.routing import MoeSpec, Routing, RoutingPolicy, route

MODEL_TYPE = "diffusion_gemma"
# our config.json key for the routing an export was adapted under (transformers keeps and writes
# back keys it does not know)
ROUTING_KEY = "dmoe_routing"
EncoderRouting = Literal["token", "policy"]


def moe_spec(text_config) -> MoeSpec:
    """A DiffusionGemma MoE layer as routing sees it."""
    return MoeSpec(
        num_experts=text_config.num_experts,
        top_k=text_config.top_k_experts,
        expert_width=text_config.moe_intermediate_size,
        score_function="softmax",
        renormalise=True,
        per_expert_scale=True,
    )


@dataclass
class CanvasRouting:
    """What the routers of one model route by: `policy` on the decoder's canvas (and on the
    encoder's input under `encoder="policy"`); `shapes` the `[B, L]` of the forward each side
    runs now (set by hooks on the encoder and the decoder); `records` collects every routed
    forward's `Routing` while `recording` is on (metrics, the regularizer)."""

    moe: MoeSpec
    policy: RoutingPolicy
    encoder: EncoderRouting = "token"
    shapes: dict[str, tuple[int, int]] = field(default_factory=dict)
    records: list[tuple[str, Routing]] | None = None

    def policy_of(self, side: str) -> RoutingPolicy:
        if side == "decoder" or self.encoder == "policy":
            return self.policy
        return RoutingPolicy("token", block_size=self.policy.block_size)

    @contextmanager
    def recording(self) -> Iterator[list[tuple[str, Routing]]]:
        """Every routed forward inside the block, in order: (side, routing)."""
        self.records = []
        try:
            yield self.records
        finally:
            self.records = None


class PolicyRouter(DiffusionGemmaTextRouter):
    """transformers' router (its class, parameters and scores) choosing its experts by our
    policy. `side` is `encoder` or `decoder`; `routing` is the model's `CanvasRouting`. An empty
    slot (a coreset with fewer than k experts, a token expert choice passed over) repeats the
    token's first expert at weight 0 (expert 0 where it has none): transformers' grouped experts
    leave the rows of an out-of-range index uninitialised outside expert parallelism, and
    NaN * 0 is NaN."""

    side: str
    routing: CanvasRouting

    def forward(self, hidden_states: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        x = self.norm(hidden_states) * self.scale * self.scalar_root_size
        logits = self.proj(x)
        probs = nn.functional.softmax(logits, dim=-1, dtype=torch.float32)
        b, n = self.routing.shapes.get(self.side, (1, probs.shape[0]))
        chosen = route(
            self.routing.policy_of(self.side), probs.view(b, n, -1), moe=self.routing.moe
        )
        chosen.logits = logits.view(b, n, -1)
        if self.routing.records is not None:
            self.routing.records.append((self.side, chosen))
        empty = chosen.ids < 0
        ids = torch.where(empty, chosen.ids[..., :1].clamp_min(0), chosen.ids)
        weights = (chosen.weights * self.per_expert_scale[ids]).masked_fill(empty, 0.0)
        k = ids.shape[-1]
        return probs, weights.reshape(b * n, k), ids.reshape(b * n, k)


def install_routing(
    model: DiffusionGemmaForBlockDiffusion, policy: RoutingPolicy, encoder: EncoderRouting = "token"
) -> CanvasRouting:
    """Make every router of `model` a `PolicyRouter` following one `CanvasRouting` (returned,
    and kept as `model.canvas_routing`); on a model that has one, its policy changes."""
    text = model.config.text_config
    policy.check_against(text.num_experts, text.top_k_experts)
    if (routing := getattr(model, "canvas_routing", None)) is not None:
        routing.policy, routing.encoder = policy, encoder
        return routing
    routing = CanvasRouting(moe_spec(text), policy, encoder)
    sides = {
        "encoder": model.model.encoder.language_model,
        "decoder": model.model.decoder,
    }
    for side, stack in sides.items():
        for layer in stack.layers:
            layer.router.__class__ = PolicyRouter
            layer.router.side, layer.router.routing = side, routing
        stack.register_forward_pre_hook(_shape_hook(routing, side), with_kwargs=True)
    model.canvas_routing = routing
    return routing


def _shape_hook(routing: CanvasRouting, side: str):
    """Records the `[B, L]` of a side's forward: its routers see their input flattened."""
    name = "decoder_input_ids" if side == "decoder" else "input_ids"

    def hook(module: nn.Module, args: tuple, kwargs: dict) -> None:
        ids = kwargs.get(name, args[0] if args else None)
        if ids is None:
            ids = kwargs.get("inputs_embeds")
        routing.shapes[side] = tuple(ids.shape[:2])

    return hook


def load_diffusion_gemma(
    path: str | Path,
    dtype: torch.dtype | None = None,
    device: str | torch.device | None = None,
    routing: RoutingPolicy | None = None,
    encoder: EncoderRouting = "token",
) -> DiffusionGemmaForBlockDiffusion:
    """transformers' model from a local directory (never the hub), with our routing installed:
    `routing`, else the one its config.json records (`ROUTING_KEY`, an export's), else token
    routing (the published model's). `device="meta"`: its weights on the meta device, for a
    sharded load (`models.sharding.load_shards`)."""
    if device is not None and torch.device(device).type == "meta":
        model = empty_diffusion_gemma(path, dtype)
    else:
        model = DiffusionGemmaForBlockDiffusion.from_pretrained(
            str(path), local_files_only=True, dtype=dtype, device_map=device
        )
    recorded = json.loads((Path(path) / "config.json").read_text()).get(ROUTING_KEY)
    if routing is None and recorded is not None:
        routing = RoutingPolicy.from_record(recorded)
    install_routing(model.eval(), routing or RoutingPolicy("token"), encoder)
    return model


def empty_diffusion_gemma(
    path: str | Path, dtype: torch.dtype | None
) -> DiffusionGemmaForBlockDiffusion:
    """transformers' model of the directory's config with its weights on the meta device and
    tied as `from_pretrained` ties them; its buffers are real (the rotary frequencies and the
    embedding scale are computed, not read)."""
    config = DiffusionGemmaConfig.from_pretrained(str(path), local_files_only=True)
    with init_empty_weights(include_buffers=False):
        model = DiffusionGemmaForBlockDiffusion._from_config(config, dtype=dtype)
    model.tie_weights()
    model.name_or_path = str(path)
    return model


def layer_pairs(model: DiffusionGemmaForBlockDiffusion) -> list[list[nn.Module]]:
    """The encoder's and the decoder's layer i: one set of weights (transformers ties them)."""
    encoder, decoder = model.model.encoder.language_model.layers, model.model.decoder.layers
    return [[e, d] for e, d in zip(encoder, decoder, strict=True)]


def save_with_routing(model: DiffusionGemmaForBlockDiffusion, path: str | Path) -> None:
    """transformers' `save_pretrained`, and the routing the model follows in config.json under
    `ROUTING_KEY` (`load_diffusion_gemma` routes by it again; transformers ignores it)."""
    model.save_pretrained(str(path))
    config = Path(path) / "config.json"
    raw = json.loads(config.read_text())
    raw[ROUTING_KEY] = model.canvas_routing.policy.to_dict()
    config.write_text(json.dumps(raw, indent=2) + "\n")


@dataclass
class CanvasBatch:
    """A data-module batch in DiffusionGemma's layout: the prompts left-padded `[B, P]` with
    their keep-mask, the answers' canvas `[B, canvas_length]` (the response and its eos padding,
    cut at the canvas) and which canvas positions are supervised."""

    prompts: Tensor
    keep: Tensor
    canvas: Tensor
    supervised: Tensor


def canvas_batch(
    batch: dict, canvas_length: int, pad_id: int, width: int | None = None
) -> CanvasBatch:
    """`input_ids` `[B, L]` = prompt + response + eos padding, `prompt_len` `[B]` -> the prompts
    left-padded with `pad_id` to `width` (None: the longest prompt) and the canvas that follows
    each prompt. The pad width shifts every position alike (rotary attention ignores it but for
    rounding), so training pads to a width that does not depend on the batch: a sample computes
    bit for bit the same on any rank."""
    ids, lens = batch["input_ids"], batch["prompt_len"].tolist()
    width = max(lens) if width is None else max(width, *lens)
    prompts = ids.new_full((len(lens), width), pad_id)
    keep = torch.zeros(prompts.shape, dtype=torch.bool, device=ids.device)
    canvas = ids.new_full((len(lens), canvas_length), pad_id)
    supervised = torch.zeros(canvas.shape, dtype=torch.bool, device=ids.device)
    for i, n in enumerate(lens):
        prompts[i, width - n :], keep[i, width - n :] = ids[i, :n], True
        answer = ids[i, n : n + canvas_length]
        canvas[i, : len(answer)], supervised[i, : len(answer)] = answer, True
    return CanvasBatch(prompts, keep, canvas, supervised)


@dataclass
class CanvasForward:
    """One training forward: the decoder's `logits` over the canvas, the encoder's over the
    prompt, and the decoder's routing per MoE layer."""

    logits: Tensor
    encoder_logits: Tensor
    routing: list[Routing]


def canvas_forward(
    model: DiffusionGemmaForBlockDiffusion,
    batch: CanvasBatch,
    x_t: Tensor,
    self_conditioned: Tensor,
    call: Callable[..., Any] | None = None,
) -> CanvasForward:
    """The prompt encoded and the noised canvas `x_t` denoised by `model` (through `call`, e.g.
    a `functional_call` with other weights: the distillation teacher); where `self_conditioned`,
    first without self-conditioning (no gradients), then conditioned on those logits, as the
    published recipe trains."""
    call = call or model
    # the canvas attends to the prompt's real tokens only, as `generate` masks them: without
    # this mask the decoder reads the encoder's pad entries
    decoder_mask = nn.functional.pad(batch.keep, (0, x_t.shape[1]), value=True)
    inputs = dict(
        input_ids=batch.prompts,
        attention_mask=batch.keep.long(),
        decoder_input_ids=x_t,
        decoder_attention_mask=decoder_mask,
    )
    extra = {}
    if self_conditioned.any():
        with torch.no_grad():
            first = call(**inputs).logits
        extra = dict(self_conditioning_logits=first, self_conditioning_mask=self_conditioned)
    with model.canvas_routing.recording() as records:
        out = call(**inputs, **extra)
    return CanvasForward(
        out.logits,
        encoder_logits(model, out.encoder_last_hidden_state),
        [r for side, r in records if side == "decoder"],
    )


def encoder_logits(model: DiffusionGemmaForBlockDiffusion, hidden: Tensor) -> Tensor:
    """The LM head over the encoder's last hidden states, soft-capped as the decoder's logits
    are (`final_logit_softcapping`)."""
    logits = model.lm_head(hidden).float()
    cap = model.config.text_config.final_logit_softcapping
    return torch.tanh(logits / cap) * cap if cap else logits


# a Gemma 4 vision tower of a few parameters: left unset, a config still builds a 167M-parameter
# one, which text work never uses
TINY_VISION = dict(
    model_type="gemma4_vision", hidden_size=8, intermediate_size=8, num_hidden_layers=1,
    num_attention_heads=1, num_key_value_heads=1, head_dim=8, position_embedding_size=4,
    patch_size=2, pooling_kernel_size=1,
)  # fmt: skip


def text_only_config(canvas_length: int, **text: Any) -> DiffusionGemmaConfig:
    """A DiffusionGemma config of the text settings `text` (transformers' names), its vision
    tower a token one."""
    return DiffusionGemmaConfig(
        text_config=text, canvas_length=canvas_length, vision_config=TINY_VISION
    )
