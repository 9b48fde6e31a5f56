"""Router fine-tuning as a LightningModule: the step (the diffusion loss, the coreset-size
regularizer and the other objectives of `objectives/`), its logging and its optimizer, under the
model's routing policy. What trains is `settings.weights` (the router by default); Lightning's
checkpoints hold only the trainable tensors and their optimizer state, never the frozen base."""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from functools import partial
from typing import Any

import lightning as L
import torch
from torch import Tensor, nn
from torch.func import functional_call
from torch.optim import Optimizer
from torch.optim.lr_scheduler import LRScheduler

from dmoe_train.models import is_router_param
from dmoe_train.models.adapted_weights import base_fingerprint
from dmoe_train.models.lora import add_expert_lora, init_expert_lora, is_lora_param
from dmoe_train.models.routing_control import moe_of, policy_as, policy_of, set_policy
from dmoe_train.models.sharding import (
    assign_shard,
    full_tensor,
    gathered,
    load_shards,
    shard_model,
)
from dmoe_train.objectives.distillation import distillation_kl
from dmoe_train.objectives.expert_metrics import routing_stats
from dmoe_train.objectives.regularizers import (
    CoresetRegularizer,
    load_balance_loss,
    router_z_loss,
)
from dmoe_train.routing import RoutingPolicy
from dmoe_train.training.settings import FineTuneSettings
from dmoe_train.training.steps import Forward, Step, step_of

log = logging.getLogger(__name__)
DEFAULT_OPTIMIZER = partial(torch.optim.AdamW, lr=1e-3)


