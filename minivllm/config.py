import json
import os
from dataclasses import dataclass, field

import torch

from minivllm import checks


@dataclass(frozen=True)
class Fusion:
    """Which ops a decoder layer fuses; each rung of ``FUSION_MODES`` adds one fusion to the last.

    ``eager_elementwise``: RoPE and SiLU*up as eager torch ops (the first edition's ``off``),
    otherwise one Triton kernel each. ``norm_linear``: each RMSNorm folded into the linear it feeds
    (qkv, gate_up, lm_head). ``qkv_epilogue``: QK-norm, RoPE and the KV store inside the qkv op.
    ``mlp_epilogue``: SiLU(gate)*up inside the gate_up op. ``gemv_projections``: o_proj and down
    through ``kernels.linear``, so that a decode step at one row runs one kernel per projection.
    """

    eager_elementwise: bool = False
    norm_linear: bool = False
    qkv_epilogue: bool = False
    mlp_epilogue: bool = False
    gemv_projections: bool = False


# The ladder from the strongest unfused engine (off) to full, one fusion per rung; eager_elementwise
# sits below off for the book's history.
FUSION_MODES = {
    "eager_elementwise": Fusion(eager_elementwise=True),
    "off": Fusion(),
    "norm_linear": Fusion(norm_linear=True),
    "qkv_epilogue": Fusion(norm_linear=True, qkv_epilogue=True),
    "mlp_epilogue": Fusion(norm_linear=True, qkv_epilogue=True, mlp_epilogue=True),
    "full": Fusion(norm_linear=True, qkv_epilogue=True, mlp_epilogue=True, gemv_projections=True),
}


@dataclass
class ModelConfig:
    """The fields of an HF ``config.json`` that the engine uses, for any architecture of
    ``minivllm.models.ARCHITECTURES``. ``rope_scaling``: None (plain RoPE) or the llama3 RoPE's
    parameters (``rope_type``, ``factor``, ``low_freq_factor``, ``high_freq_factor``,
    ``original_max_position_embeddings``)."""

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_theta: float
    max_position_embeddings: int
    tie_word_embeddings: bool
    attention_bias: bool
    torch_dtype: torch.dtype
    eos_token_ids: list[int] = field(default_factory=list)
    # Qwen3's, for a ModelConfig built by hand from a Qwen3 preset (chapter 6); from_dir sets them for every family.
    architecture: str = "Qwen3ForCausalLM"
    qk_norm: bool = True
    rope_scaling: dict | None = None

    @classmethod
    def from_dir(cls, model_dir: str) -> "ModelConfig":
        if not os.path.isdir(model_dir):
            raise FileNotFoundError(f"model directory not found: {model_dir!r}")
        path = os.path.join(model_dir, "config.json")
        if not os.path.isfile(path):
            raise FileNotFoundError(f"no config.json in model directory {model_dir!r}")
        cfg = read_json_object(path)
        architecture, family = find_architecture(cfg, path)

        def get(key, default=None):
            if cfg.get(key) is not None:
                return cfg[key]
            if default is None:
                raise ValueError(f"{path} lacks {key!r}, which the model needs")
            return default

        def size(key, default=None):
            return checks.integer(f"{key} in {path}", get(key, default), low=1)

        layers = size("num_hidden_layers")
        check_unimplemented_features(cfg, path)
        family_fields = family.read_config(cfg, path, layers)
        # transformers 5 writes rope_parameters (rope_theta inside); published checkpoints rope_theta + rope_scaling.
        # With both, rope_scaling wins and a rope_theta inside the dict beats the top-level one, as in transformers.
        rope = cfg.get("rope_scaling") or cfg.get("rope_parameters") or {}
        heads = size("num_attention_heads")
        kv_heads = size("num_key_value_heads", heads)
        if heads % kv_heads:
            raise ValueError(f"num_attention_heads={heads} is not a multiple of num_key_value_heads={kv_heads} "
                             f"in {path}")
        head_dim = size("head_dim", size("hidden_size") // heads)
        if head_dim % 2:
            raise ValueError(f"head_dim={head_dim} in {path} is odd: RoPE rotates pairs of features")
        dtype_name = cfg.get("dtype") or cfg.get("torch_dtype") or "bfloat16"
        if dtype_name not in CHECKPOINT_DTYPES:
            raise ValueError(f"dtype {dtype_name!r} in {path} is not one of {sorted(CHECKPOINT_DTYPES)}")
        eos = cfg.get("eos_token_id")
        gen_path = os.path.join(model_dir, "generation_config.json")
        if os.path.isfile(gen_path):
            eos = read_json_object(gen_path).get("eos_token_id", eos)
        eos = [] if eos is None else [eos] if not isinstance(eos, list) else eos
        return cls(
            vocab_size=size("vocab_size"),
            hidden_size=size("hidden_size"),
            intermediate_size=size("intermediate_size"),
            num_hidden_layers=layers,
            num_attention_heads=heads,
            num_key_value_heads=kv_heads,
            head_dim=head_dim,
            rms_norm_eps=checks.real(f"rms_norm_eps in {path}", get("rms_norm_eps", 1e-6), low=0, low_open=True),
            rope_theta=checks.real(f"rope_theta in {path}", rope.get("rope_theta", get("rope_theta", 10000.0)),
                                   low=0, low_open=True),
            max_position_embeddings=size("max_position_embeddings", 32768),
            tie_word_embeddings=checks.flag(f"tie_word_embeddings in {path}", get("tie_word_embeddings", False)),
            torch_dtype=CHECKPOINT_DTYPES[dtype_name],
            eos_token_ids=[checks.integer(f"eos_token_id in {path}", t) for t in eos],
            architecture=architecture,
            rope_scaling=llama3_rope_parameters(rope, path) if rope_type(rope) == "llama3" else None,
            **family_fields,
        )


CHECKPOINT_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def read_json_object(path: str) -> dict:
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path} is not valid JSON: {e}") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path} must hold a JSON object, got {type(data).__name__}")
    return data


