"""nano-vllm's output access, kept so its scripts run unchanged: its `generate` returned plain
dicts, read as `output["text"]` and `output["token_ids"]` (the first completion's)."""


class ItemAccess:
    """`obj["text"]` reads `obj.text`."""

    def __getitem__(self, key: str):
        if not isinstance(key, str) or not hasattr(self, key):
            raise KeyError(key)
        return getattr(self, key)


class FirstCompletionItems(ItemAccess):
    """A RequestOutput's first completion's text and token ids, at the top level as in nano-vllm."""

    @property
    def text(self) -> str:
        return self.outputs[0].text

    @property
    def token_ids(self) -> list[int]:
        return self.outputs[0].token_ids
