"""Build AdaPM param groups from a model: presets first recognise each block, user rules override.

:func:`partition` returns one param group per trainable parameter (as Adam-mini does), each carrying
its policy keys, so the policy travels with the parameter into ``state_dict`` and the report.
"""

from __future__ import annotations

import re
import warnings
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from adapm.config import AdaPMConfig
from adapm.partition.layout import check_clip, check_lr_ratio, check_rank_ratio
from adapm.partition.presets import (
    CONV1D_CLASS_NAMES,
    FUSED_QKV_PATTERN,
    HEAD_COUNT_KEYS,
    HIDDEN_SIZE_KEYS,
    KV_HEAD_COUNT_KEYS,
    PAPER_MOMENTUM,
    PEFT_ADAPTER_CONTAINERS,
    PEFT_WHOLE_MODULES,
    PRESET_RULES,
    SEGMENT_NAMES,
    PresetRule,
    config_attr,
    fused_parts,
    plain_name,
    rule_head_size,
)
from adapm.policies.momentum import MOMENTUM
from adapm.policies.precision import STATE_DTYPES
from adapm.policies.second_moment import SECOND_MOMENT

_POLICY_KEYS = ("momentum", "second_moment", "rank_ratio", "update_clip", "lr_ratio", "state_dtype")


class _Unset:
    """A rule field left to the presets and defaults (``None`` is a value for ``update_clip``)."""

    def __repr__(self) -> str:
        return "UNSET"


UNSET: Any = _Unset()


@dataclass(frozen=True)
class Rule:
    """A user rule: parameters (or fused segments, named like ``...c_attn.weight[V]``) whose name
    matches ``pattern`` (a regular expression, searched) get the given policies; ``None`` keeps the
    preset's choice. User rules are tried in order before the presets' policies apply.
    """

    pattern: str
    momentum: str | None = None
    second_moment: str | None = None
    rank_ratio: float | None = None
    update_clip: Any = UNSET
    """An update clip for the matched blocks (a positive float, or None for no clip), applied whatever
    the optimizer's ``clip_scope``; unset keeps the optimizer's rule."""
    lr_ratio: float | None = None
    """A learning-rate multiplier for the matched blocks (overrides ``lr_ratios``)."""
    state_dtype: str | None = None
    """How the matched parameters store their large state (``fp32``, ``bf16`` or ``int8``; overrides the
    optimizer's ``state_dtype``). A fused parameter stores its state as one tensor per key, so the rules
    matching its segments must agree."""

    def __post_init__(self) -> None:
        try:
            re.compile(self.pattern)
        except re.error as exc:
            raise ValueError(f"Invalid rule pattern {self.pattern!r}: {exc}") from exc
        if self.momentum is not None and self.momentum not in MOMENTUM:
            raise ValueError(
                f"Invalid momentum policy in rule {self.pattern!r}: {self.momentum!r}; "
                f"expected one of {tuple(MOMENTUM)}"
            )
        if self.second_moment is not None and self.second_moment not in SECOND_MOMENT:
            raise ValueError(
                f"Invalid second_moment policy in rule {self.pattern!r}: {self.second_moment!r}; "
                f"expected one of {tuple(SECOND_MOMENT)}"
            )
        if self.rank_ratio is not None:
            check_rank_ratio(self.rank_ratio, f"rule {self.pattern!r}")
        if self.update_clip is not UNSET:
            check_clip(self.update_clip, f"rule {self.pattern!r}")
        if self.lr_ratio is not None:
            check_lr_ratio(self.lr_ratio, f"rule {self.pattern!r}")
        if self.state_dtype is not None and self.state_dtype not in STATE_DTYPES:
            raise ValueError(
                f"Invalid state_dtype in rule {self.pattern!r}: {self.state_dtype!r}; "
                f"expected one of {tuple(STATE_DTYPES)}"
            )


