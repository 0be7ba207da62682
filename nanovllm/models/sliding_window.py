"""Which layers of a model attend through a sliding window, from the config's several ways of
saying it (Mistral, Phi-3, Qwen2/Qwen3, Gemma 3; transformers 4.x and 5)."""


def sliding_windows(config, max_model_len: int | None = None) -> list[int | None]:
    """Per layer, how many keys a query sees (None: all of them).

    transformers 5 lists each layer's kind in `layer_types` (Qwen2/Qwen3 with use_sliding_window,
    Gemma 3); otherwise a `sliding_window` applies to every layer (Mistral, Phi-3, Qwen3-MoE),
    or, in transformers 4.x Qwen2/Qwen3 configs, to the layers from `max_window_layers` on.
    A window no shorter than max_model_len never hides a key: those layers attend fully.
    """
    n = config.num_hidden_layers
    window = getattr(config, "sliding_window", None)
    if window is None or getattr(config, "use_sliding_window", True) is False:
        return [None] * n
    layer_types = getattr(config, "layer_types", None)
    if layer_types is None:
        first = getattr(config, "max_window_layers", 0)
        layer_types = ["sliding_attention" if i >= first else "full_attention" for i in range(n)]
    if max_model_len is not None and window >= max_model_len:
        window = None
    return [window if kind == "sliding_attention" else None for kind in layer_types]
