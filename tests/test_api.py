"""The offline API's shapes, and bad input: a clear error, and the engine still serves."""
import pytest

from nanovllm import LLM, RequestOutput, SamplingParams
from tests.conftest import hf_greedy, random_prompts


@pytest.fixture(scope="module")
def llm(tiny_qwen3):
    return LLM(tiny_qwen3, device="cpu", max_model_len=128)


GREEDY = SamplingParams(temperature=0, max_tokens=4)


def changed(**fields) -> SamplingParams:
    """SamplingParams with fields set after it was made (so its own checks never saw them)."""
    params = SamplingParams(temperature=0.8, max_tokens=4)
    for name, value in fields.items():
        setattr(params, name, value)
    return params


def test_prompt_forms_and_output_shapes(llm):
    tok = llm.get_tokenizer()
    ids = tok.encode("Hello, my name is")
    forms = ["Hello, my name is", {"prompt": "Hello, my name is"}, {"prompt_token_ids": ids}, ids]
    outs = [llm.generate(f, GREEDY, use_tqdm=False) for f in forms]
    assert all(len(o) == 1 and isinstance(o[0], RequestOutput) for o in outs)
    assert len({tuple(o[0].outputs[0].token_ids) for o in outs}) == 1
    out = outs[0][0]
    assert out.finished and out.prompt_token_ids == ids
    c = out.outputs[0]
    assert c.index == 0 and c.cumulative_logprob is None and c.logprobs is None
    assert c.finish_reason in ("stop", "length")
    # nano-vllm's dict access
    assert out["text"] == c.text and out["token_ids"] == c.token_ids == c["token_ids"]
    # Many prompts in input order, with one SamplingParams each.
    batch = llm.generate([ids, [5, 6], ids[:2]], [GREEDY, SamplingParams(temperature=0, max_tokens=2), GREEDY],
                         use_tqdm=False)
    assert [o.prompt_token_ids for o in batch] == [ids, [5, 6], ids[:2]]
    assert len(batch[1].outputs[0].token_ids) <= 2
    assert [int(o.request_id) for o in batch] == sorted(int(o.request_id) for o in batch)


def test_unknown_token_ids_decode_without_crashing(llm):
    # The model's vocabulary (512) is larger than the tokenizer's (400).
    out = llm.generate([[450, 500, 511]], SamplingParams(temperature=1.0, max_tokens=8, seed=1),
                       use_tqdm=False)[0]
    assert isinstance(out.outputs[0].text, str)


@pytest.mark.parametrize("call, match", [
    (lambda llm: llm.generate("hi", SamplingParams(temperature=-1)), "temperature"),
    (lambda llm: llm.generate("hi", SamplingParams(max_tokens=0)), "max_tokens"),
    (lambda llm: llm.generate([[]], GREEDY), "empty"),
    (lambda llm: llm.generate([""], GREEDY), "empty"),
    (lambda llm: llm.generate([[1, 2, 512]], GREEDY), "512"),
    (lambda llm: llm.generate([[1, 2, -1]], GREEDY), "-1"),
    (lambda llm: llm.generate([list(range(3, 200))], GREEDY), "longer than the maximum model length"),
    (lambda llm: llm.generate(["a", "b"], [GREEDY]), "lengths of prompts"),
    (lambda llm: llm.generate([{"text": "hi"}], GREEDY), "prompt"),
    (lambda llm: llm.generate([[1, "x"]], GREEDY), "integers"),
    (lambda llm: llm.generate(None, GREEDY), "prompts must be"),
    (lambda llm: llm.generate("hi", "greedy"), "sampling_params must be"),
    (lambda llm: llm.generate("hi", GREEDY, lora_request=object()), "lora_request"),
    (lambda llm: llm.generate(["a", "b"], GREEDY, priority=[0]), "priority"),
    (lambda llm: llm.generate(["a", "b"], GREEDY, priority=1), "priority"),
    (lambda llm: llm.generate({"prompt_token_ids": 5}, GREEDY), "list of integers"),
    # checked again when added: n = 0 made a request with no sequences, which never finished
    (lambda llm: llm.generate("hi", changed(n=0)), "n must be at least 1"),
    (lambda llm: llm.generate(["a", "b"], [GREEDY, changed(top_k=1.5)]), "top_k"),
    (lambda llm: llm.generate("hi", changed(max_tokens=0)), "max_tokens"),
    (lambda llm: llm.generate("hi", changed(stop=[""])), "stop"),
    # no max_tokens: the context left, which min_tokens must fit as it must fit a max_tokens given
    (lambda llm: llm.generate("hi", SamplingParams(max_tokens=None, min_tokens=1000)), "min_tokens"),
    # chat: the messages are checked before the template sees them
    (lambda llm: llm.chat(None, GREEDY), "messages must be"),
    (lambda llm: llm.chat({"role": "user", "content": "hi"}, GREEDY), "messages must be"),
    (lambda llm: llm.chat(["hi"], GREEDY), "messages must be"),
    (lambda llm: llm.chat([{"content": "hi"}], GREEDY), "role"),
    (lambda llm: llm.chat([{"role": "user", "content": 5}], GREEDY), "content"),
    (lambda llm: llm.chat([{"role": "user", "content": [{"type": "image_url"}]}], GREEDY), "text content parts"),
    (lambda llm: llm.chat([{"role": "user", "content": "hi"}], GREEDY, chat_template="{% if %}"), "chat template"),
    (lambda llm: llm.chat([{"role": "user", "content": "hi"}], GREEDY, chat_template_kwargs={"tokenize": True}),
     "chat_template_kwargs"),
    (lambda llm: llm.chat([{"role": "user", "content": "hi"}], GREEDY, chat_template_content_format="xml"),
     "chat_template_content_format"),
])
def test_bad_input_raises_value_error_and_engine_still_serves(llm, call, match):
    with pytest.raises(ValueError, match=match):
        call(llm)
    assert not llm.llm_engine.has_unfinished_requests()
    assert llm.generate("Hello", GREEDY, use_tqdm=False)[0].finished


