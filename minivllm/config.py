import json
import os
from dataclasses import dataclass, field

import torch



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
    """The fields of an HF Qwen3 ``config.json`` that the engine uses."""

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

    @classmethod
    def from_dir(cls, model_dir: str) -> "ModelConfig":
        if not os.path.isdir(model_dir):
            raise FileNotFoundError(f"model directory not found: {model_dir!r}")
        path = os.path.join(model_dir, "config.json")
        if not os.path.isfile(path):
            raise FileNotFoundError(f"no config.json in model directory {model_dir!r}")
        with open(path) as f:
            cfg = json.load(f)
        archs = cfg.get("architectures") or []
        if cfg.get("model_type") != "qwen3" or (archs and "Qwen3ForCausalLM" not in archs):
            raise ValueError(f"unsupported architecture {archs or cfg.get('model_type')!r} in {path}: "
                             "minivllm runs Qwen3ForCausalLM (model_type 'qwen3')")
        rope = cfg.get("rope_parameters") or cfg.get("rope_scaling") or {}
        if rope.get("rope_type", "default") != "default":
            raise ValueError(f"unsupported RoPE scaling {rope.get('rope_type')!r} in {path}")
        dtype_name = cfg.get("dtype") or cfg.get("torch_dtype") or "bfloat16"
        heads = cfg["num_attention_heads"]
        eos = cfg.get("eos_token_id")
        gen_path = os.path.join(model_dir, "generation_config.json")
        if os.path.isfile(gen_path):
            with open(gen_path) as f:
                eos = json.load(f).get("eos_token_id", eos)
        return cls(
            vocab_size=cfg["vocab_size"],
            hidden_size=cfg["hidden_size"],
            intermediate_size=cfg["intermediate_size"],
            num_hidden_layers=cfg["num_hidden_layers"],
            num_attention_heads=heads,
            num_key_value_heads=cfg.get("num_key_value_heads", heads),
            head_dim=cfg.get("head_dim") or cfg["hidden_size"] // heads,
            rms_norm_eps=cfg.get("rms_norm_eps", 1e-6),
            rope_theta=rope.get("rope_theta", cfg.get("rope_theta", 10000.0)),
            max_position_embeddings=cfg.get("max_position_embeddings", 32768),
            tie_word_embeddings=cfg.get("tie_word_embeddings", False),
            attention_bias=cfg.get("attention_bias", False),
            torch_dtype=getattr(torch, dtype_name),
            eos_token_ids=[] if eos is None else ([eos] if isinstance(eos, int) else list(eos)),
        )


@dataclass
class Config:
    """Engine settings. ``num_kvcache_blocks`` is derived from memory unless given."""

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
    enforce_eager: bool = False
    tensor_parallel_size: int = 1
    seed: int = 0
    fusion: str = "off"
    hf_config: ModelConfig = field(init=False)

    def __post_init__(self):
        self.hf_config = ModelConfig.from_dir(self.model)
        if self.device == "auto":
            self.device = "cuda" if torch.cuda.is_available() else "cpu"
        if self.device not in ("cpu", "cuda"):
            raise ValueError(f"device must be 'auto', 'cpu' or 'cuda', got {self.device!r}")
        if self.device == "cuda" and not torch.cuda.is_available():
            raise ValueError("device='cuda' but no CUDA GPU is available")
        if self.kvcache_block_size is None:
            self.kvcache_block_size = 256 if self.device == "cuda" else 16
        if self.kvcache_block_size < 1 or self.kvcache_block_size % 16:
            raise ValueError(f"kvcache_block_size must be a positive multiple of 16, got {self.kvcache_block_size}")
        if self.fusion not in FUSION_MODES:
            raise ValueError(f"fusion must be one of {tuple(FUSION_MODES)}, got {self.fusion!r}")
        if not 0 < self.gpu_memory_utilization <= 1:
            raise ValueError(f"gpu_memory_utilization must be in (0, 1], got {self.gpu_memory_utilization}")
        for name in ("max_model_len", "max_num_seqs", "max_num_batched_tokens", "tensor_parallel_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        self.check_tensor_parallel()
        self.max_model_len = min(self.max_model_len, self.hf_config.max_position_embeddings)
        if not self.enable_chunked_prefill and self.max_num_batched_tokens < self.max_model_len:
            raise ValueError(f"without chunked prefill, max_num_batched_tokens ({self.max_num_batched_tokens}) "
                             f"must be >= max_model_len ({self.max_model_len})")
        self.torch_dtype = self._resolve_dtype()

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
