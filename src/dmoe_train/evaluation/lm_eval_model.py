"""The lm-evaluation-harness model `dmoe`: our block-diffusion decoder (`generate_until`) and
the masked-diffusion Monte Carlo log-likelihood (`loglikelihood`) behind lm-eval's `LM` API,
under any routing policy, with unique experts per block reported beside the task metrics.

lm-eval finds models only by import (LLaDA's own evaluation scripts import their model file,
then call lm-eval's CLI), so `dmoe-lm-eval` (`cli/lm_eval.py`) is lm-eval's CLI with this
model registered:

    dmoe-lm-eval --model dmoe --model_args pretrained=<dir>,router=<router.safetensors> \\
        --tasks gsm8k --batch_size 8

Model args: `pretrained` (a local model directory), `router` (a run's adapted weights),
`routing` (a preset of configs/router: token, topp, dmoe, llada22, ...) with `top_p`,
`min_experts`, `capacity` overrides, `decoding` (a preset of configs/generation: tiny, llada2)
with `block_length`, `steps`, `threshold`, `gen_length` overrides, `mc_samples` (Monte Carlo
samples per log-likelihood), `dtype`, `seed`; `max_memory` (`0:70GiB;1:70GiB;cpu:200GiB`) with
`offload_dir` places a base that does not fit one device (accelerate's device map: GPUs, then
CPU, then disk). Under `accelerate launch` the requests are split over the processes and the
results gathered on the main one (on CPU: `accelerate launch --multi_gpu --num_processes 2`
with `--device cpu`, gloo; accelerate's `--cpu` flag starts one process unless mpirun is used).
"""

from __future__ import annotations

import logging
import os
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path
from typing import Any

import torch
from hydra.utils import instantiate
from lm_eval.api.model import LM
from lm_eval.api.registry import register_model
from tqdm import tqdm

from dmoe_train.data.tokenizer import load_tokenizer
from dmoe_train.evaluation.canvas_decoding import CanvasDecoding, generate_canvases
from dmoe_train.evaluation.split_decoding import (
    GenerationSettings,
    apply_expert_cache,
    cache_metrics,
    check_expert_store,
    decode_prompts,
    experts_in_files,
)
from dmoe_train.models import GEMMA, load_model, model_type
from dmoe_train.models.adapted_weights import load_adapted
from dmoe_train.models.block_diffusion import noised_forward
from dmoe_train.models.placement import parse_max_memory, place_model
from dmoe_train.models.routing_control import policy_of, set_policy
from dmoe_train.reports import markdown_table
from dmoe_train.routing import RoutingPolicy
from dmoe_train.settings import preset, settings_of

log = logging.getLogger(__name__)


def stop_at(text: str, until: list[str]) -> str:
    """`text` up to the first of the stop sequences."""
    cut = min((i for i in (text.find(s) for s in until if s) if i >= 0), default=len(text))
    return text[:cut]


@dataclass(frozen=True)
class ModelArgs:
    """The dmoe model's own `--model_args` (see the module docstring); the others are decoding
    and policy overrides."""

    router: str | None = None
    routing: str | None = None
    decoding: str = "tiny"
    mc_samples: int = 16
    batch_size: int | str = 8
    dtype: str = "float32"
    device: str | None = None
    seed: int = 0
    max_memory: str | None = None
    offload_dir: str | None = None


POLICY_KEYS = {"top_p", "min_experts", "capacity"}  # model_args a `routing` preset takes


def route_as_asked(
    model: Any, routing: str | None, router: str | None, model_args: dict, block_length: int
) -> None:
    """The routing `model_args` ask for: the `routing` preset with its `POLICY_KEYS`, on the
    decoding blocks, and the adapted weights of `router` under it (or under their own)."""
    policy = None
    if routing is not None:
        with settings_of("model_args"):  # a bad top_p, min_experts or capacity is named there
            policy = instantiate({**preset("router", routing), **_pick(model_args, POLICY_KEYS)})
        policy = replace(policy, block_size=block_length)
    if router is not None:
        load_adapted(model, router, policy)
    elif policy is not None:
        set_policy(model, policy)


