"""HF transformers ``generate`` beside minivllm, on the throughput, decode-latency and ttft workloads, timed as
minivllm.bench times minivllm (minivllm.peers.protocol) on the same prompts (minivllm.workloads).

    python -m minivllm.peers.hf --model checkpoints/qwen3-0.6b --workload latency --mode eager --rows-out rows.json
    python -m minivllm.peers.hf --model checkpoints/qwen3-0.6b --workload latency --mode compiled --rows-out rows.json

``eager`` is ``model.generate`` as is (a DynamicCache; attention by torch's sdpa, transformers' default).
``compiled`` is HF's documented fast path: ``cache_implementation="static"``, with which ``generate`` compiles
the model's forward for the decode steps itself (``torch.compile`` with CompileConfig's defaults: mode
"reduce-overhead", i.e. CUDA graphs). Each new batch shape compiles for tens of seconds in its first call, which
the untimed warm-up absorbs; the row keeps that call's extra time as ``compile_s``.

Throughput (workload 1) is one ``generate`` call over all requests, left-padded: ``generate`` has no continuous
batching and one output length per call, so every request decodes for the longest ``max_tokens`` and only its
own count is credited, the waste a server without continuous batching pays.

Latency and ttft are greedy; all run in the checkpoint's dtype (bf16 for qwen3-0.6b), and never stop at EOS:
``min_new_tokens`` equal to ``max_new_tokens`` (HF's way to ignore EOS: the EOS logit is masked until then).

Each configuration's first call is a full-length run, untimed, and its 5 timed samples stay in the row with
their spread: the previous edition's single sample per batch after a 2-token warm-up (minivllm.bench's ``hf``)
had batch 1 slower per step than batch 16, which either disappears here or shows as spread.

Device time: eager decode is CPU-bound, tens of ms per step at every batch size up to 256, so the default
``--gen-tokens`` is 16, not minivllm's 128: each configuration costs 6 runs of 17 tokens and 6 of
1 (a warm-up pair, then 5 timed pairs), about 8 s, so eager batches 1,8,32,128,256 take about 40 s and compiled
batches 1,8 about 50 s, mostly compiling.
"""
import torch
import transformers
from transformers import AutoModelForCausalLM, CompileConfig

from minivllm.peers.protocol import LATENCY_BATCHES, base_parser, check_vocab, emit, finish_args, workload_rows

PEER = "huggingface/transformers"
ENGINES = {"eager": "hf_transformers", "compiled": "hf_transformers_compiled"}
COMPILED_BATCHES = [1, 8]  # every batch size is a new shape to compile


def parse_args(argv=None):
    parser = base_parser(__doc__.split("\n\n")[0], ["throughput", "latency", "ttft"], gen_tokens=16)
    parser.add_argument("--num-seqs", type=int, default=256, help="throughput: requests")
    parser.add_argument("--mode", required=True, choices=sorted(ENGINES))
    parser.set_defaults(batches=None)
    args = finish_args(parser, parser.parse_args(argv))
    if args.batches is None:
        args.batches = COMPILED_BATCHES if args.mode == "compiled" else LATENCY_BATCHES
    return args


def generate_kwargs(mode: str, device: torch.device) -> dict:
    if mode == "eager":
        return {}
    if device.type == "cuda":
        return dict(cache_implementation="static")
    # generate compiles only on accelerators; HF's own testing flag lets it compile on CPU too (our CPU tests).
    config = CompileConfig()
    config._compile_all_devices = True
    return dict(cache_implementation="static", compile_config=config)


