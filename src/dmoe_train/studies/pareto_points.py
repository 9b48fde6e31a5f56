"""The points of `make pareto`, as typed records: what each measures (a routing rule of the base,
or a router trained a given way), in the order the study computes them. A point's label is for
the report and names its stored result; nothing is read back from it."""

from __future__ import annotations

from dataclasses import dataclass
from functools import cache
from pathlib import Path

from omegaconf import DictConfig

from dmoe_train.locations import ASSETS
from dmoe_train.models import TrainableSet
from dmoe_train.objectives.distillation import DistillInputs
from dmoe_train.resolvers import composed

BASE = ASSETS / "tiny256-llada2"  # the four-skill base the points are measured on
CAPACITIES = (8, 12, 16, 24, 32, 48)
PRESET = "tiny256_topp"  # the experiment preset every trained point starts from
TWO_SKILLS = ("add", "sort")  # the held-out rows train on these; reverse and count never


@cache
def preset_config() -> DictConfig:
    """The training config of `experiment=tiny256_topp` as composed: a point's unset settings
    (steps, LoRA rank) are read from it, so the report says what the runs did."""
    return composed("train", [f"experiment={PRESET}"])


@dataclass(frozen=True)
class Training:
    """How a trained point trains: `experiment=tiny256_topp` (top_p 0.7, union 0.1, 500 steps)
    with these settings. `name` describes them in the report."""

    name: str
    top_p: float
    trainable: TrainableSet = "router"
    lora_rank: int | None = None  # None: the preset's module.lora.rank
    regularizer: str = "union"  # union, none, entropy (the preset's weight, 0.1)
    regularizer_weight: float | None = None
    distill: DistillInputs | None = None  # KL to the base (weight 1.0) on these inputs
    curriculum_start: float | None = None
    train_expert_bias: bool = False
    steps: int | None = None  # None: the preset's trainer.max_steps
    lr: float | None = None
    skills: tuple[str, ...] | None = None  # the train split's skills (None: all four)
    generated: Path | None = None  # trains on these rows of the base's own generations
    generated_from: tuple[str, ...] = TWO_SKILLS  # of these skills' train prompts

    @property
    def set_label(self) -> str:
        """The trainable set as the report names it (`router+lora r=2`)."""
        return self.trainable + (f" r={self.lora_rank}" if self.lora_rank else "")

    @property
    def steps_or_default(self) -> int:
        return self.steps or preset_config().trainer.max_steps

    @property
    def lora_rank_or_default(self) -> int:
        return self.lora_rank or preset_config().module.lora.rank

    def overrides(self) -> list[str]:
        """The `dmoe-train` overrides on top of the experiment preset."""
        out = [f"router.top_p={self.top_p}"]
        if self.trainable != "router":
            out.append(f"module.trainable={self.trainable}")
        if self.lora_rank:
            out.append(f"module.lora.rank={self.lora_rank}")
        if self.regularizer != "union":
            out.append(f"regularizer={self.regularizer}")
        if self.regularizer_weight is not None:
            out.append(f"regularizer.weight={self.regularizer_weight}")
        if self.distill:
            out += ["module.distill_weight=1.0", f"module.distill_inputs={self.distill}"]
        if self.curriculum_start is not None:
            out.append(f"module.curriculum_start={self.curriculum_start}")
        if self.train_expert_bias:
            out.append("module.train_expert_bias=true")
        if self.steps:
            out.append(f"trainer.max_steps={self.steps}")
        if self.lr:
            out.append(f"module.optimizer.lr={self.lr}")
        if self.skills:
            out.append(f"data.train_skills=[{','.join(self.skills)}]")
        if self.generated:
            out.append(f"data.source={self.generated / 'rows'}")
        return out

    def trained_on(self) -> str:
        """What the training data held, in words (the held-out table)."""
        if self.generated:
            return "add, sort: the base's generations"
        return "add, sort; KL on random tokens" if self.distill == "random" else "add, sort"


@dataclass(frozen=True)
class StudyPoint:
    """One point: a training-free rule (`routing`: the router overrides of `dmoe-eval`) or a
    trained router (`training`); `method` is its frontier."""

    method: str
    name: str
    routing: tuple[str, ...] = ()
    training: Training | None = None

    @property
    def label(self) -> str:
        return f"p={self.training.top_p} {self.name}" if self.training else self.name

    @property
    def slug(self) -> str:
        """The stored point's directory name."""
        return f"{self.method}__{self.label}".replace(" ", "_").replace("=", "")


def free(method: str, name: str, *routing: str) -> StudyPoint:
    return StudyPoint(method, name, routing=routing)


def trained(method: str, training: Training) -> StudyPoint:
    return StudyPoint(method, training.name, training=training)


BLOCKS = "router.block_size=32"


def training_free() -> list[StudyPoint]:
    """Token routing first (every point's reference), then every rule at several sizes."""
    return [
        free("token", "token", "router=token", BLOCKS),
        *(
            free(
                "topp", f"p={p}", "router=topp", BLOCKS, "router.min_experts=8", f"router.top_p={p}"
            )  # fmt: skip
            for p in (0.3, 0.5, 0.7, 0.8, 0.9, 0.95, 0.99)
        ),
        *(
            free(name, f"c={c}", f"router={name}", BLOCKS, f"router.capacity={c}")
            for name in ("des_vote", "capacity_max")
            for c in CAPACITIES
        ),
        *(  # k=1 too: the frontier then reaches the budgets of the trained points
            free("topk_cap", f"k={k}", "router=topk_cap", BLOCKS, f"router.top_k={k}")
            for k in range(1, 8)
        ),
        *(
            free("dmoe", f"p={p}", "router=dmoe", f"router.top_p={p}")
            for p in (0.3, 0.45, 0.6, 0.75, 0.9)
        ),
        *(free("llada22", f"c={c}", "router=llada22", f"router.capacity={c}") for c in CAPACITIES),
    ]