@register_model("dmoe")
class DiffusionLM(LM):
    latest: DiffusionLM | None = None  # the instance `dmoe-lm-eval` reports on

    def __new__(cls, pretrained: str, **model_args: Any) -> DiffusionLM:
        # lm-eval builds `--model dmoe` by this class alone: a DiffusionGemma directory gets the
        # canvas model (transformers' `generate`), every other family ours
        if cls is DiffusionLM and model_type(Path(pretrained)) == GEMMA:
            cls = CanvasLM
        return super().__new__(cls)

    def __init__(self, pretrained: str, **model_args: Any) -> None:
        super().__init__()
        own = {f.name for f in fields(ModelArgs)}
        args = ModelArgs(**{k: v for k, v in model_args.items() if k in own})
        overrides = {k: v for k, v in model_args.items() if k not in own}
        router, routing, decoding, device = args.router, args.routing, args.decoding, args.device
        dtype, max_memory, offload_dir = args.dtype, args.max_memory, args.offload_dir
        batch_size, mc_samples, seed = args.batch_size, args.mc_samples, args.seed
        decoding_keys = {"block_length", "steps", "threshold", "gen_length", "expert_cache"}
        decoding_keys |= {"expert_store"}
        unknown = set(overrides) - POLICY_KEYS - decoding_keys - {"max_batch_size"}
        if unknown:
            raise ValueError(f"model_args {sorted(unknown)}: unknown to the dmoe model")
        picked = _pick(overrides, decoding_keys)
        if str(picked.get("expert_cache", "all")).isdigit():  # model_args arrive as text
            picked["expert_cache"] = int(picked["expert_cache"])
        self.settings = GenerationSettings(**{**preset("generation", decoding), **picked})
        check_expert_store(self.settings, router)
        self._device = self.data_parallel(device)
        if max_memory is None:
            self.model = load_model(
                pretrained,
                dtype=getattr(torch, dtype),
                device=self._device,
                expert_cache=experts_in_files(self.settings),
            )
        else:  # loaded on the CPU, then spread over the devices
            self.model = load_model(pretrained, dtype=getattr(torch, dtype))
            self.model = place_model(self.model, parse_max_memory(max_memory), offload_dir)
            self._device = next(self.model.parameters()).device
        self.model.eval()
        self.tokenizer = load_tokenizer(pretrained)
        route_as_asked(self.model, routing, router, overrides, self.settings.block_length)
        self.policy: RoutingPolicy = self.model.config.routing
        self.router = router  # the report says whose router routes: the base's, or this one
        if self.policy.uses_blocks and self.policy.block_size != self.settings.block_length:
            raise ValueError(
                f"router block_size={self.policy.block_size} != block_length="
                f"{self.settings.block_length}: routing blocks must be the decoding blocks"
            )
        apply_expert_cache(self.model, self.settings)
        self.batch_size = 8 if batch_size == "auto" else int(batch_size)
        self.mc_samples, self.seed = int(mc_samples), int(seed)
        self.unique_sum, self.forwards = 0.0, 0  # decoding forwards' unique experts per block
        self.blocks, self.tokens_out = 0, 0  # what this process decoded (the cache's measures)
        DiffusionLM.latest = self

    def data_parallel(self, device: str | None) -> torch.device:
        """Under `accelerate launch` (WORLD_SIZE > 1) this process's rank and device."""
        self.accelerator = None
        if int(os.environ.get("WORLD_SIZE", "1")) > 1:  # accelerate launch: data parallel
            from accelerate import Accelerator

            self.accelerator = Accelerator(cpu=device == "cpu" or not torch.cuda.is_available())
            self._rank = self.accelerator.process_index
            self._world_size = self.accelerator.num_processes
            device = self.accelerator.device
            device = "cpu" if device.type == "cpu" else str(device)  # not "cpu:0"
        return torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))

    # lm-eval's data-parallel primitives (see lm_eval.api.model.LM)
    def all_gather(self, tensor: torch.Tensor) -> torch.Tensor:
        return tensor if self.accelerator is None else self.accelerator.gather(tensor)

    def gather_object(self, obj: Any, dst: int = 0) -> list | None:
        if self.accelerator is None:
            return [obj]
        out = [None] * self.world_size if self.rank == dst else None
        torch.distributed.gather_object(obj, out, dst=dst)
        return out

    def barrier(self) -> None:
        if self.accelerator is not None:
            self.accelerator.wait_for_everyone()

    @property
    def tokenizer_name(self) -> str:
        return str(self.tokenizer.name_or_path).replace("/", "__")

    def chat_template(self, chat_template: bool | str = False) -> str | None:
        return self.tokenizer.chat_template if chat_template else None

    def apply_chat_template(self, chat_history: list[dict], add_generation_prompt: bool = True):
        if not self.tokenizer.chat_template:
            raise ValueError(
                f"--apply_chat_template: the tokenizer of {self.model.name_or_path} has none"
            )
        return self.tokenizer.apply_chat_template(
            chat_history, add_generation_prompt=add_generation_prompt, tokenize=False
        )

    def encode(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    @torch.no_grad()
    def generate_until(self, requests: list, disable_tqdm: bool = False) -> list[str]:
        """Greedy block-diffusion decoding (the `decoding` preset), cut at the stop sequences."""
        s, out = self.settings, []
        bar = tqdm(total=len(requests), disable=disable_tqdm or self.rank != 0, desc="generate")
        for lo in range(0, len(requests), self.batch_size):
            batch = [r.args for r in requests[lo : lo + self.batch_size]]
            for _, kwargs in batch:
                if kwargs.get("do_sample") or kwargs.get("temperature", 0.0) > 0:
                    raise ValueError(f"gen_kwargs {kwargs}: the dmoe model decodes greedily")
            lengths = [int(k.get("max_gen_toks", s.gen_length or 256)) for _, k in batch]
            gen = decode_prompts(self.model, [self.encode(c) for c, _ in batch], max(lengths), s)
            # over every sample's own decoding forwards, as dMoE counts
            self.unique_sum += float((gen.unique_experts.mean(-1) * gen.counted).sum())
            self.forwards += int(gen.counted.sum())
            self.blocks, self.tokens_out = (
                self.blocks + gen.blocks,
                self.tokens_out + gen.tokens.numel(),
            )
            out += self.answers(batch, gen.tokens, lengths)
            bar.update(len(batch))
        bar.close()
        return out

    def answers(self, batch: list, tokens: torch.Tensor, lengths: list[int]) -> list[str]:
        """Each request's generated `tokens`, cut at its `max_gen_toks` and stop sequences."""
        out = []
        for (_, kwargs), row, n in zip(batch, tokens, lengths, strict=True):
            text = self.tokenizer.decode(row[:n], skip_special_tokens=True)
            until = kwargs.get("until") or []
            out.append(stop_at(text, [until] if isinstance(until, str) else until))
        return out

    @torch.no_grad()
    def loglikelihood(self, requests: list, disable_tqdm: bool = False) -> list[tuple[float, bool]]:
        disable = disable_tqdm or self.rank != 0
        return [self.continuation_loglikelihood(*r.args) for r in tqdm(requests, disable=disable)]

    def continuation_loglikelihood(self, context: str, continuation: str) -> tuple[float, bool]:
        """The masked-diffusion bound on log p(continuation | context), estimated by Monte Carlo
        (LLaDA's estimator, in the block-diffusion layout the model was trained on): with
        t_i = (i + u_i) / n stratified over (0, 1), each continuation token is masked with
        probability t_i and the estimate is the mean of (1 / t_i) * sum over masked tokens of
        log p(token). The same seeded noise for every request, so the estimate depends on the
        request alone (not its batch or process). Greedy: every continuation token is the
        argmax when all of them are masked."""
        cfg, block = self.model.config, self.settings.block_length
        ctx, cont = self.encode(context), self.encode(continuation)
        width = -(-(len(ctx) + len(cont)) // block) * block
        x0 = torch.full((width,), cfg.eos_token_id, dtype=torch.long)  # eos padding, visible
        x0[: len(ctx) + len(cont)] = torch.tensor(ctx + cont, dtype=torch.long)
        response = torch.zeros(width, dtype=torch.bool)
        response[len(ctx) : len(ctx) + len(cont)] = True
        g = torch.Generator().manual_seed(self.seed)
        n = self.mc_samples
        uniforms = torch.rand(n + 1, 1 + width, generator=g)
        uniforms[:n, 0] = (torch.arange(n) + uniforms[:n, 0]) / n
        uniforms[n, 0] = 1.0 - 1e-6  # every continuation token masked: the greedy check
        total, greedy = 0.0, True
        for lo in range(0, n + 1, self.batch_size):
            rows = uniforms[lo : lo + self.batch_size]
            x, resp = x0.expand(len(rows), -1), response.expand(len(rows), -1)
            out = noised_forward(
                self.model, x.to(self._device), resp.to(self._device), cfg.mask_token_id,
                0.0, 1.0, "block_diffusion", block, rows.to(self._device),
            )  # fmt: skip
            logp = out.logits.float().log_softmax(-1).gather(-1, x.to(self._device)[..., None])
            per_sample = (logp[..., 0] * out.masked).sum(-1) / out.t
            estimates = slice(0, min(len(rows), n - lo))
            total += float(per_sample[estimates].sum())
            if lo + len(rows) > n:  # the last row: all masked
                argmax = out.logits[-1].argmax(-1).cpu()
                greedy = bool((argmax[response] == x0[response]).all())
        return total / n, greedy

    def loglikelihood_rolling(self, requests: list, disable_tqdm: bool = False) -> list[float]:
        raise NotImplementedError("the dmoe model has no rolling log-likelihood (perplexity)")

    def routing_report(self) -> dict:
        """Unique experts per block over every sample's own decoding forwards (summed over
        processes) and what they cost in expert bytes."""
        stats = torch.tensor([self.unique_sum, float(self.forwards)], dtype=torch.float64)
        if self.accelerator is not None:
            stats = self.accelerator.reduce(stats.to(self._device), reduction="sum").cpu()
        unique = float(stats[0] / stats[1]) if stats[1] else float("nan")
        cfg = self.model.config
        param = next(self.model.parameters())
        expert_bytes = 3 * cfg.hidden_size * cfg.moe.expert_width * param.element_size()
        return {
            "routing": self.policy.describe(),
            # no retained share here: lm-eval scores the tasks; the base's reference is a second
            # run with routing=token and no router
            "router": self.router or "the base's own",
            "processes": self.world_size,
            "unique_experts_per_block": unique,
            "num_experts": cfg.moe.num_experts,
            "expert_bytes_per_block": unique * expert_bytes,
            "decoding": asdict(self.settings),
            **cache_metrics(self.model, self.blocks, self.tokens_out).to_dict(),  # this process's
        }


def _pick(values: dict, keys: set[str]) -> dict:
    return {k: v for k, v in values.items() if k in keys}


def format_report(report: dict) -> str:
    head = ("routing", "router", "unique experts/block", "of", "expert MB/block")
    row = (
        report["routing"], report["router"], f"{report['unique_experts_per_block']:.2f}",
        report["num_experts"], f"{report['expert_bytes_per_block'] / 2**20:.2f}",
    )  # fmt: skip
    return markdown_table(head, [row])


class CanvasLM(DiffusionLM):
    """`dmoe` on a DiffusionGemma directory: generation tasks by transformers' own `generate`
    under the routing asked for (`decoding`: a preset of configs/generation, `tiny_gemma` by
    default; `steps`, `block_length` overrides). No log-likelihood: uniform-state diffusion has
    no bound implemented here, so likelihood tasks are refused."""

    def __init__(self, pretrained: str, **model_args: Any) -> None:
        LM.__init__(self)
        own = {"router", "routing", "decoding", "batch_size", "dtype", "device", "seed"}
        decoding_keys = {"steps", "block_length"}
        unknown = set(model_args) - own - POLICY_KEYS - decoding_keys - {"max_batch_size"}
        if unknown:
            raise ValueError(f"model_args {sorted(unknown)}: unknown to the dmoe canvas model")
        picked = {k: int(v) for k, v in _pick(model_args, decoding_keys).items()}
        decoding = model_args.get("decoding", "tiny_gemma")
        with settings_of("model_args"):
            self.settings = CanvasDecoding(**{**preset("generation", decoding), **picked})
        self._device = self.data_parallel(model_args.get("device"))
        dtype = getattr(torch, model_args.get("dtype", "float32"))
        self.model = load_model(pretrained, dtype=dtype, device=self._device).eval()
        self.tokenizer = load_tokenizer(pretrained)
        self.router = model_args.get("router")
        route_as_asked(
            self.model, model_args.get("routing"), self.router, model_args,
            self.settings.block_length,
        )  # fmt: skip
        self.policy = policy_of(self.model)
        self.batch_size = int(model_args.get("batch_size", 8))
        self.seed = int(model_args.get("seed", 0))
        self.block_sum, self.canvas_sum, self.counted = 0.0, 0.0, 0
        DiffusionLM.latest = self

    def generate_until(self, requests: list, disable_tqdm: bool = False) -> list[str]:
        """Each request's prompt left-padded into a batch, decoded by `generate` (seeded: the
        sampler draws), cut at the stop sequences."""
        pad, out = self.model.config.text_config.pad_token_id, []
        bar = tqdm(total=len(requests), disable=disable_tqdm or self.rank != 0, desc="generate")
        torch.manual_seed(self.seed)
        for lo in range(0, len(requests), self.batch_size):
            batch = [r.args for r in requests[lo : lo + self.batch_size]]
            encoded = [self.encode(context) for context, _ in batch]
            width = max(map(len, encoded))
            prompts = torch.full((len(encoded), width), pad, dtype=torch.long)
            keep = torch.zeros(prompts.shape, dtype=torch.bool)
            for i, ids in enumerate(encoded):
                prompts[i, width - len(ids) :], keep[i, width - len(ids) :] = (
                    torch.tensor(ids),
                    True,
                )
            lengths = [
                int(k.get("max_gen_toks", self.model.config.canvas_length)) for _, k in batch
            ]
            gen = generate_canvases(
                self.model, prompts.to(self._device), keep.to(self._device), self.settings,
                max_new_tokens=max(lengths),
            )  # fmt: skip
            self.block_sum += float(sum(b.sum() for b in gen.per_block))
            self.canvas_sum += float(sum(c.sum() for c in gen.per_canvas))
            self.counted += sum(b.numel() for b in gen.per_block)
            out += self.answers(batch, gen.tokens.cpu(), lengths)
            bar.update(len(batch))
        bar.close()
        return out

    def loglikelihood(self, requests: list, disable_tqdm: bool = False) -> list[tuple[float, bool]]:
        raise NotImplementedError(
            "DiffusionGemma: likelihood tasks need a log-likelihood bound for uniform-state "
            "diffusion, which the dmoe model does not implement; run generation tasks"
        )

    def routing_report(self) -> dict:
        """Unique experts per block and per canvas over every decoder forward (summed over
        processes)."""
        stats = torch.tensor([self.block_sum, self.canvas_sum, float(self.counted)])
        if self.accelerator is not None:
            stats = self.accelerator.reduce(stats.to(self._device), reduction="sum").cpu()
        per_block, per_canvas = (
            float(x / stats[2]) if stats[2] else float("nan") for x in stats[:2]
        )
        text = self.model.config.text_config
        param = next(self.model.parameters())
        expert_bytes = 3 * text.hidden_size * text.moe_intermediate_size * param.element_size()
        return {
            "routing": self.policy.describe(),
            "router": self.router or "the base's own",
            "processes": self.world_size,
            "unique_experts_per_block": per_block,
            "unique_experts_per_canvas": per_canvas,
            "num_experts": text.num_experts,
            "expert_bytes_per_block": per_block * expert_bytes,
            "decoding": asdict(self.settings),
        }