def test_changed_params_are_normalised_when_added(llm):
    """A stop string set after the SamplingParams was made is one string (not its characters)."""
    text = llm.generate("Hello", GREEDY, use_tqdm=False)[0].outputs[0].text
    stop = text[1:3]
    out = llm.generate("Hello", changed(stop=stop, temperature=0), use_tqdm=False)[0].outputs[0]
    assert out.stop_reason == stop and out.text == text[:text.index(stop)]


def test_a_failed_generate_leaves_requests_it_did_not_add(llm):
    """generate aborts the requests it added before failing, and only those."""
    engine = llm.llm_engine
    mine = str(next(llm.request_counter) + 1)           # the id generate's second prompt will get
    engine.add_request(mine, [5, 6, 7], GREEDY)
    with pytest.raises(ValueError, match="already in use"):
        llm.generate(["a", "b"], GREEDY, use_tqdm=False)
    finished = []
    while engine.has_unfinished_requests():
        finished += [out.request_id for out in engine.step() if out.finished]
    assert finished == [mine]


def test_chat_takes_text_content_parts_and_vllms_arguments(llm):
    tok = llm.get_tokenizer()
    parts = [{"role": "user", "content": [{"type": "text", "text": "Hello,"}, {"type": "text", "text": "my name"}]}]
    joined = [{"role": "user", "content": "Hello,\nmy name"}]      # vLLM's "string" format: newlines between
    out = llm.chat(parts, GREEDY, use_tqdm=False)[0]
    assert out.prompt_token_ids == tok.apply_chat_template(joined, add_generation_prompt=True, return_dict=False)
    # vLLM's positional order (messages, sampling_params, use_tqdm, lora_request, chat_template, ...)
    # and its other arguments at their defaults
    again = llm.chat(joined, GREEDY, False, None, None, "string", True, False, None, None, None, None)[0]
    assert again.prompt_token_ids == out.prompt_token_ids


def test_bad_engine_arguments(tiny_qwen3, tmp_path, checkpoint_factory):
    with pytest.raises(OSError, match="does not exist"):
        LLM(str(tmp_path / "missing"))
    with pytest.raises(TypeError, match="not_an_argument"):
        LLM(tiny_qwen3, not_an_argument=1)
    for kwargs, match in [(dict(dtype="float8"), "dtype"), (dict(block_size=48), "block_size"),
                          (dict(gpu_memory_utilization=1.5), "gpu_memory_utilization"),
                          (dict(max_model_len=100000), "max_model_len"), (dict(load_format="pt"), "load_format"),
                          (dict(tensor_parallel_size=3), "tensor_parallel_size"),
                          (dict(device="tpu"), "device"),
                          # a string is not a bool: "False" would have switched the feature on
                          (dict(enforce_eager="False"), "enforce_eager"),
                          (dict(enable_prefix_caching="false"), "enable_prefix_caching"),
                          (dict(trust_remote_code="no"), "trust_remote_code")]:
        with pytest.raises(ValueError, match=match):
            LLM(tiny_qwen3, **kwargs)
    import json
    import os
    path = checkpoint_factory("qwen3", vocab_size=256)
    cfg = json.load(open(os.path.join(path, "config.json")))
    cfg["architectures"] = ["GPTBigCodeForCausalLM"]
    bad = tmp_path / "bad"
    bad.mkdir()
    for f in os.listdir(path):
        (bad / f).write_bytes(open(os.path.join(path, f), "rb").read())
    (bad / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="GPTBigCodeForCausalLM.*Supported"):
        LLM(str(bad), device="cpu")


