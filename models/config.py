"""Typed ZAYA1 configuration, read from and written to a Hugging Face ``config.json``.

Field names, defaults and validation follow upstream ``transformers``' ``ZayaConfig`` (5.23), so a real
``Zyphra/ZAYA1-8B`` config loads unchanged. Unknown fields are kept (and written back) so that nothing a
checkpoint carries is silently lost; they raise a warning because a typo in a known field would otherwise go
unnoticed.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import math
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

LAYER_TYPES = ("hybrid", "hybrid_sliding")

DEFAULT_ROPE_PARAMETERS: dict[str, dict[str, Any]] = {
    "hybrid": {"rope_type": "default", "rope_theta": 5_000_000.0, "partial_rotary_factor": 0.5},
    "hybrid_sliding": {"rope_type": "default", "rope_theta": 10_000.0, "partial_rotary_factor": 0.5},
}

# Generic Hugging Face keys that every config.json may carry: kept and written back without a warning.
_GENERIC_HF_KEYS = frozenset(
    {
        "architectures", "model_type", "transformers_version", "dtype", "torch_dtype", "partial_rotary_factor",
        "output_hidden_states", "output_attentions", "return_dict", "is_encoder_decoder", "chunk_size_feed_forward",
        "problem_type", "id2label", "label2id", "_name_or_path", "auto_map",
    }
)

# Keys that name the TiDAR mask token, in the order Zyphra's serving code resolves them.
MASK_TOKEN_KEYS = (
    "tidar_mask_token_id",
    "parallel_drafting_mask_token_id",
    "draft_mask_token_id",
    "bidirectional_mask_token_id",
    "mask_token_id",
)


_NOT_JSON = frozenset({"extra", "declares_tidar"})
_TIDAR_FIELDS = frozenset({"mask_token_id", "diffusion_block_len"})


def _is_number(value: Any) -> bool:  # noqa: ANN401
    """A finite int or float (JSON's ``true`` is not a number here, nor NaN or Infinity)."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


class ConfigError(ValueError):
    """An invalid ZAYA config: a field has the wrong type or value, or fields contradict each other."""


@dataclass
class ZayaConfig:
    """All fields of upstream ``ZayaConfig`` plus the TiDAR diffusion fields; defaults are the ZAYA1-8B values."""

    vocab_size: int = 262272
    hidden_size: int = 2048
    num_hidden_layers: int = 40
    num_attention_heads: int = 8
    num_key_value_heads: int = 2
    hidden_act: str = "silu"
    max_position_embeddings: int = 131072
    initializer_range: float = 0.02
    rms_norm_eps: float = 1e-5
    use_cache: bool = True
    tie_word_embeddings: bool = True
    rope_parameters: dict[str, dict[str, Any]] | None = None
    sliding_window: int | None = None
    attention_dropout: float = 0.0
    moe_intermediate_size: int = 2048
    num_experts_per_tok: int = 1
    num_experts: int = 16
    output_router_logits: bool = False
    layer_types: list[str] | None = None
    pad_token_id: int | None = 0
    bos_token_id: int | None = 2
    eos_token_id: int | list[int] | None = 106
    head_dim: int = 128
    attention_bias: bool = False
    lm_head_bias: bool = False
    router_hidden_size: int = 256
    cca_time0: int = 2
    cca_time1: int = 2
    # TiDAR diffusion fields (ZAYA1-8B-Diffusion-Preview). An AR checkpoint's config.json has neither: the
    # defaults below are then only what an export asked for TiDAR anyway (``--tidar on``) uses.
    mask_token_id: int = 4
    diffusion_block_len: int = 16
    # Everything else found in config.json, written back unchanged.
    extra: dict[str, Any] = field(default_factory=dict, repr=False)
    # Whether the checkpoint is a TiDAR (diffusion) one: its config.json names a mask token or a block length.
    # Not a config.json field itself; a config built in Python is a TiDAR one unless told otherwise.
    declares_tidar: bool = field(default=True, repr=False)

    def __post_init__(self) -> None:
        if self.layer_types is None:
            self.layer_types = ["hybrid"] * self.num_hidden_layers
        self.layer_types = list(self.layer_types)
        if self.rope_parameters is None:
            self.rope_parameters = copy.deepcopy(DEFAULT_ROPE_PARAMETERS)
        # The hub's 8B config carries a stray top-level "rope_type" inside rope_parameters; upstream drops it.
        self.rope_parameters = {k: v for k, v in self.rope_parameters.items() if k != "rope_type"}
        self.validate()

    # ------------------------------------------------------------------ derived sizes
    @property
    def num_key_value_groups(self) -> int:
        return self.num_attention_heads // self.num_key_value_heads

    @property
    def conv_channels(self) -> int:
        """C: channels of the CCA conv, the q heads then the k heads."""
        return (self.num_attention_heads + self.num_key_value_heads) * self.head_dim

    @property
    def conv_history(self) -> int:
        """κ: how many past pre-conv rows the two causal conv stages read."""
        return (self.cca_time0 - 1) + (self.cca_time1 - 1)

    @property
    def value_half(self) -> int:
        """Width of each of the two value projections (current and delayed)."""
        return self.num_key_value_heads * self.head_dim // 2

    @property
    def eos_token_ids(self) -> list[int]:
        if self.eos_token_id is None:
            return []
        return [self.eos_token_id] if isinstance(self.eos_token_id, int) else list(self.eos_token_id)

    def rotary_dim(self, layer_type: str) -> int:
        factor = self.rope_parameters[layer_type].get("partial_rotary_factor", 1.0)
        return int(self.head_dim * factor)

    def rope_theta(self, layer_type: str) -> float:
        return float(self.rope_parameters[layer_type]["rope_theta"])

    # ------------------------------------------------------------------ validation
    def validate(self) -> None:
        """Upstream's checks plus type and range checks, each with a message naming the field."""
        ints = {
            "vocab_size": 1, "hidden_size": 1, "num_hidden_layers": 1, "num_attention_heads": 1,
            "num_key_value_heads": 1, "max_position_embeddings": 1, "moe_intermediate_size": 1,
            "num_experts_per_tok": 1, "num_experts": 1, "head_dim": 2, "router_hidden_size": 1,
            "cca_time0": 1, "cca_time1": 1, "mask_token_id": 0, "diffusion_block_len": 1,
        }
        for name, low in ints.items():
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool):
                raise ConfigError(f"{name} must be an integer, got {value!r}")
            if value < low:
                raise ConfigError(f"{name} must be >= {low}, got {value}")
        for name in ("rms_norm_eps", "initializer_range", "attention_dropout"):
            value = getattr(self, name)
            if not _is_number(value) or value < 0:
                raise ConfigError(f"{name} must be a finite non-negative number, got {value!r}")
        for name in ("use_cache", "tie_word_embeddings", "attention_bias", "lm_head_bias", "output_router_logits"):
            if not isinstance(getattr(self, name), bool):
                raise ConfigError(f"{name} must be true or false, got {getattr(self, name)!r}")
        for name in ("pad_token_id", "bos_token_id"):
            value = getattr(self, name)
            if value is not None and (type(value) is not int or not 0 <= value < self.vocab_size):
                raise ConfigError(f"{name} must be a token id in [0, {self.vocab_size}), got {value!r}")
        eos = self.eos_token_id
        eos_list = [eos] if isinstance(eos, int) else (eos if isinstance(eos, list) else None)
        if eos is not None and (eos_list is None or not all(type(t) is int and 0 <= t < self.vocab_size for t in eos_list)):
            raise ConfigError(f"eos_token_id must be a token id or a list of them in [0, {self.vocab_size}), got {eos!r}")
        if self.mask_token_id >= self.vocab_size:
            raise ConfigError(f"mask_token_id {self.mask_token_id} is outside the vocabulary ({self.vocab_size})")
        if self.hidden_act != "silu":
            raise ConfigError(f"hidden_act must be 'silu' (the only activation ZAYA1 uses), got {self.hidden_act!r}")
        if self.num_experts_per_tok != 1:
            raise ConfigError("ZAYA supports num_experts_per_tok=1 only (top-1 routing)")
        if self.num_attention_heads % self.num_key_value_heads != 0:
            raise ConfigError("num_attention_heads must be a multiple of num_key_value_heads")
        if (self.num_key_value_heads * self.head_dim) % 2 != 0:
            raise ConfigError("num_key_value_heads * head_dim must be even (value is split into current|delayed)")
        if not isinstance(self.layer_types, list) or len(self.layer_types) != self.num_hidden_layers:
            raise ConfigError(
                f"layer_types must list one type per layer ({self.num_hidden_layers}), got {self.layer_types!r}"
            )
        unknown = sorted(set(self.layer_types) - set(LAYER_TYPES))
        if unknown:
            raise ConfigError(f"unknown layer_types {unknown}; expected one of {list(LAYER_TYPES)}")
        if "hybrid_sliding" in self.layer_types:
            if self.sliding_window is None:
                raise ConfigError("sliding_window must be set when layer_types contains 'hybrid_sliding'")
        if self.sliding_window is not None and (type(self.sliding_window) is not int or self.sliding_window < 1):
            raise ConfigError(f"sliding_window must be a positive integer or null, got {self.sliding_window!r}")
        if not isinstance(self.rope_parameters, dict):
            raise ConfigError(f"rope_parameters must be a mapping, got {self.rope_parameters!r}")
        for layer_type in set(self.layer_types):
            params = self.rope_parameters.get(layer_type)
            if not isinstance(params, dict) or "rope_theta" not in params:
                raise ConfigError(f"rope_parameters[{layer_type!r}] must give rope_theta")
            theta, factor = params["rope_theta"], params.get("partial_rotary_factor", 1.0)
            if not _is_number(theta) or theta <= 0:
                raise ConfigError(f"rope_parameters[{layer_type!r}].rope_theta must be a finite positive number, "
                                  f"got {theta!r}")
            if not _is_number(factor) or not 0 < factor <= 1:
                raise ConfigError(f"rope_parameters[{layer_type!r}].partial_rotary_factor must be in (0, 1], "
                                  f"got {factor!r}")
            if params.get("rope_type", "default") != "default":
                raise ConfigError(f"rope_parameters[{layer_type!r}].rope_type {params['rope_type']!r} is not supported")
            rot = self.rotary_dim(layer_type)
            if rot % 2 != 0 or not 0 < rot <= self.head_dim:
                raise ConfigError(f"partial_rotary_factor of {layer_type!r} gives an invalid rotary dim {rot}")

    # ------------------------------------------------------------------ JSON
    @classmethod
    def from_dict(cls, data: dict[str, Any], *, warn_unknown: bool = True) -> "ZayaConfig":
        if not isinstance(data, dict):
            raise ConfigError("config.json must hold a JSON object")
        data = copy.deepcopy(data)
        model_type = data.get("model_type", "zaya")
        if model_type != "zaya":
            raise ConfigError(f"model_type is {model_type!r}, expected 'zaya'")
        names = {f.name for f in dataclasses.fields(cls)} - _NOT_JSON
        known = {k: v for k, v in data.items() if k in names}
        extra = {k: v for k, v in data.items() if k not in names and k not in ("model_type", "architectures")}
        # Resolve the TiDAR mask token the way Zyphra's proposer does (first key present wins).
        for key in MASK_TOKEN_KEYS:
            if key in data and data[key] is not None:
                known["mask_token_id"] = data[key]
                break
        if known.get("mask_token_id", 0) is None:
            del known["mask_token_id"]  # an explicit null means "use the default"
        known["declares_tidar"] = "mask_token_id" in known or data.get("diffusion_block_len") is not None
        unknown = sorted(k for k in extra if k not in _GENERIC_HF_KEYS and k not in MASK_TOKEN_KEYS)
        if unknown and warn_unknown:
            warnings.warn(f"config.json: unknown fields kept as-is: {', '.join(unknown)}", stacklevel=2)
        if isinstance(known.get("rope_parameters"), dict):
            known["rope_parameters"] = {k: v for k, v in known["rope_parameters"].items() if k != "rope_type"}
        try:
            return cls(**known, extra=extra)
        except TypeError as exc:  # pragma: no cover - dataclass signature errors
            raise ConfigError(str(exc)) from None

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"architectures": ["ZayaForCausalLM"], "model_type": "zaya"}
        out.update(self.extra)
        for f in dataclasses.fields(self):
            if f.name in _NOT_JSON or (f.name in _TIDAR_FIELDS and not self.declares_tidar):
                continue
            out[f.name] = copy.deepcopy(getattr(self, f.name))
        return out

    @classmethod
    def from_json_file(cls, path: str | Path) -> "ZayaConfig":
        path = Path(path)
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise ConfigError(f"{path}: file not found") from None
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise ConfigError(f"{path}: not valid JSON ({exc})") from None
        except RecursionError:
            raise ConfigError(f"{path}: not usable JSON (nested too deeply)") from None
        return cls.from_dict(data)

    def to_json_file(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n", encoding="utf-8")