def parse_rules(rules: Iterable[Any] | None) -> list[Rule]:
    """Accept ``Rule`` objects or ``(pattern, policy)`` pairs, where ``policy`` is a momentum name or a
    dict with any of ``momentum``, ``second_moment``, ``rank_ratio``, ``update_clip``, ``lr_ratio``,
    ``state_dtype``."""
    if rules is None:
        return []
    if isinstance(rules, (str, bytes, Mapping)):
        raise TypeError("rules must be a list of (pattern, policy) pairs or adapm.Rule objects")
    parsed = []
    for i, rule in enumerate(rules):
        if isinstance(rule, Rule):
            parsed.append(rule)
            continue
        if not (isinstance(rule, (tuple, list)) and len(rule) == 2 and isinstance(rule[0], str)):
            raise TypeError(f"rules[{i}] must be a (pattern, policy) pair or an adapm.Rule, got {rule!r}")
        pattern, policy = rule
        if isinstance(policy, str):
            parsed.append(Rule(pattern, momentum=policy))
        elif isinstance(policy, Mapping):
            unknown = set(policy) - set(_POLICY_KEYS)
            if unknown:
                raise ValueError(f"rules[{i}] has unknown policy keys {sorted(unknown)}; allowed: {_POLICY_KEYS}")
            parsed.append(Rule(pattern, **policy))
        else:
            raise TypeError(f"rules[{i}]: policy must be a momentum name or a dict, got {policy!r}")
    return parsed


def _config_value(config: Any, keys: Sequence[str]) -> int | None:
    for key in keys:
        value = config_attr(config, key)
        if isinstance(value, int) and value > 0:
            return value
    return None


@dataclass(frozen=True)
class ModelDims:
    """Sizes read from a model's config with the presets' keys (None where the config does not say)."""

    hidden: int | None
    heads: int | None
    kv_heads: int | None


def model_dims(model: nn.Module | None) -> ModelDims:
    """Hidden size, attention heads and key/value heads of ``model`` (HF and nanoGPT-style configs; a
    multimodal model's are its language model's)."""
    config = _config_of(model)
    if config is None:
        return ModelDims(None, None, None)
    if callable(getattr(config, "get_text_config", None)):
        config = config.get_text_config()
    heads = _config_value(config, HEAD_COUNT_KEYS)
    return ModelDims(_config_value(config, HIDDEN_SIZE_KEYS), heads, _config_value(config, KV_HEAD_COUNT_KEYS) or heads)


ATTENTION_AND_MLP_ROLES = frozenset({"query", "key", "value", "attn_out", "mlp", "fused"})
"""The roles of the attention and MLP matrices (what GaLore projects), a fused weight's included."""


def head_dim_of(model: nn.Module | None) -> int | None:
    """Attention head size from ``model.config`` (HF and nanoGPT-style configs), or None if unknown.

    Wrappers that keep the model in ``.module`` (DDP) or ``._orig_mod`` (torch.compile) are looked through.
    """
    return _head_dim(_config_of(model))


def _head_dim(config: Any) -> int | None:
    if config is None:
        return None
    for key in ("head_dim", "d_kv", "dim_head"):  # d_kv: T5's and its kin's (Pix2Struct, UMT5...); dim_head: CPM-Ant's
        head_dim = config_attr(config, key)
        if isinstance(head_dim, int) and head_dim > 0:
            return head_dim
    heads = _config_value(config, HEAD_COUNT_KEYS)
    hidden = _config_value(config, HIDDEN_SIZE_KEYS)
    if heads and hidden and hidden % heads == 0:
        return hidden // heads
    return None


def _ancestors(model: nn.Module | None, name: str) -> Iterator[nn.Module]:
    """The modules holding parameter ``name`` in ``model``, innermost first (the model itself excluded)."""
    found: list[nn.Module] = []
    module = model
    for part in name.split(".")[:-1]:  # one walk down the name (it is looked up for every parameter, for many rules)
        module = module._modules.get(part) if isinstance(module, nn.Module) else None
        if module is None:
            break
        found.append(module)
    return reversed(found)


def _scope(model: nn.Module | None, name: str) -> nn.Module | None:
    """The model whose config describes parameter ``name``: the innermost Hugging Face model holding it (a
    multimodal model's language model has a config of its own, e.g. Gemma 3's ``text_config``), else
    ``model`` itself."""
    holders = (m for m in _ancestors(model, name) if getattr(m, "config", None) is not None)
    return next((m for m in holders if hasattr(type(m), "config_class")), model)