class RouterFineTuner(L.LightningModule):
    """Router fine-tuning of `model` under `settings` (noise, distillation, curriculum,
    trainable weights, step); `regularizer`: the coreset-size term; `optimizer(params)` and
    `scheduler(optimizer, num_training_steps=...)` are partials (no scheduler: a constant
    learning rate)."""

    def __init__(
        self,
        model: nn.Module,
        settings: FineTuneSettings,
        regularizer: CoresetRegularizer | None = None,
        optimizer: Callable[..., Optimizer] = DEFAULT_OPTIMIZER,
        scheduler: Callable[..., LRScheduler] | None = None,
    ) -> None:
        super().__init__()
        self.settings, self.model = settings, model
        self.weights = settings.weights
        if self.weights.lora is not None:
            add_expert_lora(model, self.weights.lora)
            if not self.on_meta():  # else once sharded
                init_expert_lora(model, settings.step.seed)
        self.regularizer = regularizer or CoresetRegularizer("none", 0.0)
        self.optimizer_factory, self.scheduler_factory = optimizer, scheduler
        self.target_policy = policy_of(model)
        settings.curriculum.check(self.target_policy)  # fails early if the policy has no coreset
        self.bad_batches = 0
        model.activation_checkpointing = settings.step.activation_checkpointing
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

    @property
    def lora(self):
        return self.weights.lora

    def keep_teacher_weights(self, refresh: bool = False) -> None:
        """A copy of the starting trainable weights: the distillation teacher is the starting model
        (not the one being trained) under token routing. On the meta device (FSDP) it is taken
        once the shards are loaded; on resume, before the checkpoint's weights replace the base's;
        `refresh`: again, once a starting router (`init_router`) replaced the base's."""
        if self.settings.distillation.distill_weight and (refresh or not self.teacher_weights):
            params = {n: p for n, p in self.model.named_parameters() if p.requires_grad}
            if not self.on_meta():
                self.teacher_weights = {n: p.detach().clone() for n, p in params.items()}

    def on_meta(self) -> bool:
        """Whether the model still waits for its shards (FSDP builds it on the meta device)."""
        return any(p.is_meta for p in self.model.parameters())

    def is_trainable(self, name: str) -> bool:
        """The one predicate for what trains and what every checkpoint of ours saves."""
        return self.weights.is_trainable(name)

    def is_master_fp32(self, name: str) -> bool:
        """Weights kept in fp32: the router (it computes in fp32 anyway) and whatever trains."""
        return is_router_param(name) or self.is_trainable(name)

    @property
    def block_size(self) -> int:
        return policy_of(self.model).block_size

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
        if self.weights.trainable == "all":
            own_unit = is_router_param
        else:
            own_unit = lambda n: self.is_master_fp32(n) and not is_lora_param(n)  # noqa: E731
        shard_model(self.model, self.device_mesh, own_unit)
        load_shards(self.model, self.model.name_or_path, self.trainer.strategy.root_device)
        if self.lora is not None:
            init_expert_lora(self.model, self.settings.step.seed, assign_shard)
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
        settings, moe = self.settings, moe_of(self.model)
        keys = [hash((settings.step.seed, *key, int(i))) % 2**63 for i in batch["index"]]
        step = step_of(self.model, batch, keys, settings)
        out = step.forward(self.model, step.x0)
        losses = step.losses(out, self.mean_count)
        reg = self.regularizer.size(out.routing, self.block_size, moe.top_k)
        z = router_z_loss(out.routing)
        balance = load_balance_loss(out.routing, moe.num_experts)
        kl = distillation_kl(
            settings.distillation,
            student=lambda x: step.forward(self.model, x),
            teacher=lambda x: self.teacher_forward(step, x),
            trained=(step.x0, out),
            keys=keys,
            mask_id=step.mask_id,
            count=self.mean_count,
        )
        loss = (
            sum(losses.values())
            + self.regularizer.weight * reg / moe.num_experts
            + settings.step.z_loss_weight * z
            + settings.step.balance_weight * balance
            + settings.distillation.distill_weight * kl
        )
        return {
            "loss": loss,
            **losses,
            "regularizer": reg,
            "z_loss": z,
            "balance_loss": balance,
            "distill_kl": kl,
            **routing_stats(out.routing, self.block_size),
        }

    def teacher_forward(self, step: Step, x0: Tensor) -> Forward:
        """`step`'s noised forward of `x0` by the starting model (its trainable weights as the
        run began) under token routing: the distillation teacher."""
        device = x0.device  # the copy stays where it was taken; Lightning moves the model
        self.teacher_weights = {n: t.to(device) for n, t in self.teacher_weights.items()}
        token = RoutingPolicy("token", block_size=self.block_size)
        with policy_as(self.model, token):
            return step.forward(
                lambda *a, **kw: functional_call(self.model, self.teacher_weights, a, kw), x0
            )

    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        curriculum = self.settings.curriculum
        if curriculum.curriculum_start is not None:
            policy = curriculum.policy_at(
                self.target_policy, self.global_step, self.trainer.max_steps
            )
            set_policy(self.model, policy)

    def on_validation_start(self) -> None:
        # validation inside fit runs the policy's own setting (a standalone `validate`, as
        # `dmoe-train` measures token routing, keeps the policy it was given)
        if self.settings.curriculum.curriculum_start is not None and self.trainer.state.fn == "fit":
            set_policy(self.model, self.target_policy)

    def on_train_end(self) -> None:
        if self.settings.curriculum.curriculum_start is not None:
            set_policy(self.model, self.target_policy)

    def training_step(self, batch: dict, batch_idx: int) -> Tensor:
        accumulate = self.trainer.accumulate_grad_batches
        stats = self.step_stats(batch, self.global_step, batch_idx % accumulate)
        if not torch.isfinite(stats["loss"]):
            allowed = self.settings.step.max_bad_batches
            if self.bad_batches < allowed:  # skip it: no backward, no update
                self.bad_batches += 1
                log.warning(
                    "skipping batch with non-finite loss at step %d (%d of at most %d)",
                    self.global_step,
                    self.bad_batches,
                    allowed,
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
                for k in ("lm_loss", "unique_experts", "coreset_size", "encoder_loss")
                if k in stats
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
