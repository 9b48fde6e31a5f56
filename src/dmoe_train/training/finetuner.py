"""Router fine-tuning as a LightningModule: the masked-diffusion loss plus a coreset-size
regularizer, under the model's routing policy. The router trains (`trainable` widens that to the
experts or every weight); Lightning's checkpoints hold only the trainable tensors and their
optimizer state, never the frozen base."""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import replace
from functools import partial
from typing import Any

import lightning as L
import torch
from torch import Tensor, nn
from torch.func import functional_call
from torch.optim import Optimizer
from torch.optim.lr_scheduler import LRScheduler

from dmoe_train.models import TRAINABLE_SETS, TrainableSet, in_trainable_set, is_router_param
from dmoe_train.models.adapted_weights import base_fingerprint
from dmoe_train.models.block_diffusion import AttentionMode, noised_forward
from dmoe_train.models.lora import ExpertLora, add_expert_lora, init_expert_lora, is_lora_param
from dmoe_train.models.sharding import (
    assign_shard,
    full_tensor,
    gathered,
    load_shards,
    shard_model,
)
from dmoe_train.objectives.expert_metrics import unique_experts_per_block
from dmoe_train.objectives.masked_diffusion import masked_diffusion_loss, row_uniforms
from dmoe_train.objectives.regularizers import CoresetRegularizer
from dmoe_train.routing import Routing, RoutingPolicy

log = logging.getLogger(__name__)

DEFAULT_OPTIMIZER = partial(torch.optim.AdamW, lr=1e-3)
DISTILL_INPUTS = ("batch", "random")


def routing_stats(routing: list[Routing], block_size: int) -> dict[str, Tensor]:
    """Unique experts per block and coreset size, means over MoE layers, samples and blocks."""
    unique = torch.stack(
        [unique_experts_per_block(r.ids, block_size).float().mean() for r in routing]
    ).mean()
    coresets = [r.coreset.sum(-1).float().mean() for r in routing if r.coreset is not None]
    return {
        "unique_experts": unique,
        "coreset_size": torch.stack(coresets).mean() if coresets else unique,
    }


def router_z_loss(routing: list[Routing]) -> Tensor:
    """ST-MoE's z-loss: the mean squared log-sum-exp of the router logits, over tokens and MoE
    layers; keeps logits small, so softmax scores stay smooth while the router is retrained."""
    return torch.stack([r.logits.logsumexp(-1).pow(2).mean() for r in routing]).mean()


def masked_kl(
    teacher_logits: Tensor, student_logits: Tensor, masked: Tensor, count: Tensor
) -> Tensor:
    """KL(teacher || student) of the token distributions, summed over masked positions and divided
    by `count` (the masked-token count, as the diffusion loss is normalised)."""
    log_t = teacher_logits[masked].float().log_softmax(-1)
    log_s = student_logits[masked].float().log_softmax(-1)
    return (log_t.exp() * (log_t - log_s)).sum() / count.clamp_min(1)


def random_tokens(keys: list[int], n: int, vocab: int, mask_id: int) -> Tensor:
    """`[B, n]` tokens drawn uniformly from the vocabulary less the mask token, row i from a
    generator seeded by `keys[i]` (as `row_uniforms`): inputs that belong to no task."""
    rows = [
        torch.randint(vocab - 1, (n,), generator=torch.Generator().manual_seed(k)) for k in keys
    ]
    tokens = torch.stack(rows)
    return tokens + (tokens >= mask_id).long()  # skip the mask token


def curriculum_policy(policy: RoutingPolicy, start: float, progress: float) -> RoutingPolicy:
    """The policy `progress` (0..1) of the way from `start` to its own coreset setting: top_p for
    `topp`, the capacity for capacity policies (rounded to whole experts)."""
    progress = min(max(progress, 0.0), 1.0)
    if policy.name == "topp":
        return replace(policy, top_p=start + (policy.top_p - start) * progress)
    if policy.name in ("des_vote", "capacity_max"):
        return replace(policy, capacity=round(start + (policy.capacity - start) * progress))
    raise ValueError(
        f"module.curriculum_start={start} with router.name={policy.name!r}: a curriculum moves "
        "the top_p of topp or the capacity of des_vote / capacity_max"
    )


