"""chat_messages.py: which content format "auto" picks for a template, and what the template
is then given, through LLM.chat and the server's handlers."""
import pytest

from nanovllm import LLM, SamplingParams
from nanovllm.chat_messages import detect_content_format
from nanovllm.entrypoints.openai_handlers import OpenAIHandlers
from nanovllm.entrypoints.protocol import ChatMessage

# A template for OpenAI's content lists: each text part between bars.
PARTS_TEMPLATE = ("{% for m in messages %}<{{ m['role'] }}>{% for p in m['content'] %}|{{ p['text'] }}"
                  "{% endfor %}{% endfor %}{% if add_generation_prompt %}<assistant>{% endif %}")
STRING_TEMPLATE = ("{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}{% endfor %}"
                   "{% if add_generation_prompt %}<assistant>{% endif %}")
PARTS = [{"role": "user", "content": [{"type": "text", "text": "Hello,"}, {"type": "text", "text": "my name"}]}]


@pytest.fixture(scope="module")
def llm(tiny_qwen3):
    return LLM(tiny_qwen3, device="cpu", max_model_len=128)


@pytest.mark.parametrize("template, expected", [
    (STRING_TEMPLATE, "string"),
    (PARTS_TEMPLATE, "openai"),
    # through a filter, through attribute access, and through a variable set from the content
    ("{% for m in messages %}{% for p in m.content | selectattr('type', 'equalto', 'text') %}{{ p.text }}"
     "{% endfor %}{% endfor %}", "openai"),
    ("{% for m in messages %}{% set c = m['content'] %}{% if c is string %}{{ c }}{% else %}"
     "{% for p in c %}{{ p.text }}{% endfor %}{% endif %}{% endfor %}", "openai"),
    # loops over other things only (with loop controls, which some templates use)
    ("{% for m in messages %}{% if m['role'] == 'tool' %}{% continue %}{% endif %}{{ m['content'] }}"
     "{% for t in tools %}{{ t }}{% endfor %}{% endfor %}", "string"),
    ("{% for m in messages %}", "string"),          # does not parse: apply_chat_template will say so
])
def test_auto_detects_templates_that_loop_over_content(template, expected):
    assert detect_content_format(template) == expected


def test_llm_chat_gives_a_parts_template_the_parts(llm):
    """With "auto", a template that loops over content parts gets them as a list (as "openai"),
    a template for strings gets them joined (as "string")."""
    def prompt(template, content_format):
        out = llm.chat(PARTS, SamplingParams(temperature=0, max_tokens=1), use_tqdm=False, chat_template=template,
                       chat_template_content_format=content_format)[0]
        return out.prompt
    assert prompt(PARTS_TEMPLATE, "auto") == prompt(PARTS_TEMPLATE, "openai") == "<user>|Hello,|my name<assistant>"
    # joined, the template would loop over the characters of a string and find no 'text' in them
    assert prompt(PARTS_TEMPLATE, "string") == "<user>||||||||||||||<assistant>"
    assert prompt(STRING_TEMPLATE, "auto") == prompt(STRING_TEMPLATE, "string") == "<user>Hello,\nmy name<assistant>"
    # a string content reaches a parts template as one text part (as vLLM gives it)
    plain = [{"role": "user", "content": "Hello"}]
    out = llm.chat(plain, SamplingParams(temperature=0, max_tokens=1), use_tqdm=False, chat_template=PARTS_TEMPLATE)
    assert out[0].prompt == "<user>|Hello<assistant>"


def test_llm_chat_parses_a_template_once(llm):
    """LLM.chat resolves "auto" on every call; the template's parse is cached by its text."""
    template = PARTS_TEMPLATE + "{# parsed once #}"
    misses = detect_content_format.cache_info().misses
    for _ in range(3):
        llm.chat(PARTS, SamplingParams(temperature=0, max_tokens=1), use_tqdm=False, chat_template=template)
    assert detect_content_format.cache_info().misses == misses + 1


def test_server_resolves_auto_once_for_its_template(llm):
    tokenizer = llm.get_tokenizer()
    for template, expected in ((PARTS_TEMPLATE, "openai"), (STRING_TEMPLATE, "string")):
        handlers = OpenAIHandlers(None, ["m"], tokenizer, 64, template)
        assert handlers.content_format == expected
        (message,) = [ChatMessage(**m).to_template(handlers.content_format) for m in PARTS]
        rendered = tokenizer.apply_chat_template([message], tokenize=False, chat_template=template,
                                                 add_generation_prompt=True)
        assert rendered == ("<user>|Hello,|my name<assistant>" if expected == "openai"
                            else "<user>Hello,\nmy name<assistant>")
    assert ChatMessage(role="user", content="Hello").to_template("openai")["content"] == [
        {"type": "text", "text": "Hello"}]
    assert OpenAIHandlers(None, ["m"], tokenizer, 64, PARTS_TEMPLATE, "string").content_format == "string"

