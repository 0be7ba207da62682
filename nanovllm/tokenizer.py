from nanovllm.config import EngineConfig


def load_tokenizer(config: EngineConfig):
    """The Hugging Face tokenizer of `config.tokenizer`, or of the model's directory."""
    from transformers import AutoTokenizer
    return AutoTokenizer.from_pretrained(config.tokenizer or config.model_dir,
                                         trust_remote_code=config.trust_remote_code)