class HFEngine:
    """A model's ``generate`` behind the protocol's engine interface."""

    def __init__(self, model, mode: str):
        self.model, self.kwargs = model, generate_kwargs(mode, model.device)
        eos = model.generation_config.eos_token_id  # an id or a list of ids
        self.pad_token_id = eos[0] if isinstance(eos, list) else eos  # never used: the prompts share a length

    def reset(self):
        """Nothing carries over between calls: each builds its own cache."""

    def tokens(self, prompts, max_tokens) -> list[list[int]]:
        ids = torch.tensor(prompts, device=self.model.device)
        out = self.model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False,
                                  max_new_tokens=max_tokens, min_new_tokens=max_tokens,
                                  pad_token_id=self.pad_token_id, **self.kwargs)
        return out[:, ids.shape[1]:].tolist()

    def generate(self, prompts, max_tokens):
        return [len(t) for t in self.tokens(prompts, max_tokens)]

    def request_tokens(self, requests) -> list[list[int]]:
        """Workload 1 as ``generate`` can serve it: one call over every request, prompts left-padded to the
        longest, every row generating the longest request's ``max_tokens`` (a batch has one length); each
        request keeps its own ``max_tokens`` of them."""
        temperature = {r.temperature for r in requests}
        if len(temperature) != 1:
            raise ValueError(f"one generate call samples at one temperature, the requests ask {sorted(temperature)}")
        longest = max(len(r.prompt_token_ids) for r in requests)
        ids = torch.full((len(requests), longest), self.pad_token_id, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for i, r in enumerate(requests):
            ids[i, longest - len(r.prompt_token_ids):] = torch.tensor(r.prompt_token_ids)
            mask[i, longest - len(r.prompt_token_ids):] = 1
        steps = max(r.max_tokens for r in requests)
        out = self.model.generate(ids.to(self.model.device), attention_mask=mask.to(self.model.device),
                                  do_sample=True, temperature=temperature.pop(), top_k=0, top_p=1.0,
                                  max_new_tokens=steps, min_new_tokens=steps, pad_token_id=self.pad_token_id,
                                  **self.kwargs)
        return [t[:r.max_tokens] for t, r in zip(out[:, longest:].tolist(), requests)]

    def generate_requests(self, requests) -> list[int]:
        return [len(t) for t in self.request_tokens(requests)]

    def warm_up(self, requests):
        """Compiled: the workload itself, once (its batch shape compiles in the first call); eager: a short call."""
        if self.kwargs:
            self.generate_requests(requests)
        else:
            self.generate([requests[0].prompt_token_ids[:16]], 2)

    def kv_cache_mb(self) -> None:
        return None  # generate's cache lives inside the call


def load_model(path: str, device: torch.device):
    # The class of config.json's architecture (Qwen3, Llama, Mistral): transformers' own code, never remote code.
    return AutoModelForCausalLM.from_pretrained(path, dtype="auto", trust_remote_code=False).to(device).eval()


def base_row(args, model) -> dict:
    compiled = args.mode == "compiled"
    sampling = ("all requests in one call, left-padded, each generating the longest max_tokens and credited with "
                "its own, temperature 0.6" if args.workload == "throughput" else "greedy")
    notes = (f"transformers {transformers.__version__} generate, {model.config._attn_implementation} attention, "
             f"{model.dtype}, {sampling}, min_new_tokens = max_new_tokens; "
             + ("cache_implementation='static': generate's own torch.compile of the decode forward (CompileConfig "
                "defaults, mode reduce-overhead); compile_s is the first call's extra time, outside the samples"
                if compiled else "as is (DynamicCache)"))
    return dict(engine=ENGINES[args.mode], fusion=None, tensor_parallel_size=1, model_name=args.model_name,
                peer=PEER, peer_commit=f"v{transformers.__version__}", dtype=str(model.dtype).removeprefix("torch."),
                notes=notes)


def with_compile_time(rows, model):
    """The first call's extra time is the compile (and CUDA-graph capture); say whether generate compiled."""
    for r in rows:
        r["compile_s"] = r["first_call_overhead_s"]
        r["compiled_forward"] = getattr(model, "_compiled_call", None) is not None  # set by HF's get_compiled_call
        yield r


def main(argv=None):
    args = parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model = load_model(args.model, device)
    check_vocab(args, model.config.vocab_size)
    rows = workload_rows(HFEngine(model, args.mode), args, base_row(args, model))
    emit(with_compile_time(rows, model) if args.mode == "compiled" else rows, args.rows_out)


if __name__ == "__main__":
    main()
