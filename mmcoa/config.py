"""The params model: one pydantic tree for every stage, frozen, unknown keys rejected.

Hyperparameters live here; paths do not (the caller passes them). Epsilons are integers or
floats in 1/255 units for L-inf (``eps_255``) and plain floats for L2 (``eps``), so a params
file reads the way papers write budgets.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, ValidationError, model_validator


class Strict(BaseModel):
    """Base of every params block: immutable, and a typo is an error, not a silent default."""

    model_config = ConfigDict(frozen=True, extra="forbid")


class DataParams(Strict):
    """Where datasets come from, the fine-tuning set, and how images reach the model.

    ``dataset`` is the fine-tuning set (a registered name, ``folder:PATH`` or ``csv:PATH``); the sets every
    model is evaluated on are ``evaluate.datasets``. Subsets are stratified and drawn from ``seed``.
    """

    dataset: str = "fashion_mnist"
    root: str | None = Field(None, description="Raw-data folder; None = the dataset's default location")
    download: bool = Field(False, description="Allow torchvision to download when files are missing")
    n_train: int = Field(20000, ge=10, description="Fine-tuning subset size")
    resolution: Literal["native", "model"] = Field(
        "native",
        description="Where perturbations live: the dataset's native size (upsampled inside the model, the "
        "authors' protocol for CIFAR) or the model's input size (resize + centre crop first)",
    )
    on_corrupt: Literal["skip", "fail"] = Field("skip", description="An unreadable image: skip and count it, or stop")
    num_workers: int = Field(0, ge=0, description="DataLoader worker processes")
    cache_max_images: int = Field(
        50000, ge=0, description="Subsets up to this size are cached decoded by `fetch`; larger ones stream"
    )


class ModelParams(Strict):
    """The model under test: a shipped/open_clip architecture, optionally with pretrained weights.

    ``pretrained`` is an open_clip tag (``openai``), a local ``.safetensors``/``.pt`` file, or
    None to train from scratch. ``arch`` may also be ``hf-hub:org/name``.
    """

    arch: str = "mmcoa-tiny-fmnist"
    pretrained: str | None = None


class PretrainParams(Strict):
    """Contrastive pre-training from scratch (the embedded default has no pretrained CLIP).

    ``datasets``: the mixture, each dataset with the number of training images it contributes (drawn
    from its train split, repeated when smaller): class prompts for classification sets, the paired
    captions for retrieval sets. The numbers set the mixture's proportions.
    """

    datasets: dict[str, int] = Field(default_factory=lambda: {"fashion_mnist": 20000}, min_length=1)
    steps: int = Field(400, ge=1)
    batch_size: int = Field(256, ge=2)
    lr: float = Field(1e-3, gt=0)
    weight_decay: float = Field(0.1, ge=0)
    warmup_steps: int = Field(20, ge=0)
    same_class_targets: bool = Field(True, description="Count same-class pairs of a batch as positives")


class BaseParams(Strict):
    """The base model: loaded as it is, or trained from scratch only when ``pretrain`` is set."""

    model: ModelParams = ModelParams()
    pretrain: PretrainParams | None = None


class ZeroShotParams(Strict):
    """How class prompts are built for zero-shot classification and for text attacks."""

    prompts: Literal["first", "ensemble", "paper"] = Field(
        "first",
        description="Class prompts per dataset: its first template, the field's prompt ensemble (mean embedding), "
        "or the MMCoA authors' single template",
    )
    templates: list[str] | None = Field(None, description="Explicit templates for every dataset (overrides prompts)")
    batch_size: int = Field(256, ge=1)


class BudgetSchedule(Strict):
    """A linear warm-up of an image attack's budget over the first steps of training.

    At step s (from 0) the radius is ``start + (eps - start) * min(1, s / warmup_steps)``, and a step
    size the attack is given scales with it, so the attack keeps its shape while its ball grows
    (the warm-up used to fine-tune robustly from a non-robust pretrained model). The start is
    ``eps_start_255`` (L-inf, 1/255 units) or ``eps_start`` (L2, pixels), 0 by default.
    """

    warmup_steps: int = Field(ge=1)
    eps_start_255: float | None = Field(None, ge=0, description="L-inf radius at step 0 (1/255 units)")
    eps_start: float | None = Field(None, ge=0, description="L2 radius at step 0 (pixels)")

    @model_validator(mode="after")
    def _one_start(self) -> BudgetSchedule:
        if self.eps_start_255 is not None and self.eps_start is not None:
            raise ValueError("give one start radius: eps_start_255 (L-inf) or eps_start (L2)")
        return self


class TrainAttackSpec(Strict):
    """A train-time adversary, in the evaluation suite's form: a registered attack and its params
    (checked by the attack registry with the rest of the registered names, like the suite's).

    ``weight``: its share in a mixture (a list of specs; each step draws one by weight). ``schedule``:
    an optional warm-up of its budget (image attacks with an eps radius only).
    """

    attack: str
    params: dict[str, Any] = Field(default_factory=dict)
    weight: float = Field(1.0, ge=0, description="Share of the steps that draw it, in a mixture")
    schedule: BudgetSchedule | None = None


def _train_attack(value: Any) -> TrainAttackSpec | list[TrainAttackSpec] | None:
    """One spec, a mixture (a list of specs whose weights sum to a positive number) or None; a
    problem is named by its key inside the slot (``[1].weight: ...``)."""
    if value is None or isinstance(value, TrainAttackSpec):
        return value
    if not isinstance(value, list):
        return _spec(value, "")
    if not value:
        raise ValueError("an empty mixture; give at least one attack, or null for none")
    specs = [_spec(v, f"[{i}].") for i, v in enumerate(value)]
    if not sum(s.weight for s in specs) > 0:
        raise ValueError("the mixture's weights must sum to a positive number")
    return specs


def _spec(value: Any, where: str) -> TrainAttackSpec:
    if isinstance(value, TrainAttackSpec):
        return value
    if not isinstance(value, dict):
        raise ValueError(f"{where}give {{attack: NAME, params: {{...}}}}, a list of them, or null")
    try:
        return TrainAttackSpec.model_validate(value)
    except ValidationError as err:
        raise ValueError(describe_error(err, prefix=where)) from None


# A train-time adversary slot: one attack, a mixture, or none.
TrainAttack = Annotated[Any, BeforeValidator(_train_attack)]

# Today's training threat models, unchanged: PGD-10 at 1/255 and one GloVe word substitution.
DEFAULT_IMAGE_ATTACK = TrainAttackSpec(
    attack="pgd", params={"norm": "linf", "eps_255": 1.0, "step_255": 1.0, "steps": 10, "random_start": True}
)
DEFAULT_TEXT_ATTACK = TrainAttackSpec(
    attack="word",
    params={"word_budget": 1, "candidates": "glove", "k": 10, "cos_threshold": 0.5, "mlm_name": "bert-base-uncased"},
)


def train_attack_specs(value: TrainAttackSpec | list[TrainAttackSpec] | None) -> list[TrainAttackSpec]:
    """A slot's specs as a list (one spec: a mixture of one; None: empty)."""
    return [] if value is None else [value] if isinstance(value, TrainAttackSpec) else list(value)


class OverfitGuardParams(Strict):
    """Detection of catastrophic overfitting: robust accuracy under PGD collapsing while the training
    attack's holds. Every ``every`` steps a fixed probe batch of the training set is attacked with the
    training adversary and with PGD-``pgd_steps`` at the same radius; a gap above ``threshold``
    (accuracy, as a fraction) is an event: ``stop`` ends training with an error naming the step,
    ``switch`` trains with that PGD from then on. ``enabled`` None: on for single-step image adversaries.
    """

    enabled: bool | None = None
    every: int = Field(10, ge=1)
    probe_size: int = Field(64, ge=1)
    pgd_steps: int = Field(10, ge=1)
    threshold: float = Field(0.2, ge=0, le=1)
    action: Literal["stop", "switch"] = "switch"


# Keys of a variant that are not training params.
_RECIPE_KEYS = ("defense", "label")


class FinetuneParams(Strict):
    """Adversarial fine-tuning: one training loop, a defense (or a named variant of one) chosen by name."""

    methods: list[str] = Field(default_factory=lambda: ["mmcoa"], min_length=1,
                               description="Defenses or variants (finetune.variants) to train, one model each")
    template: str | None = Field(None, description="Caption template; None = the dataset's first template")
    options: dict[str, Any] = Field(default_factory=dict, description="The defense's options (its own params "
                                    "model checks them), e.g. pmg_aft alpha/beta")
    steps: int = Field(100, ge=1)
    batch_size: int = Field(128, ge=2)
    accum_steps: int = Field(1, ge=1)
    optimizer: Literal["adam", "adamw", "sgd"] = "adam"
    lr: float = Field(1e-5, gt=0)
    betas: tuple[float, float] = (0.9, 0.98)
    eps: float = Field(1e-6, gt=0)
    weight_decay: float = Field(0.2, ge=0)
    schedule: Literal["constant", "cosine"] = "constant"
    warmup_steps: int = Field(0, ge=0)
    grad_clip: float | None = Field(None, gt=0)
    logit_scale_max: float = Field(100.0, gt=0, description="Clamp of exp(logit_scale), as TeCoA")
    same_class_targets: bool = Field(False, description="MMCoA fidelity: off (diagonal targets)")
    checkpoint_every: int = Field(25, ge=1)
    amp: bool = Field(True, description="bf16 autocast on CUDA; ignored on CPU")
    compile: bool = False
    image_attack: TrainAttack = Field(DEFAULT_IMAGE_ATTACK, description="{attack: NAME, params: {...}}, a list "
                                      "of them (a mixture, each with a weight), or null")
    text_attack: TrainAttack = Field(DEFAULT_TEXT_ATTACK, description="As image_attack, for the text side")
    overfit_guard: OverfitGuardParams = OverfitGuardParams()
    variants: dict[str, dict[str, Any]] = Field(
        default_factory=dict,
        description="Named training recipes: {tecoa_fgsm: {defense: tecoa, label: ..., image_attack: {...}, "
        "options: {...}}}, any key above allowed; a variant's name serves in methods",
    )
    overrides: dict[str, dict[str, Any]] = Field(
        default_factory=dict,
        description="Per-method (defense or variant) overrides of any key above, e.g. "
        "{fare: {image_attack: {params: {eps_255: 2}}}}",
    )

    @model_validator(mode="after")
    def _recipes_resolve(self) -> FinetuneParams:
        for name, body in self.variants.items():
            if "defense" not in body:
                raise ValueError(f"finetune.variants.{name}: names no defense; add defense: NAME")
            if body["defense"] in self.variants:
                raise ValueError(f"finetune.variants.{name}.defense: '{body['defense']}' is a variant; name a defense")
        for name in [*self.variants, *self.overrides]:
            try:
                self.recipe(name)
            except ValidationError as err:
                raise ValueError(describe_error(err, prefix=self.layer_key(name) + ".")) from None
        return self

    def defense_of(self, method: str) -> str:
        """The defense a method names: its variant's ``defense``, or the method itself."""
        return self.variants[method]["defense"] if method in self.variants else method

    def layer_key(self, method: str) -> str:
        """Where ``method``'s own settings are written (for messages)."""
        return f"finetune.variants.{method}" if method in self.variants else f"finetune.overrides.{method}"

    def layers(self, method: str) -> list[tuple[str, dict]]:
        """(dotted key, settings) applied on top of these params for ``method``, in order:
        ``overrides[defense]``, then for a variant its own keys and ``overrides[variant]``."""
        defense = self.defense_of(method)
        out = [(f"finetune.overrides.{defense}", self.overrides.get(defense, {}))]
        if method != defense:
            out += [(f"finetune.variants.{method}", self.variants[method]),
                    (f"finetune.overrides.{method}", self.overrides.get(method, {}))]
        return [(key, layer) for key, layer in out if layer]

    def recipe(self, method: str) -> Recipe:
        """What training ``method`` means: its defense, label (None: the defense's) and training params
        with every layer of :meth:`layers` merged in, validated again."""
        layers = self.layers(method)
        if not layers:
            return Recipe(name=method, defense=method, params=self.model_copy(
                update={"methods": [method], "variants": {}, "overrides": {}}))
        tree = self.model_dump(exclude={"variants", "overrides", "methods"})
        label = None
        for _, layer in layers:
            label = layer.get("label", label)
            tree = _merge_recipe(tree, {k: v for k, v in layer.items() if k not in _RECIPE_KEYS})
        params = FinetuneParams.model_validate({**tree, "methods": [method]})
        return Recipe(name=method, defense=self.defense_of(method), label=label, params=params)

    def slot_key(self, method: str, slot: str) -> str:
        """The dotted key that set ``slot`` (image_attack, options, ...) for ``method``: the last layer
        that names it, else this block's."""
        for key, layer in reversed(self.layers(method)):
            if slot in layer:
                return f"{key}.{slot}"
        return f"finetune.{slot}"


class Recipe(Strict):
    """One trainable method resolved: the defense it trains, an explicit display label (None: the
    defense's own) and its training params, with no variants or overrides left to apply."""

    name: str
    defense: str
    label: str | None = None
    params: FinetuneParams


def _merge_recipe(base: dict, extra: dict) -> dict:
    """Deep merge, except that an attack slot given a new ``attack`` (or a list, or null) is replaced
    whole: the params of one attack never leak into another's."""
    out = dict(base)
    for key, value in extra.items():
        slot = key in ("image_attack", "text_attack")
        replace = slot and (not isinstance(value, dict) or "attack" in value or not isinstance(out.get(key), dict))
        if not replace and isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _deep_merge(out[key], value)
        else:
            out[key] = value
    return out


class AttackSpec(Strict):
    """One entry of an evaluation suite: a metric name, a registered attack and its params.

    ``family`` groups attacks for the worst case per sample (default: the attack's side: image, text or
    multimodal). ``worst_only`` entries run in the cascade only (on samples every earlier attack of the
    family left correct) and count toward the worst case, not as a column of their own. ``datasets``
    limits an expensive attack to some datasets (None = every one); a family's worst case on a dataset
    is over the attacks that ran there, and result.json lists them.
    """

    name: str = Field(pattern=r"^[a-z0-9_]+$")
    attack: str
    params: dict[str, Any] = Field(default_factory=dict)
    family: str | None = Field(None, pattern=r"^[a-z0-9_]+$")
    worst_only: bool = False
    datasets: list[str] | None = Field(None, min_length=1)

    def runs_on(self, dataset: str) -> bool:
        return self.datasets is None or dataset in self.datasets


class EvaluateParams(Strict):
    """What every model (base, each fine-tuned defense, each of ``models``) is evaluated on, and how.

    ``datasets``: zero-shot classification and retrieval sets; the fine-tuning set among them is
    reported apart from the held-out ones. ``suite`` attacks classification, ``retrieval_suite``
    retrieval. ``models``: further models by name (open_clip tag, hf-hub name, file or folder).
    """

    datasets: list[str] = Field(default_factory=lambda: ["fashion_mnist"], min_length=1)
    sources: dict[str, str | dict[str, Any]] = Field(
        default_factory=dict,
        description="Names of datasets given by reference (folder:PATH, csv:PATH, retrieval-json:PATH, ...) or "
        "declared as data ({csv: PATH | folder: PATH, classnames: [...] | FILE, templates: [...] | FILE}, or "
        "{retrieval_json: PATH} / {retrieval_csv: PATH}), so that `datasets`, metric keys and pipeline paths use "
        "a plain name: {mine: 'folder:/data/mine'}",
    )
    models: dict[str, ModelParams] = Field(default_factory=dict)
    n_samples: int = Field(500, ge=1)
    n_images: int = Field(1000, ge=2, description="Retrieval gallery size (images, with all their captions)")
    batch_size: int = Field(250, ge=1)
    suite: list[AttackSpec] = Field(default_factory=list)
    retrieval_suite: list[AttackSpec] = Field(default_factory=list)
    sweep: AttackSpec | None = Field(None, description="Attack re-run at each eps of sweep_eps_255")
    sweep_eps_255: list[float] = Field(default_factory=list)
    n_examples: int = Field(6, ge=0)
    linear_probe: bool = Field(True, description="Also report a linear probe on frozen image features")

    @model_validator(mode="after")
    def _unique_names(self) -> EvaluateParams:
        for key, suite in (("suite", self.suite), ("retrieval_suite", self.retrieval_suite)):
            names = [s.name for s in suite]
            dupes = sorted({n for n in names if names.count(n) > 1})
            if dupes:
                raise ValueError(f"{key} names must be unique; repeated: {dupes}")
            reserved = [n for n in names if n == "clean" or n.startswith("worst_")]
            if reserved:
                raise ValueError(f"{key}: 'clean' and 'worst_*' are reserved; rename {reserved}")
        dupes = sorted({d for d in self.datasets if self.datasets.count(d) > 1})
        if dupes:
            raise ValueError(f"datasets repeated: {dupes}")
        for name in [*self.datasets, *self.sources]:
            if not re.fullmatch(r"[A-Za-z0-9_-]+", name):
                raise ValueError(f"datasets: '{name}' is not a plain name; give it one in evaluate.sources "
                                 f"({{my_name: '{name}'}}) and list my_name here")
        return self


class Params(Strict):
    """Every stage's params, as in params.yaml."""

    seed: int = 0
    device: str = Field("auto", description="auto | cpu | cuda | cuda:N")
    threads: int | None = Field(None, ge=1, description="torch CPU threads; None = torch default")
    data: DataParams = DataParams()
    base: BaseParams = BaseParams()
    zeroshot: ZeroShotParams = ZeroShotParams()
    finetune: FinetuneParams = Field(default_factory=FinetuneParams)
    evaluate: EvaluateParams = EvaluateParams()


class ParamsError(ValueError):
    """A params file that cannot be used; the message names the key and how to fix it."""


def _deep_merge(base: dict, extra: dict) -> dict:
    out = dict(base)
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _deep_merge(out[key], value)
        else:
            out[key] = value
    return out


def _set_dotted(tree: dict, dotted: str, value: Any) -> None:
    node = tree
    *parents, leaf = dotted.split(".")
    for part in parents:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ParamsError(f"{dotted}: '{part}' is not a params group; cannot set '{leaf}' under it")
    node[leaf] = value


def describe_error(err: ValidationError, prefix: str = "") -> str:
    """One line per problem: ``key.path: what is wrong`` (``prefix`` before each key path). A check of
    a whole block that names its own full key (``finetune.variants.x: ...``) is printed as it is."""
    lines = []
    for e in err.errors():
        loc = prefix + ".".join(str(p) for p in e["loc"]) or "<top level>"
        msg = e["msg"].removeprefix("Value error, ")
        if e["type"] == "extra_forbidden":
            msg = "unknown key (check the spelling against params.yaml)"
        lines.append(msg if msg.startswith(loc.rstrip(".") + ".") else f"{loc.rstrip('.')}: {msg}")
    return "; ".join(lines)


def parse_params(raw: dict | None, overrides: dict[str, Any] | None = None) -> Params:
    """Validate a params tree plus dotted overrides (``finetune.lr=1e-4``) into :class:`Params`."""
    tree = dict(raw or {})
    for dotted, value in (overrides or {}).items():
        _set_dotted(tree, dotted, value)
    try:
        return Params.model_validate(tree)
    except ValidationError as err:
        raise ParamsError(describe_error(err)) from None


def load_params(path: str | Path, overrides: dict[str, Any] | None = None) -> Params:
    """Read a YAML params file; raise :class:`ParamsError` with the offending key on any problem."""
    path = Path(path)
    if not path.is_file():
        raise ParamsError(f"{path}: params file not found (pass --params PATH)")
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        raise ParamsError(f"{path}: not valid YAML ({err})") from None
    if not isinstance(raw, dict):
        raise ParamsError(f"{path}: top level must be a mapping of params groups")
    return parse_params(raw, overrides)


def parse_override(text: str) -> tuple[str, Any]:
    """``key.path=value`` with the value read as YAML (numbers, lists, booleans)."""
    if "=" not in text:
        raise ParamsError(f"override '{text}' must look like key.path=value")
    key, value = text.split("=", 1)
    return key.strip(), yaml.safe_load(value)