# trained routers, the frontier: top_p x objective
ROUTERS = [
    Training("union 0.1", 0.7),
    Training("union 0.1", 0.5),
    Training("distill", 0.7, regularizer="none", distill="batch"),
    Training("distill", 0.5, regularizer="none", distill="batch"),
    Training("distill", 0.3, regularizer="none", distill="batch"),
    Training("union 0.1 curriculum", 0.3, curriculum_start=0.9),
]
# the routed experts train too: at top_p 0.6 one switch each (3x and 6x the steps,
# distillation, a 10x lower learning rate)
EXPERTS: TrainableSet = "router+experts"
WITH_EXPERTS = [
    *(Training("union 0.1", p, trainable=EXPERTS) for p in (0.7, 0.6, 0.5)),
    Training("union 0.1 1500 steps", 0.6, trainable=EXPERTS, steps=1500),
    Training("union 0.1 3000 steps", 0.6, trainable=EXPERTS, steps=3000),
    Training("distill", 0.6, trainable=EXPERTS, regularizer="none", distill="batch"),
    Training("union 0.1 lr 3e-4", 0.6, trainable=EXPERTS, lr=3e-4),
]
# router+experts at the trainable sets' budget (top_p 0.6, union 0.1, 500 steps)
EXPERTS_AT_BUDGET = WITH_EXPERTS[1]
# between the router and all experts at that budget: the trainable-set frontier
SETS = [
    Training("router", 0.6),
    Training("router+shared", 0.6, trainable="router+shared"),
    Training("router+lora r=2", 0.6, trainable="router+lora", lora_rank=2),
    Training("router+lora", 0.6, trainable="router+lora"),  # rank 8
    Training("router+lora+shared", 0.6, trainable="router+lora+shared"),
]
# the cheap set at router+experts' step count (3000 steps reached 99% there); at top_p 0.5 too:
# where token routing uses fewer experts per block, 15% of them takes a smaller coreset
LONG_CHEAP = [
    Training("router+lora+shared 3000 steps", p, trainable="router+lora+shared", steps=3000)
    for p in (0.6, 0.5)
]
# the router at the smallest coreset trained here: where token routing touches under 60 experts
# per block, 15% of them leaves little above the k experts any block touches
SMALLEST_ROUTER = Training("router", 0.3)
HELD_OUT_SETS = [*SETS[:3], EXPERTS_AT_BUDGET]  # router, +shared, +lora r=2, +experts


def held_out(generated: Path) -> list[Training]:
    """Trained on add and sort alone, tested on all four skills; `generated`: where the base's
    own generations of the two skills' prompts are (`dmoe-generate`)."""

    def on_two(s: Training, tag: str = "", **how) -> Training:
        name = f"{s.set_label} add+sort{tag}"
        return Training(name, 0.6, trainable=s.trainable, lora_rank=s.lora_rank, **how)

    rank2 = SETS[2]
    return [
        *(on_two(s, skills=TWO_SKILLS) for s in HELD_OUT_SETS),
        on_two(rank2, " generated", generated=generated),
        *(on_two(s, " distill", skills=TWO_SKILLS, distill="batch") for s in HELD_OUT_SETS),
        # KL to the token-routed base on inputs of no task at all (random tokens, no labels)
        on_two(rank2, " distill random", skills=TWO_SKILLS, distill="random"),
    ]


# the ablation: one switch at a time against top_p 0.5 union 0.1 (and distill) above
ABLATION = [
    Training("none", 0.5, regularizer="none"),
    Training("union 0.3", 0.5, regularizer_weight=0.3),
    Training("entropy 0.1", 0.5, regularizer="entropy"),
    Training("union 0.1 expert bias", 0.5, train_expert_bias=True),
    Training("union 0.1 curriculum", 0.5, curriculum_start=0.9),
    Training("distill + union 0.1", 0.5, distill="batch"),
]


def study(generated: Path, with_trained: bool = True, broad: bool = False) -> list[StudyPoint]:
    """Every point in the order computed: token routing (the reference), the trained points
    (the goal's before the ablation's: a run cut short still answers the goal first), then
    the training-free rules. `broad` (the broad suite): the trainable sets and LONG_CHEAP
    alone (the sets' 500-step runs first: a run cut short has every set's answer), as its skills
    are held out by `make breadth` instead."""
    rules = training_free()
    if not with_trained:
        return rules
    if broad:
        sets = [trained("sets", t) for t in (*SETS, SMALLEST_ROUTER, *LONG_CHEAP)]
        return [rules[0], *sets, trained("trained+experts", EXPERTS_AT_BUDGET), *rules[1:]]
    points = [
        *(trained("trained", t) for t in ROUTERS),
        *(trained("trained+experts", t) for t in WITH_EXPERTS),
        *(trained("sets", t) for t in SETS[:4]),
        *(trained("held-out", t) for t in held_out(generated)),
        *(trained("sets", t) for t in SETS[4:]),
        *(trained("ablation", t) for t in ABLATION),
    ]
    return [rules[0], *points, *rules[1:]]