class RouterFineTuner(L.LightningModule):
    """Router fine-tuning. Objectives beside the diffusion loss: the coreset-size `regularizer`;
    `distill_weight`: self-distillation from the run's starting model under token routing (one
    forward without gradients; KL on the masked positions) on `distill_inputs`: "batch", the same
    noised input, or "random", uniformly random tokens of the batch's shape and response mask
    (no task's prompt or response: one more forward with gradients); a curriculum
    that moves the coreset from `curriculum_start` to the policy's own setting over the first
    `curriculum_fraction` of the steps (validation always runs the policy's own setting)."""

    def __init__(
        self,
        model: nn.Module,
        regularizer: CoresetRegularizer | None = None,
        optimizer: Callable[..., Optimizer] = DEFAULT_OPTIMIZER,
        scheduler: Callable[..., LRScheduler] | None = None,
        t_low: float = 0.3,
        t_high: float = 0.8,
        loss_weighting: str = "none",
        attention: AttentionMode = "block_diffusion",
        train_expert_bias: bool = False,
        trainable: TrainableSet = "router",
        activation_checkpointing: bool = False,
        seed: int = 0,
        max_bad_batches: int = 0,
        z_loss_weight: float = 0.0,
        distill_weight: float = 0.0,
        distill_inputs: str = "batch",
        curriculum_start: float | None = None,
        curriculum_fraction: float = 0.5,
        lora: dict | None = None,
    ) -> None:
        super().__init__()
        if trainable not in TRAINABLE_SETS:
            raise ValueError(f"module.trainable={trainable!r}: must be one of {TRAINABLE_SETS}")
        # `module.lora` (rank, alpha, targets) shapes the adapters of the `+lora` sets
        self.lora = ExpertLora(**(lora or {})) if "lora" in trainable.split("+") else None
        if self.lora is not None:
            add_expert_lora(model, self.lora)
            if not any(p.is_meta for p in model.parameters()):  # else once sharded
                init_expert_lora(model, seed)
        if distill_weight < 0:
            raise ValueError(f"module.distill_weight={distill_weight}: must be >= 0")
        if distill_inputs not in DISTILL_INPUTS:
            raise ValueError(
                f"module.distill_inputs={distill_inputs!r}: must be one of {DISTILL_INPUTS}"
            )
        if not 0.0 < curriculum_fraction <= 1.0:
            raise ValueError(f"module.curriculum_fraction={curriculum_fraction}: must be in (0, 1]")
        if not 0.0 <= t_low <= t_high <= 1.0:
            raise ValueError(
                f"module.t_low={t_low}, t_high={t_high}: need 0 <= t_low <= t_high <= 1"
            )
        self.model = model
        self.regularizer = regularizer or CoresetRegularizer("none", 0.0)
        # partials (Hydra `_partial_` targets): optimizer(params), scheduler(optimizer,
        # num_training_steps=...); no scheduler: a constant learning rate
        self.optimizer_factory, self.scheduler_factory = optimizer, scheduler
        self.t_low, self.t_high, self.loss_weighting = t_low, t_high, loss_weighting
        self.attention = attention
        self.train_expert_bias, self.trainable = train_expert_bias, trainable
        self.seed = seed
        self.z_loss_weight = z_loss_weight
        self.distill_weight, self.distill_inputs = distill_weight, distill_inputs
        self.target_policy = model.config.routing
        self.curriculum_start, self.curriculum_fraction = curriculum_start, curriculum_fraction
        if curriculum_start is not None:
            curriculum_policy(self.target_policy, curriculum_start, 0.0)  # fails early if unfit
        self.max_bad_batches, self.bad_batches = max_bad_batches, 0
        model.activation_checkpointing = activation_checkpointing
        model.train()  # loaded models come in eval mode; ours has no dropout, but be explicit
        # the frozen base is reloaded from its directory on resume, not from our checkpoints
        self.strict_loading = False
        self.eval_label = "val"  # the metric prefix of validation runs (`labelled`)
        for name, p in self.model.named_parameters():
            p.requires_grad_(self.is_trainable(name))
            if self.is_master_fp32(name):
                p.data = p.data.float()
        self.sharded = False
        self.start_fingerprint = None if self.on_meta() else base_fingerprint(model)
        self.teacher_weights: dict[str, Tensor] = {}
        self.keep_teacher_weights()

    def keep_teacher_weights(self, refresh: bool = False) -> None:
        """A copy of the starting trainable weights: the distillation teacher is the starting model
        (not the one being trained) under token routing. On the meta device (FSDP) it is taken
        once the shards are loaded; on resume, before the checkpoint's weights replace the base's;
        `refresh`: again, once a starting router (`init_router`) replaced the base's."""
        if self.distill_weight and (refresh or not self.teacher_weights):
            params = {n: p for n, p in self.model.named_parameters() if p.requires_grad}
            if not self.on_meta():
                self.teacher_weights = {n: p.detach().clone() for n, p in params.items()}

    def on_meta(self) -> bool:
        """Whether the model still waits for its shards (FSDP builds it on the meta device)."""
        return any(p.is_meta for p in self.model.parameters())

    def is_trainable(self, name: str) -> bool:
        """The one predicate for what trains and what every checkpoint of ours saves. The expert
        bias is LLaDA2's balancing state, not a weight: it trains only when asked to."""
        name = name.removeprefix("model.")
        if name.endswith("expert_bias"):
            return self.train_expert_bias and is_router_param(name)
        return in_trainable_set(name, self.trainable)

    def is_master_fp32(self, name: str) -> bool:
        """Weights kept in fp32: the router (it computes in fp32 anyway) and whatever trains."""
        return is_router_param(name) or self.is_trainable(name)

    @property
    def block_size(self) -> int:
        return self.model.config.routing.block_size

    def parameter_counts(self) -> tuple[int, int]:
        params = list(self.model.parameters())
        return sum(p.numel() for p in params if p.requires_grad), sum(p.numel() for p in params)

    @contextmanager
    def labelled(self, label: str) -> Iterator[None]:
        """Validation metrics inside the block are logged as `label/...` (`dmoe-train` measures
        token routing, the starting and the adapted router apart), `val/...` again after it."""
        self.eval_label = label
        try:
            yield
        finally:
            self.eval_label = "val"

    def on_fit_start(self) -> None:
        trainable, total = self.parameter_counts()
        if self.trainer.is_global_zero:
            log.info(
                "trainable parameters: %s of %s (%.4f%%)",
                f"{trainable:,}",
                f"{total:,}",
                100 * trainable / total,
            )

    def on_train_start(self) -> None:
        if self.trainer.ckpt_path and self.trainer.is_global_zero:
            log.info("resumed from %s at step %d", self.trainer.ckpt_path, self.global_step)

    def configure_model(self) -> None:
        """Under `ModelParallelStrategy` (trainer=fsdp) the model arrives on the meta device: shard
        it over the device mesh (FSDP2), then each rank loads its shards of the base weights."""
        if self.device_mesh is None or self.sharded:
            return
        # a full fine-tune is fp32 throughout: its layers need no units of their own. Adapters
        # stay in their decoder layer's unit: the MoE block reads their factors directly, which
        # FSDP2 gathers only inside the forward of the unit that holds them
        if self.trainable == "all":
            own_unit = is_router_param
        else:
            own_unit = lambda n: self.is_master_fp32(n) and not is_lora_param(n)  # noqa: E731
        shard_model(self.model, self.device_mesh, own_unit)
        load_shards(self.model, self.model.name_or_path, self.trainer.strategy.root_device)
        if self.lora is not None:
            init_expert_lora(self.model, self.seed, assign_shard)
        self.sharded = True
        self.start_fingerprint = base_fingerprint(self.model)
        self.keep_teacher_weights()

    def trainable_state(self) -> dict[str, Tensor]:
        """The trainable tensors, whole: a collective under sharding, every rank calls it."""
        params = {n: p for n, p in self.model.named_parameters() if self.is_trainable(n)}
        with gathered(list(params.values())):
            return {n: full_tensor(p).detach().cpu().clone() for n, p in params.items()}

    def mean_count(self, masked: Tensor) -> Tensor:
        """The masked-token count, averaged over data-parallel ranks. Ranks' gradients and logged
        losses are averaged, so normalising each rank's loss sum by the mean count gives exactly
        the loss of the whole global batch, as one process would compute it."""
        count = masked.sum().float()
        if self._trainer is None or self.trainer.world_size == 1:
            return count
        return self.trainer.strategy.reduce(count, reduce_op="mean")

    def step_stats(self, batch: dict, *key: int) -> dict[str, Tensor]:
        """Loss and routing stats of one batch; a sample's noise is keyed by (seed, *key, its
        dataset index), so it is the same whatever rank or world size the sample lands in."""
        cfg = self.model.config
        x0 = batch["input_ids"]
        keys = [hash((self.seed, *key, int(i))) % 2**63 for i in batch["index"]]
        noised = partial(
            noised_forward,
            x0=x0,
            response_mask=batch["response_mask"],
            mask_id=cfg.mask_token_id,
            t_low=self.t_low,
            t_high=self.t_high,
            mode=self.attention,
            block_size=self.block_size,
            uniforms=row_uniforms(keys, x0.shape[1], x0.device),
        )
        out = noised(self.model)
        count = self.mean_count(out.masked)
        lm = masked_diffusion_loss(out.logits, x0, out.masked, out.t, self.loss_weighting, count)
        reg = self.regularizer.size(out.routing, self.block_size, cfg.moe.top_k)
        z = router_z_loss(out.routing)
        if self.distill_weight and self.distill_inputs == "random":
            noised = partial(noised, x0=self.random_inputs(keys, x0))
            out_kl = noised(self.model)
            kl = self.distillation(
                noised, out_kl.logits, out_kl.masked, self.mean_count(out_kl.masked)
            )
        else:
            kl = self.distillation(noised, out.logits, out.masked, count)
        loss = (
            lm
            + self.regularizer.weight * reg / cfg.moe.num_experts
            + self.z_loss_weight * z
            + self.distill_weight * kl
        )
        return {
            "loss": loss,
            "lm_loss": lm,
            "regularizer": reg,
            "z_loss": z,
            "distill_kl": kl,
            **routing_stats(out.routing, self.block_size),
        }

    def random_inputs(self, keys: list[int], x0: Tensor) -> Tensor:
        """Random tokens in `x0`'s shape, keyed apart from the noise (tuples of ints hash the
        same in every process): distillation inputs of no task."""
        cfg = self.model.config
        keys = [hash((k, -1)) % 2**63 for k in keys]
        return random_tokens(keys, x0.shape[1], cfg.vocab_size, cfg.mask_token_id).to(x0.device)

    def distillation(
        self, noised: Callable, logits: Tensor, masked: Tensor, count: Tensor
    ) -> Tensor:
        """KL from the starting model under token routing to this forward, on its masked
        positions (0 without distillation)."""
        if not self.distill_weight:
            return logits.new_zeros(())
        device = logits.device  # the copy stays where it was taken; Lightning moves the model
        self.teacher_weights = {n: t.to(device) for n, t in self.teacher_weights.items()}
        token = RoutingPolicy("token", block_size=self.block_size)
        with torch.no_grad(), self.model.routing_as(token):
            teacher = noised(
                lambda *a, **kw: functional_call(self.model, self.teacher_weights, a, kw)
            )
        return masked_kl(teacher.logits, logits, masked, count)

    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        if self.curriculum_start is not None:
            total = max(1, self.trainer.max_steps) * self.curriculum_fraction
            progress = self.global_step / total
            self.model.set_routing(
                curriculum_policy(self.target_policy, self.curriculum_start, progress)
            )

    def on_validation_start(self) -> None:
        # validation inside fit runs the policy's own setting (a standalone `validate`, as
        # `dmoe-train` measures token routing, keeps the policy it was given)
        if self.curriculum_start is not None and self.trainer.state.fn == "fit":
            self.model.set_routing(self.target_policy)

    def on_train_end(self) -> None:
        if self.curriculum_start is not None:
            self.model.set_routing(self.target_policy)

    def training_step(self, batch: dict, batch_idx: int) -> Tensor:
        accumulate = self.trainer.accumulate_grad_batches
        stats = self.step_stats(batch, self.global_step, batch_idx % accumulate)
        if not torch.isfinite(stats["loss"]):
            if self.bad_batches < self.max_bad_batches:  # skip it: no backward, no update
                self.bad_batches += 1
                log.warning(
                    "skipping batch with non-finite loss at step %d (%d of at most %d)",
                    self.global_step,
                    self.bad_batches,
                    self.max_bad_batches,
                )
                return None
            # stop before the optimizer applies it: the last checkpoint stays the last good one
            raise FloatingPointError(
                f"non-finite loss {stats['loss'].item()} at step {self.global_step} "
                f"(lm_loss {stats['lm_loss'].item()}, regularizer {stats['regularizer'].item()})"
            )
        shown = ("loss", "unique_experts")
        for k, v in stats.items():
            self.log(
                f"train/{k}",
                v,
                prog_bar=k in shown,
                batch_size=len(batch["input_ids"]),
                sync_dist=True,  # the mean over ranks, not rank 0's share
            )
        self.log("lr", self.trainer.optimizers[0].param_groups[0]["lr"])
        return stats["loss"]

    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        bad = [  # whole gradients: every rank must reach the same verdict
            n
            for n, p in self.model.named_parameters()
            if p.grad is not None and not torch.isfinite(full_tensor(p.grad)).all()
        ]
        if bad:
            raise FloatingPointError(f"non-finite gradient at step {self.global_step}: {bad[:5]}")

    def validation_stats(self, batch: dict) -> dict[str, Tensor]:
        """Stats with validation's fixed noise: every evaluation of a sample draws the same."""
        return self.step_stats(batch, -1)

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        stats = self.validation_stats(batch)
        self.log_dict(
            {
                f"{self.eval_label}/{k}": stats[k]
                for k in ("lm_loss", "unique_experts", "coreset_size")
            },
            sync_dist=True,
            prog_bar=True,
            batch_size=len(batch["input_ids"]),
        )

    def configure_optimizers(self) -> dict[str, Any]:
        opt = self.optimizer_factory([p for p in self.model.parameters() if p.requires_grad])
        if self.scheduler_factory is None:
            return {"optimizer": opt}
        sched = self.scheduler_factory(opt, num_training_steps=max(1, self.trainer.max_steps))
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    def state_dict(self, *args: Any, **kwargs: Any) -> dict[str, Any]:
        """Only the trainable tensors: what every checkpoint holds, under every strategy (FSDP's
        distributed checkpoints save and load exactly these keys); the frozen base is reloaded
        from its own directory."""
        full = super().state_dict(*args, **kwargs)
        prefix = kwargs.get("prefix", "")
        return type(full)(
            (k, v) for k, v in full.items() if self.is_trainable(k.removeprefix(prefix))
        )