def _layer_config(config: Any, name: str) -> Any:
    """The config of the layer parameter ``name`` is in, where ``config`` differs per layer (Gemma 4's
    ``per_layer_config``: sliding and global attention layers have different head sizes; Inkling's sliding-window
    layers, sized by its ``swa_*`` fields; latent-attention layers without rotary parts, marked 0 in
    ``no_rope_layers``), else ``config``."""
    found = re.search(r"(^|\.)layers\.(\d+)\.", name)
    if found is None:
        return config
    index = int(found.group(2))
    per_layer = config_attr(config, "per_layer_config")
    try:
        layer = per_layer[index] if per_layer is not None and index < len(per_layer) else config
    except (AttributeError, IndexError, KeyError, TypeError):  # a view over a config without a layer count (a
        layer = config  # resampler's, such as Idefics2's perceiver): its layers all share the config
    layer_types = config_attr(config, "layer_types")
    if (
        config_attr(config, "swa_head_dim") is not None
        and isinstance(layer_types, (list, tuple))
        and index < len(layer_types)
        and "sliding" in str(layer_types[index])
    ):
        return _SlidingLayerConfig(layer)
    no_rope = config_attr(config, "no_rope_layers")
    rope = config_attr(layer, "qk_rope_head_dim")
    if isinstance(no_rope, (list, tuple)) and index < len(no_rope) and no_rope[index] == 0 and rope:
        return _NoRopeLayerConfig(layer)
    return layer


class _LayerConfigView:
    """A config as one kind of layer reads it: the fields :meth:`_own` gives in place of the config's, everything else
    as it is."""

    def __init__(self, config: Any) -> None:
        self._config = config

    def __getattr__(self, key: str) -> Any:
        if key.startswith("_"):  # private names (and ``_config`` itself, before it is set) are not config fields
            raise AttributeError(key)
        value = self._own(key)
        return value if value is not None else getattr(self._config, key)

    def _own(self, key: str) -> Any:
        return None


class _SlidingLayerConfig(_LayerConfigView):
    """A config as a sliding-window layer reads it: its ``swa_`` sizes (``swa_head_dim``, ``swa_num_attention_heads``,
    ...) in place of the global ones."""

    def _own(self, key: str) -> Any:
        return config_attr(self._config, f"swa_{key}")


class _NoRopeLayerConfig(_LayerConfigView):
    """A latent-attention config as a layer without rotary parts reads it (Mistral Large 4's NoPE layers): no rotary
    key (``qk_rope_head_dim`` 0), each head's query and key all ``qk_nope_head_dim`` (the rotary size added to it)."""

    def _own(self, key: str) -> Any:
        if key == "qk_rope_head_dim":
            return 0
        if key == "qk_nope_head_dim":
            return self._config.qk_nope_head_dim + self._config.qk_rope_head_dim
        return None


def _match_preset(names: Sequence[str], model: nn.Module | None) -> tuple[str, PresetRule] | None:
    """The first preset rule matching any of a (possibly tied) parameter's names, with that name. Rules
    for given model types only match models of those types; expert-stack rules only their module classes
    (so that another family's expert rule further down can match)."""
    for name in names:
        model_type = _model_type(_scope(model, name))
        holders = _holder_classes(model, name)
        plain = plain_name(name)
        for rule in PRESET_RULES:
            if rule.model_types and model_type not in rule.model_types:
                continue
            if rule.within and holders.isdisjoint(rule.within):
                continue
            if rule.layout == "experts" and rule.fused_modules:
                owner = _owner(model, name)
                if owner is None or type(owner).__name__ not in rule.fused_modules:
                    continue
            if re.search(rule.pattern, plain):
                return name, rule
    return None


def _peft_adapter(model: nn.Module | None, names: Sequence[str]) -> bool:
    """Whether a parameter is a PEFT adapter's own: held in a container that its tuner layer declares
    (:data:`PEFT_ADAPTER_CONTAINERS`), other than the copy of a module PEFT trains whole."""
    if model is None:
        return False
    for name in names:
        holders = [model, *reversed(list(_ancestors(model, name)))]  # outermost first: each holds the next part
        for module, part in zip(holders, name.split(".")[:-1]):
            # an instance's own (DoRA adds its magnitudes to a LoRA layer's), else its class's; no nn.Module lookup
            declared = vars(module).get(PEFT_ADAPTER_CONTAINERS) or getattr(type(module), PEFT_ADAPTER_CONTAINERS, None)
            if isinstance(declared, (tuple, list)) and part in declared and part not in PEFT_WHOLE_MODULES:
                return True
    return False


