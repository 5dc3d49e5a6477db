"""Command line: ``python -m minivllm generate --model DIR --prompt "..."``."""
import argparse
import json
import sys


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m minivllm", description="minivllm offline inference")
    sub = parser.add_subparsers(dest="command", required=True)
    gen = sub.add_parser("generate", help="generate completions for one or more prompts")
    gen.add_argument("--model", required=True, help="HF-format checkpoint directory (safetensors)")
    gen.add_argument("--prompt", action="append", help="a prompt (repeat for several)")
    gen.add_argument("--prompt-file", help="a file with one prompt per line")
    gen.add_argument("--max-tokens", type=int, default=32)
    gen.add_argument("--temperature", type=float, default=0.0)
    gen.add_argument("--top-k", type=int, default=-1)
    gen.add_argument("--top-p", type=float, default=1.0)
    gen.add_argument("--seed", type=int, default=None, help="per-request sampling seed")
    gen.add_argument("--n", type=int, default=1, help="completions per prompt")
    gen.add_argument("--min-tokens", type=int, default=0)
    gen.add_argument("--stop", action="append", help="a stop string (repeat for several)")
    gen.add_argument("--repetition-penalty", type=float, default=1.0)
    gen.add_argument("--presence-penalty", type=float, default=0.0)
    gen.add_argument("--frequency-penalty", type=float, default=0.0)
    gen.add_argument("--logprobs", type=int, default=None, help="also print the top-k logprobs of each token")
    gen.add_argument("--ignore-eos", action="store_true")
    gen.add_argument("--device", default="auto")
    gen.add_argument("--dtype", default="auto")
    gen.add_argument("--max-model-len", type=int, default=4096)
    gen.add_argument("--tensor-parallel-size", type=int, default=1)
    gen.add_argument("--fusion", default="off", choices=["off", "norm_linear", "full"])
    gen.add_argument("--enforce-eager", action="store_true")
    gen.add_argument("--json", action="store_true", help="print one JSON object per prompt")
    args = parser.parse_args(argv)

    from minivllm import LLM, SamplingParams

    prompts = list(args.prompt or [])
    if args.prompt_file:
        try:
            with open(args.prompt_file, encoding="utf-8") as f:
                prompts += [line.rstrip("\n") for line in f if line.strip()]
        except (OSError, UnicodeDecodeError) as e:
            parser.error(f"cannot read --prompt-file: {e}")
    if not prompts:
        parser.error("give at least one --prompt or a --prompt-file")
    try:
        params = SamplingParams(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
                                max_tokens=args.max_tokens, ignore_eos=args.ignore_eos, seed=args.seed, n=args.n,
                                min_tokens=args.min_tokens, stop=args.stop, logprobs=args.logprobs,
                                repetition_penalty=args.repetition_penalty, presence_penalty=args.presence_penalty,
                                frequency_penalty=args.frequency_penalty)
        llm = LLM(args.model, device=args.device, dtype=args.dtype, max_model_len=args.max_model_len,
                  tensor_parallel_size=args.tensor_parallel_size, fusion=args.fusion,
                  enforce_eager=args.enforce_eager)
        outputs = llm.generate(prompts, params, use_tqdm=False)
    except (ValueError, OSError) as e:  # bad input: arguments, model directory, checkpoint
        print(f"error: {e}", file=sys.stderr)
        return 2
    except RuntimeError as e:  # the engine failed (e.g. a tensor-parallel worker)
        print(f"error: {e}", file=sys.stderr)
        return 1
    for out in outputs:
        for c in out.outputs:
            if args.json:
                row = {"prompt": out.prompt, "index": c.index, "text": c.text, "token_ids": c.token_ids,
                       "finish_reason": c.finish_reason, "stop_reason": c.stop_reason}
                if c.logprobs is not None:
                    row["cumulative_logprob"] = c.cumulative_logprob
                    row["logprobs"] = [{str(t): lp.logprob for t, lp in token.items()} for token in c.logprobs]
                print(json.dumps(row))
            else:
                print(f"{out.prompt!r} -> {c.text!r} ({len(c.token_ids)} tokens, {c.finish_reason})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