def find_architecture(cfg: dict, path: str):
    """(name, ``minivllm.models.Architecture``) of the config: its ``architectures`` entry that the
    registry knows, or without one the architecture of its ``model_type``."""
    from minivllm.models import ARCHITECTURES  # not at the top: the models import this module

    archs = cfg.get("architectures") or []
    if not isinstance(archs, list):
        raise ValueError(f"architectures in {path} must be a list of names, got {archs!r}")
    known = [a for a in archs if a in ARCHITECTURES]
    if not archs:
        known = [a for a, family in ARCHITECTURES.items() if family.model_type == cfg.get("model_type")]
    if not known:
        raise ValueError(f"unsupported architecture {archs or cfg.get('model_type')!r} in {path}: minivllm runs "
                         f"{', '.join(ARCHITECTURES)}")
    family = ARCHITECTURES[known[0]]
    if cfg.get("model_type", family.model_type) != family.model_type:
        raise ValueError(f"model_type {cfg['model_type']!r} in {path} does not match architecture {known[0]!r} "
                         f"(model_type {family.model_type!r})")
    return known[0], family


ROPE_TYPES = ("default", "llama3")
LLAMA3_ROPE_FIELDS = ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")


def rope_type(rope: dict) -> str:
    return rope.get("rope_type", rope.get("type", "default"))  # "type" is the older name


def llama3_rope_parameters(rope: dict, path: str) -> dict:
    """The llama3 RoPE's parameters, checked (``minivllm.layers.rotary.rope_inv_freq`` uses them)."""
    missing = [k for k in LLAMA3_ROPE_FIELDS if rope.get(k) is None]
    if missing:
        raise ValueError(f"the llama3 RoPE in {path} lacks {missing}")
    out = {"rope_type": "llama3"}
    for key in LLAMA3_ROPE_FIELDS[:3]:
        out[key] = checks.real(f"rope {key} in {path}", rope[key], low=0, low_open=True)
    out["original_max_position_embeddings"] = checks.integer(
        f"rope original_max_position_embeddings in {path}", rope["original_max_position_embeddings"], low=1)
    if out["high_freq_factor"] <= out["low_freq_factor"]:
        raise ValueError(f"the llama3 RoPE in {path} needs high_freq_factor > low_freq_factor, got "
                         f"{out['high_freq_factor']} and {out['low_freq_factor']}")
    return out


def check_unimplemented_features(cfg: dict, path: str):
    """Refuses what transformers would honour, for every family, and the engine would silently
    compute otherwise: another activation, another RoPE scaling, partial rotary."""
    if cfg.get("hidden_act", "silu") != "silu":
        raise ValueError(f"hidden_act {cfg['hidden_act']!r} in {path} is not implemented (only 'silu')")
    for key in ("rope_parameters", "rope_scaling"):
        rope = cfg.get(key) or {}
        if not isinstance(rope, dict):
            raise ValueError(f"{key} in {path} must be an object, got {rope!r}")
        if any(isinstance(v, dict) for v in rope.values()):
            raise ValueError(f"per-layer-type RoPE parameters ({key} in {path}) are not implemented")
        kind = rope_type(rope)
        if kind not in ROPE_TYPES:
            raise ValueError(f"unsupported RoPE scaling {kind!r} ({key} in {path}): minivllm implements "
                             f"{' and '.join(ROPE_TYPES)} RoPE only; remove it to run at the model's native "
                             "context length")
        for where in (rope, cfg):
            if where.get("partial_rotary_factor", 1.0) != 1.0:
                raise ValueError(f"partial_rotary_factor={where['partial_rotary_factor']} in {path}: minivllm "
                                 "rotates whole heads")