def _match_user(rules: Sequence[Rule], names: Sequence[str]) -> Rule | None:
    """The first user rule matching one of ``names``, as they are or as preset patterns read them (so a rule written
    for a model still takes its modules once PEFT wraps them, e.g. ``lm_head\\.weight$``)."""
    if not rules:
        return None
    names = [*names, *(plain for plain in map(plain_name, names) if plain not in names)]
    for rule in rules:
        if any(re.search(rule.pattern, name) for name in names):
            return rule
    return None


def _owner(model: nn.Module | None, name: str) -> nn.Module | None:
    if model is None or "." not in name:
        return None
    try:
        return model.get_submodule(name.rsplit(".", 1)[0])
    except AttributeError:
        return None


def _config_of(model: nn.Module | None) -> Any:
    while model is not None and getattr(model, "config", None) is None:
        inner = getattr(model, "module", None) or getattr(model, "_orig_mod", None)
        if not isinstance(inner, nn.Module):
            break
        model = inner
    return getattr(model, "config", None)


def _model_type(model: nn.Module | None) -> str | None:
    value = getattr(_config_of(model), "model_type", None)
    return value if isinstance(value, str) and value else None


def _class_names(module: nn.Module) -> tuple[str, str]:
    """``module``'s class named alone (``CausalSelfAttention``) and with its module
    (``litgpt.model.CausalSelfAttention``: a class name that other code may use too), as a rule's ``within`` may name
    it."""
    cls = type(module)
    return cls.__name__, f"{cls.__module__}.{cls.__qualname__}"


def _holder_classes(model: nn.Module | None, name: str) -> frozenset[str]:
    """The classes of the modules holding parameter ``name``, by both their names (:func:`_class_names`)."""
    return frozenset(n for m in _ancestors(model, name) for n in _class_names(m))


def _module_head_dim(model: nn.Module | None, name: str, classes: tuple[str, ...]) -> int | None:
    """The ``head_dim`` of the innermost module of one of ``classes`` holding parameter ``name``, where it has one (a
    vision tower's attention, whose config may name its width and heads in ways of its own), else its width ``dim`` over
    its head count (``num_heads``; ``groups`` in DaViT's channel attention, whose channel groups are its heads)."""
    owner = next((m for m in _ancestors(model, name) if not set(_class_names(m)).isdisjoint(classes)), None)
    head_dim = _positive(getattr(owner, "head_dim", None))
    width = _positive(getattr(owner, "dim", None))
    heads = _positive(getattr(owner, "num_heads", None)) or _positive(getattr(owner, "groups", None))
    if head_dim is None and width and heads and width % heads == 0:
        return width // heads
    return head_dim


def _positive(value: object) -> int | None:
    """``value`` if it is a positive integer (not a bool), else None."""
    return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else None


def _rows_sharded(param: torch.Tensor) -> bool:
    """Whether ``param`` is a DTensor whose rows are sharded (FSDP2's ``Shard(0)``)."""
    from adapm.distributed import is_dtensor

    return is_dtensor(param) and any(placement.is_shard(0) for placement in param.placements)  # type: ignore[attr-defined]


def _fused_layout_known(rule: PresetRule, name: str, shape: tuple[int, ...], model: nn.Module | None) -> bool:
    """Whether the fused weight ``name`` really holds ``rule.roles`` in contiguous equal parts: decided
    by its module class and the model type, never by the name alone."""
    owner = _owner(model, name)
    if rule.layout == "experts":  # only a known expert module says what its 3-D weights hold
        return owner is not None and type(owner).__name__ in rule.fused_modules and len(shape) == 3
    if rule.model_types:  # matched for this model type: the module class must be the declared one
        return owner is not None and type(owner).__name__ in rule.fused_modules and len(shape) == 2
    if owner is not None:
        cls = type(owner).__name__
        if cls not in rule.fused_modules:
            return False
        if cls in CONV1D_CLASS_NAMES:
            return True
        return not rule.plain_model_only or _model_type(_scope(model, name)) is None
    # Names only: an (n, k*n) Conv1D layout is unambiguous; an (k*n, n) nn.Linear weight may be
    # nanoGPT's contiguous layout or a Hugging Face model's interleaved one.
    count = len(rule.roles)
    return any(c in rule.fused_modules for c in CONV1D_CLASS_NAMES) and len(shape) == 2 and shape[1] == count * shape[0]


