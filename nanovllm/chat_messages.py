"""Chat conversations as LLM.chat takes them, and as the chat template is given them.

vLLM's rules: a non-empty list of message dicts is one conversation, anything else a list of
them; a message is a dict with a "role" string and a "content" that is a string, None, or a
list of OpenAI content parts ({"type": "text", "text": ...}). With the "string" content format
(for templates written for strings) the text parts are joined with newlines; with "openai" the
parts go to the template as they are (a string as one text part); "auto" picks "openai" for a
template that loops over a message's content, as vLLM does. A malformed conversation is a
ValueError naming `messages`, not an error from deep inside the template.
"""
import functools

CONTENT_FORMATS = ("auto", "string", "openai")
# What LLM.chat passes to apply_chat_template itself (chat_template_kwargs may not set them)
_OWN_TEMPLATE_ARGUMENTS = {"conversation", "tokenize", "add_generation_prompt", "continue_final_message",
                           "chat_template", "tools"}


def as_conversations(messages) -> list[list[dict]]:
    """One conversation or a list of them, as a list of conversations."""
    if isinstance(messages, (list, tuple)) and messages and all(isinstance(m, dict) for m in messages):
        return [list(messages)]
    if not isinstance(messages, (list, tuple)) or not messages or \
            not all(isinstance(c, (list, tuple)) and c for c in messages):
        raise ValueError("messages must be a conversation (a non-empty list of {'role', 'content'} dicts) "
                         f"or a list of conversations, got {_describe(messages)}")
    return [list(conversation) for conversation in messages]


def for_template(message, content_format: str = "auto") -> dict:
    """The message as the chat template is given it (checked first)."""
    if not isinstance(message, dict) or not isinstance(message.get("role"), str):
        raise ValueError(f"messages: each message must be a dict with a 'role' string, got {_describe(message)}")
    content = message.get("content")
    if isinstance(content, list):
        texts = [part.get("text") if isinstance(part, dict) and part.get("type") == "text" else None
                 for part in content]
        if any(not isinstance(text, str) for text in texts):
            raise ValueError("messages: only text content parts ({'type': 'text', 'text': ...}) are supported, "
                             f"got {content!r}")
        if content_format != "openai":
            return {**message, "content": join_text_parts(texts)}
    elif content is not None and not isinstance(content, str):
        raise ValueError(f"messages: a message's content must be a string, a list of content parts or None, "
                         f"got {_describe(content)}")
    elif isinstance(content, str) and content_format == "openai":     # one text part, as vLLM gives it
        return {**message, "content": [{"type": "text", "text": content}]}
    return message


def resolve_content_format(content_format: str, tokenizer, chat_template: str | None = None,
                           tools: list[dict] | None = None) -> str:
    """"string" or "openai": "auto" resolved from the template that will be applied."""
    if content_format != "auto":
        return content_format
    try:
        template = tokenizer.get_chat_template(chat_template, tools)
    except (ValueError, AttributeError):      # no template at all: apply_chat_template will say so
        return "string"
    return detect_content_format(template)


@functools.lru_cache(maxsize=16)     # LLM.chat resolves "auto" on every call: parse each template once
def detect_content_format(template: str) -> str:
    """"openai" where the Jinja template iterates over a message's content (so it expects a list
    of parts), else "string"; a template that does not parse is treated as a string template."""
    import jinja2.ext       # (here: `nanovllm --help` imports this module, and should stay quick)
    from jinja2 import nodes
    from jinja2.sandbox import ImmutableSandboxedEnvironment
    try:
        tree = ImmutableSandboxedEnvironment(extensions=[jinja2.ext.loopcontrols]).parse(template)
    except jinja2.TemplateSyntaxError:
        return "string"
    # names set from a content ({% set content = message['content'] %}) count as content too
    names = {a.target.name for a in tree.find_all(nodes.Assign)
             if isinstance(a.target, nodes.Name) and _reads_content(a.node, set())}
    loops = tree.find_all(nodes.For)
    return "openai" if any(_reads_content(loop.iter, names) for loop in loops) else "string"


def _reads_content(node, names: set) -> bool:
    """Whether the expression is x['content'] or x.content (through filters), or a name set from one."""
    from jinja2 import nodes
    if isinstance(node, nodes.Filter):
        return _reads_content(node.node, names)
    if isinstance(node, nodes.Getitem):
        return isinstance(node.arg, nodes.Const) and node.arg.value == "content"
    if isinstance(node, nodes.Getattr):
        return node.attr == "content"
    return isinstance(node, nodes.Name) and node.name in names


def join_text_parts(texts: list[str]) -> str:
    """A message's text parts as one string (vLLM's "string" content format)."""
    return "\n".join(texts)


def check_chat_args(content_format, template_kwargs, tokenization_kwargs, mm_processor_kwargs) -> dict:
    """LLM.chat's other arguments; returns the chat template's extra keyword arguments."""
    if content_format not in CONTENT_FORMATS:
        raise ValueError(f"chat_template_content_format must be one of {list(CONTENT_FORMATS)}, got {content_format!r}")
    for name, value in (("tokenization_kwargs", tokenization_kwargs), ("mm_processor_kwargs", mm_processor_kwargs)):
        if value:
            raise ValueError(f"{name} is not supported by nanovllm (it has no prompt truncation and no multimodal "
                             f"models), got {value!r}")
    template_kwargs = {} if template_kwargs is None else template_kwargs
    if not isinstance(template_kwargs, dict):
        raise ValueError(f"chat_template_kwargs must be a dict, got {_describe(template_kwargs)}")
    clash = sorted(set(template_kwargs) & _OWN_TEMPLATE_ARGUMENTS)
    if clash:
        raise ValueError(f"chat_template_kwargs may not set {clash}: chat() sets them itself")
    return template_kwargs


def _describe(value) -> str:
    text = repr(value)
    return text if len(text) <= 80 else f"{type(value).__name__} {text[:77]}..."