def attention_bias_field(cfg: dict, path: str) -> bool:
    return checks.flag(f"attention_bias in {path}", cfg.get("attention_bias") or False)


def qwen3_fields(cfg: dict, path: str, num_layers: int) -> dict:
    """Qwen3: QK-norm; sliding-window attention decided as in transformers' Qwen3 config (refused)."""
    window = cfg.get("sliding_window") if cfg.get("use_sliding_window") else None
    types = cfg.get("layer_types")
    if not types:
        first = checks.integer(f"max_window_layers in {path}", cfg.get("max_window_layers", 28))
        types = ["sliding_attention" if window is not None and i >= first else "full_attention"
                 for i in range(num_layers)]
    if not isinstance(types, list) or not all(t in ("full_attention", "sliding_attention") for t in types):
        raise ValueError(f"layer_types {types!r} in {path}: minivllm implements full attention only")
    if window is not None and "sliding_attention" in types:
        raise ValueError(f"sliding-window attention (use_sliding_window with sliding_window={window} on layers "
                         f"{[i for i, t in enumerate(types) if t == 'sliding_attention']}) in {path} is not "
                         "implemented: minivllm attends over the whole context")
    return dict(qk_norm=True, attention_bias=attention_bias_field(cfg, path))


def llama_fields(cfg: dict, path: str, num_layers: int) -> dict:
    """Llama 2 and 3.x: no QK-norm; attention biases as configured; no MLP biases (refused)."""
    if cfg.get("mlp_bias"):
        raise ValueError(f"mlp_bias={cfg['mlp_bias']!r} in {path}: minivllm's MLP projections have no biases")
    return dict(qk_norm=False, attention_bias=attention_bias_field(cfg, path))


def mistral_fields(cfg: dict, path: str, num_layers: int) -> dict:
    """Mistral: no QK-norm and no biases (transformers' Mistral reads no attention_bias); a sliding
    window, which transformers applies on every layer, is refused."""
    if cfg.get("sliding_window") is not None:
        raise ValueError(f"sliding_window={cfg['sliding_window']!r} in {path}: minivllm does not implement "
                         "sliding-window attention: it attends over the whole context")
    return dict(qk_norm=False, attention_bias=False)