def _out_dim(name: str, model: nn.Module | None, conv1d_default: bool, in_out: bool = False) -> int:
    """The output-neuron axis of a weight: 1 for Conv1D's (in, out) layout or one its rule declares ``in_out``, else
    0."""
    if in_out:
        return 1
    owner = _owner(model, name)
    if owner is not None:
        return 1 if type(owner).__name__ in CONV1D_CLASS_NAMES else 0
    return 1 if conv1d_default else 0


def _role_block(role: str, out_dim: int, head_dim: int | None, shape: tuple[int, ...]) -> Any:
    """Adam-mini's block for a role: per token, per head, per output neuron or per tensor."""
    if role in ("embedding", "output"):
        return (0, 1)
    if role in ("query", "key"):
        size = head_dim if head_dim and shape[out_dim] % head_dim == 0 else 1
        return (out_dim, size)
    if role in ("value", "attn_out", "mlp", "router"):
        return (out_dim, 1)
    if role == "vector":
        return "tensor"
    return "auto"


def partition(
    named_parameters: Iterable[tuple[str, torch.Tensor]],
    *,
    model: nn.Module | None = None,
    rules: Iterable[Any] | None = None,
    second_moment: str = "full",
    rank_ratio: float = AdaPMConfig.rank_ratio,
    weight_decay: float = AdaPMConfig.weight_decay,
    lr_ratios: Mapping[str, float] | None = None,
) -> list[dict[str, Any]]:
    """Split named parameters into AdaPM param groups (one per trainable parameter).

    Args:
        named_parameters: ``(name, parameter)`` pairs; a parameter seen under several names (tied
            weights) is optimized once and reported under all of them.
        model: the module, if known: used to read head sizes from ``model.config`` and to tell
            Conv1D (in, out) weights from ``nn.Linear`` (out, in) ones.
        rules: user rules (see :func:`parse_rules`), tried before the presets' policies.
        second_moment: ``"full"`` (AdaPM) or ``"block"`` (AdaPM-mini) for recognised blocks;
            unrecognised matrices keep Adam's full second moment unless a rule says otherwise.
        rank_ratio: default rank ratio of low-rank blocks.
        weight_decay: applied to matrices; vectors get none (1-D parameters, and those the presets declare
            vectors: an expert stack's biases, Mamba's ``A_log``, used as they are rather than as maps).
        lr_ratios: learning-rate multipliers by role (complete, see :func:`adapm.optim.resolve_lr_ratios`);
            recorded as ``lr_ratio`` on groups and fused segments.
    """
    user_rules = parse_rules(rules)
    used: set[int] = set()
    seen: dict[int, int] = {}
    entries: list[tuple[list[str], torch.Tensor]] = []
    for name, param in named_parameters:
        if not isinstance(name, str) or not isinstance(param, torch.Tensor):
            raise TypeError(f"expected (name, tensor) pairs, got ({type(name).__name__}, {type(param).__name__})")
        if id(param) in seen:
            entries[seen[id(param)]][0].append(name)
            continue
        seen[id(param)] = len(entries)
        entries.append(([name], param))

    conv1d_default = any(
        re.search(FUSED_QKV_PATTERN, names[0]) and p.dim() == 2 and p.shape[1] == 3 * p.shape[0] for names, p in entries
    )
    groups: list[dict[str, Any]] = []
    kept_whole: list[str] = []
    sharded_whole: set[str] = set()
    fused_names: list[tuple[str, list[str]]] = []
    for names, param in entries:
        if not param.requires_grad:
            continue
        shape = tuple(param.shape)
        found = None if param.dim() < 2 else _match_preset(names, model)
        if found is not None and param.dim() > 2 and found[1].layout != "experts" and any(
            PAPER_MOMENTUM[role] == "lowrank" for role in found[1].roles
        ):  # a name that looks like a matrix's on a convolution kernel: low-rank momentum needs a matrix
            found = None
        adapter = found is None and _peft_adapter(model, names)  # any shape: a DoRA magnitude as a LoRA factor
        experts = found is not None and found[1].layout == "experts"
        # A tied parameter is reported under the name its preset recognised (e.g. BLOOM's lm_head).
        name = found[0] if found else names[0]
        aliases = [n for n in names if n != name]
        config = _layer_config(_config_of(_scope(model, name)), name)
        head_dim = _head_dim(config)
        preset = found[1] if found else None
        if preset is not None and preset.within:  # the module the rule names knows its own heads best
            head_dim = _module_head_dim(model, name, preset.within) or head_dim
        if preset is not None and "MultiheadAttention" in preset.fused_modules:  # as does torch's attention module
            head_dim = _module_head_dim(model, name, ("MultiheadAttention",)) or head_dim
        out_dim = _out_dim(name, model, conv1d_default, preset is not None and preset.in_out) if param.dim() == 2 else 0
        fused = preset is not None and (len(preset.roles) > 1 or experts)
        geometry = None
        if fused and preset is not None and preset.layout not in ("contiguous", "experts"):
            geometry = fused_parts(preset.layout, config, shape[0]) if param.dim() == 2 else None
        if fused and preset is not None and (
            not _fused_layout_known(preset, name, shape, model)
            or (preset.layout not in ("contiguous", "experts") and geometry is None)
        ):
            kept_whole.append(name)
            preset, fused, experts = None, False, False
        elif fused and _rows_sharded(param) and (experts or geometry is not None or out_dim == 0):
            kept_whole.append(name)  # FSDP2 cuts its rows, which its segments run along
            sharded_whole.add(name)
            preset, fused, experts = None, False, False
        roles = ("vector",) if param.dim() < 2 else (preset.roles if preset else ("other",))
        roles = ("adapter",) if adapter else roles
        group: dict[str, Any] = {
            "params": [param],
            "names": [name],
            "tied": aliases,
            "weight_decay": weight_decay if roles != ("vector",) and param.dim() >= 2 else 0.0,
            "rank_ratio": rank_ratio,
            "family": "peft" if adapter else preset.family if preset else "",
            "matched": param.dim() < 2 or preset is not None or adapter,
        }
        if name in kept_whole:
            group["kept_whole"] = "sharded" if name in sharded_whole else True
        if not fused:
            role = roles[0]
            policy = _resolve(role, [name, *aliases], user_rules, second_moment, used)
            group.update(
                role=role,
                momentum=policy["momentum"],
                second_moment=policy["second_moment"],
                block=_role_block(role, out_dim, rule_head_size(preset, config, head_dim), shape),
            )
            if "rank_ratio" in policy:
                group["rank_ratio"] = policy["rank_ratio"]
            ratio = policy.get("lr_ratio", lr_ratios[role] if lr_ratios else None)
            if ratio is not None:
                group["lr_ratio"] = ratio
            if "update_clip" in policy:  # a rule's clip applies to its block whatever the scope
                group.update(update_clip=policy["update_clip"], clip_scope="all")
            if "state_dtype" in policy:
                group["state_dtype"] = policy["state_dtype"]
            if policy.get("by_rule"):  # the user chose this block's policy: it is not unknown
                group["matched"] = True
        else:
            assert preset is not None
            matrix = shape[1:] if experts else shape
            split = preset.split_axis if experts else out_dim
            seg_len = matrix[split] // len(roles)
            seg_shape = tuple(seg_len if i == split else s for i, s in enumerate(matrix))
            short = preset.segment_names or tuple(SEGMENT_NAMES.get(role, role) for role in roles)
            parts = [(f"E{e}.{n}" if len(roles) > 1 else f"E{e}", role) for e in range(shape[0])
                     for n, role in zip(short, roles)] if experts else list(zip(short, roles))  # fmt: skip
            if experts and preset.interleaved:  # roles alternate along the split axis, in every expert
                width = len(roles)
                geometry = [(n, r, k % width, 1, matrix[split] // width, width) for k, (n, r) in enumerate(parts)]
            elif geometry is not None:  # declared geometry: unequal or interleaved parts along the rows
                split, parts = 0, [(n, r) for n, r, *_ in geometry]
            segments = []
            sms = set()
            dtypes = set()
            seg_names = []
            for k, (seg_name, role) in enumerate(parts):
                if geometry is not None:
                    start, length, count, period = geometry[k][2:]
                    seg_shape = tuple(count * length if i == split else m for i, m in enumerate(matrix))
                seg_names.append(f"{name}[{seg_name}]")
                policy = _resolve(role, [f"{n}[{seg_name}]" for n in (name, *aliases)], user_rules, second_moment, used)
                sms.add(policy["second_moment"])
                dtypes.add(policy.get("state_dtype"))
                seg: dict[str, Any] = {
                    "name": seg_name,
                    "role": role,
                    "momentum": policy["momentum"],
                    "block": _role_block(role, split, rule_head_size(preset, config, head_dim), seg_shape),
                }
                if geometry is not None:
                    seg.update(start=start, length=length, groups=count, period=period)
                if "rank_ratio" in policy:
                    seg["rank_ratio"] = policy["rank_ratio"]
                ratio = policy.get("lr_ratio", lr_ratios[role] if lr_ratios else None)
                if ratio is not None:
                    seg["lr_ratio"] = ratio
                if "update_clip" in policy:
                    seg["segment_clip"] = policy["update_clip"]
                segments.append(seg)
            fused_names.append((name, seg_names))
            if len(sms) > 1:
                raise ValueError(f"Fused parameter '{name}': all segments must share one second_moment policy")
            if len(dtypes) > 1:
                raise ValueError(
                    f"Fused parameter '{name}': its state is one tensor per key, so the rules matching its segments "
                    f"must give them one state_dtype (got {sorted(str(d) for d in dtypes)}; None is the optimizer's)"
                )
            if dtypes != {None}:
                group["state_dtype"] = dtypes.pop()
            group.update(
                role="fused",
                momentum="mixed",
                second_moment=sms.pop(),
                split_dim=split,
                segments=segments,
                block="auto",
            )
            if experts:
                group["experts"] = True
        groups.append(group)
    _warn_unused_rules(user_rules, used, fused_names)
    return groups


def _warn_unused_rules(rules: Sequence[Rule], used: set[int], fused: Sequence[tuple[str, list[str]]]) -> None:
    """A rule that took no parameter is almost always a typo: say so, and name the fused segments a
    pattern meant for a fused weight's plain name should match instead."""
    for i, rule in enumerate(rules):
        if i in used:
            continue
        hint = ""
        meant = [segs for base, segs in fused if re.search(rule.pattern, base)]
        if meant:
            examples = ", ".join(meant[0])
            hint = (
                f"; fused weights are matched per segment, e.g. {examples}: end the pattern with "
                r"'\[(Q|K|V)\]$' (or drop the '$') to match them"
            )
        warnings.warn(
            f"adapm: rule {i} {rule.pattern!r} matched no parameter (or only ones an earlier rule took), so "
            f"it has no effect{hint}",
            UserWarning,
            stacklevel=4,
        )


def _resolve(
    role: str, names: Sequence[str], user_rules: Sequence[Rule], second_moment: str, used: set[int]
) -> dict[str, Any]:
    momentum = PAPER_MOMENTUM[role]
    sm = "full" if role in ("other", "adapter") else second_moment
    policy: dict[str, Any] = {}
    rule = _match_user(user_rules, names)
    if rule is not None:
        used.add(next(i for i, r in enumerate(user_rules) if r is rule))
        momentum = rule.momentum or momentum
        sm = rule.second_moment or sm
        if rule.rank_ratio is not None:
            policy["rank_ratio"] = rule.rank_ratio
        if rule.update_clip is not UNSET:
            policy["update_clip"] = rule.update_clip
        if rule.lr_ratio is not None:
            policy["lr_ratio"] = rule.lr_ratio
        if rule.state_dtype is not None:
            policy["state_dtype"] = rule.state_dtype
        policy["by_rule"] = True
    policy.update(momentum=momentum, second_moment=sm)
    return policy
