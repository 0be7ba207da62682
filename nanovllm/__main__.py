"""The `nanovllm` command: `nanovllm serve MODEL [options]` (also `python -m nanovllm serve MODEL`).

Option names are vLLM's (`vllm serve`); engine options map to `LLM(...)` keyword arguments.
"""
import argparse
import os

# (flag, type or "flag", help): engine arguments; the keyword is the flag with "_" for "-".
_ENGINE_ARGS = [
    ("--tokenizer", str, "tokenizer name or path (default: the model's)"),
    ("--dtype", str, "auto, float32, float16 or bfloat16"),
    ("--seed", int, "engine seed"),
    ("--max-model-len", int, "context length (default: the model's)"),
    ("--tensor-parallel-size", int, "number of GPUs to shard the model over"),
    ("--gpu-memory-utilization", float, "fraction of GPU memory for weights + KV cache"),
    ("--max-num-seqs", int, "most sequences in one batch"),
    ("--max-num-batched-tokens", int, "most tokens in one step"),
    ("--block-size", int, "KV cache block size (tokens)"),
    ("--num-gpu-blocks-override", int, "fixed number of KV cache blocks"),
    ("--device", str, "auto, cuda or cpu"),
    ("--load-format", str, "auto, or dummy for random weights"),
    ("--attention-backend", str, "auto, triton, flash_attn or torch"),
    ("--enforce-eager", "flag", "do not capture CUDA graphs"),
    ("--trust-remote-code", "flag", "allow the checkpoint's own code"),
]


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="nanovllm")
    commands = parser.add_subparsers(dest="command", required=True)
    serve = commands.add_parser("serve", help="OpenAI-compatible HTTP server")
    serve.add_argument("model", help="checkpoint directory, .gguf file or Hugging Face repo id")
    serve.add_argument("--host", default=None, help="address to bind (default: all interfaces)")
    serve.add_argument("--port", type=int, default=8000)
    serve.add_argument("--api-key", default=os.environ.get("VLLM_API_KEY"),
                       help="require `Authorization: Bearer KEY` (default: $VLLM_API_KEY)")
    serve.add_argument("--served-model-name", nargs="+", default=None,
                       help="name(s) clients use for the model (default: the model argument)")
    serve.add_argument("--chat-template", default=None, help="Jinja chat template, or a file holding one")
    serve.add_argument("--uvicorn-log-level", default="info")
    serve.add_argument("--enable-prefix-caching", action=argparse.BooleanOptionalAction, default=None)
    for flag, kind, help in _ENGINE_ARGS:
        names = [flag, "-tp"] if flag == "--tensor-parallel-size" else [flag]
        if kind == "flag":
            serve.add_argument(*names, action="store_true", default=None, help=help)
        else:
            serve.add_argument(*names, type=kind, default=None, help=help)
    return parser


def main(argv: list[str] | None = None) -> None:
    args = vars(_parser().parse_args(argv))
    if args.pop("command") == "serve":
        from nanovllm.entrypoints.openai_server import run_server
        server_keys = ("model", "host", "port", "api_key", "served_model_name", "chat_template")
        server = {k: args.pop(k) for k in server_keys}
        engine = {k: v for k, v in args.items() if v is not None and k != "uvicorn_log_level"}
        run_server(**server, log_level=args["uvicorn_log_level"], **engine)


if __name__ == "__main__":
    main()