@dataclass
class Config:
    """Engine settings. ``num_kvcache_blocks`` is derived from memory unless given.

    ``pdl``: launch the Triton kernels of the decode step at one row (and the others that take it,
    ``kernels.guard``) with programmatic dependent launch where the GPU supports it (CUDA, compute
    capability >= 9; never on CPU or under the interpreter) and the process allows it (unless ``KERNELS_PDL=0``,
    kernels.guard). Each kernel's
    launch and first weight loads then overlap its predecessor's tail. False launches them one after
    another, for A/B benchmarks.
    """

    model: str
    dtype: str = "auto"
    device: str = "auto"
    max_model_len: int = 4096
    max_num_seqs: int = 256
    max_num_batched_tokens: int = 8192
    kvcache_block_size: int | None = None
    gpu_memory_utilization: float = 0.9
    cpu_kvcache_space_gb: float = 1.0
    num_kvcache_blocks: int | None = None
    enable_prefix_caching: bool = True
    enable_chunked_prefill: bool = True
    mixed_steps: bool = True  # prefill steps carry the running sequences' decode tokens too
    enforce_eager: bool = False
    # generate() prepares each decode step while the GPU runs the one before (one tensor-parallel rank)
    async_scheduling: bool = True
    # Small prefill steps (ModelRunner.PREFILL_GRAPH_TOKENS, one rank) run as a padded step: a CUDA-graph replay
    # on a GPU. None: on CUDA (the first token of a short prompt is launch-bound without it: kernels/NOTES.md,
    # run 9), off on CPU and under enforce_eager, where a padded step only adds work; True there runs the padded
    # steps eagerly (tests).
    prefill_graphs: bool | None = None
    tensor_parallel_size: int = 1
    seed: int = 0
    fusion: str = "off"
    pdl: bool = True
    hf_config: ModelConfig = field(init=False)

    def __post_init__(self):
        if not isinstance(self.model, (str, os.PathLike)):
            raise ValueError(f"model must be a checkpoint directory's path, got {self.model!r}")
        self.model = os.fspath(self.model)
        self._check_types()
        self.hf_config = ModelConfig.from_dir(self.model)
        if self.device == "auto":
            self.device = "cuda" if torch.cuda.is_available() else "cpu"
        if self.device not in ("cpu", "cuda"):
            raise ValueError(f"device must be 'auto', 'cpu' or 'cuda', got {self.device!r}")
        if self.device == "cuda" and not torch.cuda.is_available():
            raise ValueError("device='cuda' but no CUDA GPU is available")
        if self.kvcache_block_size is None:
            self.kvcache_block_size = 256 if self.device == "cuda" else 16
        if self.prefill_graphs is None:
            self.prefill_graphs = self.device == "cuda" and not self.enforce_eager
        if checks.integer("kvcache_block_size", self.kvcache_block_size) < 1 or self.kvcache_block_size % 16:
            raise ValueError(f"kvcache_block_size must be a positive multiple of 16, got {self.kvcache_block_size}")
        if self.fusion not in FUSION_MODES:
            raise ValueError(f"fusion must be one of {tuple(FUSION_MODES)}, got {self.fusion!r}")
        self.check_tensor_parallel()
        self.max_model_len = min(self.max_model_len, self.hf_config.max_position_embeddings)
        if not self.enable_chunked_prefill and self.max_num_batched_tokens < self.max_model_len:
            raise ValueError(f"without chunked prefill, max_num_batched_tokens ({self.max_num_batched_tokens}) "
                             f"must be >= max_model_len ({self.max_model_len})")
        self.torch_dtype = self._resolve_dtype()

    def _check_types(self):
        for name in ("max_model_len", "max_num_seqs", "max_num_batched_tokens", "tensor_parallel_size"):
            checks.integer(name, getattr(self, name), low=1)
        if self.num_kvcache_blocks is not None:
            checks.integer("num_kvcache_blocks", self.num_kvcache_blocks, low=1)
        checks.real("gpu_memory_utilization", self.gpu_memory_utilization, low=0, high=1, low_open=True)
        checks.real("cpu_kvcache_space_gb", self.cpu_kvcache_space_gb, low=0, low_open=True)
        for name in ("enable_prefix_caching", "enable_chunked_prefill", "enforce_eager", "async_scheduling", "pdl",
                     "mixed_steps"):
            checks.flag(name, getattr(self, name))
        if self.prefill_graphs is not None:
            checks.flag("prefill_graphs", self.prefill_graphs)
        checks.integer("seed", self.seed, *checks.SEED_RANGE)
        for name in ("dtype", "device", "fusion"):
            if not isinstance(getattr(self, name), str):
                raise ValueError(f"{name} must be a string, got {getattr(self, name)!r}")

    def check_tensor_parallel(self):
        """Checked here, before any rank starts: a layer failing on one rank would leave the others
        waiting for it."""
        tp, cfg = self.tensor_parallel_size, self.hf_config
        if cfg.num_attention_heads % tp or cfg.num_key_value_heads % tp:
            raise ValueError(f"tensor_parallel_size={tp} must divide the number of attention heads "
                             f"({cfg.num_attention_heads}) and of KV heads ({cfg.num_key_value_heads})")
        if cfg.intermediate_size % tp:
            raise ValueError(f"tensor_parallel_size={tp} must divide intermediate_size={cfg.intermediate_size}")

    def _resolve_dtype(self) -> torch.dtype:
        if self.dtype == "auto":
            # On CPU the engine is the exact reference: fp32. On GPU, the checkpoint's dtype.
            return torch.float32 if self.device == "cpu" else self.hf_config.torch_dtype
        names = {"float32": torch.float32, "fp32": torch.float32, "float16": torch.float16,
                 "fp16": torch.float16, "half": torch.float16, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}
        if self.dtype not in names:
            raise ValueError(f"dtype must be 'auto' or one of {sorted(names)}, got {self.dtype!r}")
        return names[self.dtype]

    def check_kvcache_fits(self):
        blocks_per_seq = -(-self.max_model_len // self.kvcache_block_size)
        if self.num_kvcache_blocks < blocks_per_seq:
            raise ValueError(f"the KV cache holds {self.num_kvcache_blocks} blocks of {self.kvcache_block_size} "
                             f"tokens, too few for one sequence of max_model_len={self.max_model_len} "
                             f"({blocks_per_seq} blocks): raise the KV budget or lower max_model_len")