def test_request_larger_than_the_cache_is_rejected(tiny_qwen3):
    llm = LLM(tiny_qwen3, device="cpu", num_gpu_blocks_override=4, block_size=16)   # 64 slots
    with pytest.raises(ValueError, match="KV cache"):
        llm.generate([list(range(3, 60))], SamplingParams(max_tokens=20))
    assert llm.generate([list(range(3, 40))], SamplingParams(max_tokens=20), use_tqdm=False)[0].finished


def test_dummy_weights_run(tiny_qwen3):
    llm = LLM(tiny_qwen3, device="cpu", load_format="dummy")
    out = llm.generate([[1, 2, 3]], SamplingParams(max_tokens=5, ignore_eos=True), use_tqdm=False)[0]
    assert len(out.outputs[0].token_ids) == 5


def test_mistral_with_a_short_sliding_window_runs_it(checkpoint_factory):
    """A window shorter than max_model_len was refused before sliding-window attention existed;
    now prompts longer than the window get transformers' tokens."""
    path = checkpoint_factory("mistral", sliding_window=16)
    prompts = random_prompts(2, 30, 50, seed=12)
    outs = LLM(path, device="cpu").generate(prompts, SamplingParams(temperature=0, max_tokens=8), use_tqdm=False)
    assert [o.outputs[0].token_ids for o in outs] == hf_greedy(path, prompts, 8)


def test_default_sampling_params_come_from_generation_config(tiny_qwen3, tmp_path):
    import json
    import shutil
    path = tmp_path / "model"
    shutil.copytree(tiny_qwen3, path)
    (path / "generation_config.json").write_text(json.dumps(
        {"eos_token_id": 2, "temperature": 0.6, "top_k": 20, "top_p": 0.95, "max_new_tokens": 7}))
    p = LLM(str(path), device="cpu").get_default_sampling_params()
    assert (p.temperature, p.top_k, p.top_p, p.max_tokens) == (0.6, 20, 0.95, 7)
    (path / "generation_config.json").write_text(json.dumps({"temperature": 0.0, "max_new_tokens": 5}))
    llm = LLM(str(path), device="cpu")
    default = llm.generate([[5, 6, 7]], use_tqdm=False)[0].outputs[0]       # no SamplingParams given
    explicit = llm.generate([[5, 6, 7]], SamplingParams(temperature=0, max_tokens=5), use_tqdm=False)[0].outputs[0]
    assert default.token_ids == explicit.token_ids
    # A checkpoint without sampling settings gets vLLM's plain defaults.
    assert LLM(tiny_qwen3, device="cpu").get_default_sampling_params() == SamplingParams()


def test_repo_id_without_the_hub_says_how_to_get_weights(monkeypatch):
    import huggingface_hub

    def offline(*args, **kwargs):
        raise ConnectionError("no network")
    monkeypatch.setattr(huggingface_hub, "snapshot_download", offline)
    with pytest.raises(OSError, match="hf download Qwen/Qwen3-0.6B"):
        LLM("Qwen/Qwen3-0.6B")
    with pytest.raises(OSError, match="does not exist"):
        LLM("./no/such/dir")


def test_vllm_arguments_nanovllm_does_not_implement(tiny_qwen3):
    # Accepted at their defaults (vLLM scripts pass them), refused otherwise.
    LLM(tiny_qwen3, device="cpu", tokenizer_mode="auto", kv_cache_dtype="auto", quantization=None,
        disable_log_stats=True, swap_space=4)
    for kwargs in [dict(kv_cache_dtype="fp8_e5m2"), dict(quantization="awq"), dict(tokenizer_mode="mistral")]:
        with pytest.raises(ValueError, match=next(iter(kwargs))):
            LLM(tiny_qwen3, device="cpu", **kwargs)


def test_generate_keeps_older_objects_from_the_collector_only_while_it_runs(llm, monkeypatch):
    import gc
    frozen_during = []
    step = llm.llm_engine.step
    monkeypatch.setattr(llm.llm_engine, "step", lambda: frozen_during.append(gc.get_freeze_count()) or step())
    before = gc.get_freeze_count()
    llm.generate([[1, 2, 3]], GREEDY, use_tqdm=False)
    assert frozen_during and min(frozen_during) > before
    assert gc.get_freeze_count() == before


def test_progress_bar_counts_prompts_and_reports_token_rates(llm, capsys):
    outs = llm.generate([[1, 2, 3], [4, 5]], SamplingParams(temperature=0, max_tokens=3, ignore_eos=True))
    shown = capsys.readouterr().err.splitlines()[-1]
    assert "Processed prompts: 100%" in shown and "2/2" in shown
    tokens_in, tokens_out = (float(shown.split(f"{kind}: ")[1].split(" toks/s")[0]) for kind in ("input", "output"))
    # both rates over the same elapsed time: 5 prompt and 6 output tokens, each rate rounded to a whole number
    assert tokens_out > 0 and abs(6 * tokens_in - 5 * tokens_out) <= 6 * 0.5 + 5 * 0.5
    assert len(outs) == 2
