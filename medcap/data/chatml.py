"""A torchtune model tokenizer for Hugging Face ``tokenizer.json`` models with a ChatML template
(SmolLM2, Qwen2 and kin): torchtune 0.6.1 has the base tokenizer but no chat template for them.

``<|im_start|>{role}\\n{content}<|im_end|>\\n`` per message, as the models' own Jinja templates
write it. Template tokens are the vocabulary's special ids; message text is encoded with special
tokens disabled, so a user typing "<|im_end|>" gets plain text, not a turn boundary. The image
id is one past the vocabulary: no text can produce it.
"""

from __future__ import annotations

from pathlib import Path

from tokenizers import Tokenizer
from torchtune.data import Message
from torchtune.modules.transforms.tokenizers import ModelTokenizer

IM_START, IM_END, END_OF_TEXT = "<|im_start|>", "<|im_end|>", "<|endoftext|>"


class ChatMLTokenizer(ModelTokenizer):
    def __init__(
        self,
        path: str | Path,
        *,
        max_seq_len: int | None = None,
        default_system_prompt: str | None = None,
    ):
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"tokenizer.json not found: {path}")
        self.tokenizer = Tokenizer.from_file(str(path))
        # template pieces go through token_to_id; text bodies must never turn into specials
        self.tokenizer.encode_special_tokens = True
        ids = {tok: self.tokenizer.token_to_id(tok) for tok in (IM_START, IM_END, END_OF_TEXT)}
        missing = [tok for tok, i in ids.items() if i is None]
        if missing:
            raise ValueError(f"{path}: not a ChatML tokenizer (no {missing} in its vocabulary)")
        self.im_start_id, self.im_end_id, self.eos_id = ids[IM_START], ids[IM_END], ids[END_OF_TEXT]
        self.bos_id = None
        self.pad_id = self.eos_id
        self.stop_tokens = [self.im_end_id, self.eos_id]
        self.vocab_size = self.tokenizer.get_vocab_size(with_added_tokens=True)
        self.image_id = self.vocab_size
        self.max_seq_len = max_seq_len
        self.default_system_prompt = default_system_prompt

    def encode(self, text: str, add_bos: bool = False, add_eos: bool = False) -> list[int]:
        ids = self.tokenizer.encode(text, add_special_tokens=False).ids
        return ids + [self.eos_id] if add_eos else ids

    def decode(self, token_ids: list[int], skip_special_tokens: bool = True) -> str:
        ids = [int(t) for t in token_ids if 0 <= int(t) < self.vocab_size]
        return self.tokenizer.decode(ids, skip_special_tokens=skip_special_tokens)

    def _body(self, message: Message) -> list[int]:
        tokens: list[int] = []
        for item in message.content:
            if item["type"] == "text":
                tokens += self.encode(item["content"])
            elif item["type"] == "image":
                tokens.append(self.image_id)
            else:
                raise ValueError(f"unsupported message content type {item['type']!r}")
        return tokens

    def tokenize_messages(
        self, messages: list[Message], *, add_end_tokens: bool = True
    ) -> tuple[list[int], list[bool]]:
        if self.default_system_prompt and (not messages or messages[0].role != "system"):
            messages = [Message(role="system", content=self.default_system_prompt, masked=True), *messages]
        tokens: list[int] = []
        mask: list[bool] = []
        for i, message in enumerate(messages):
            piece = [self.im_start_id] + self.encode(f"{message.role}\n") + self._body(message)
            if add_end_tokens or i < len(messages) - 1:
                piece += [self.im_end_id] + self.encode("\n")
            tokens += piece
            mask += [message.masked] * len(piece)
        if self.max_seq_len:
            tokens, mask = tokens[: self.max_seq_len], mask[: self.max_seq_len]
        return tokens, mask

    def __call__(self, sample: dict, inference: bool = False) -> dict:
        tokens, mask = self.tokenize_messages(sample.pop("messages"), add_end_tokens=not inference)
        sample.update(tokens=tokens, mask=mask)
        return sample


def chatml_tokenizer(
    path: str, max_seq_len: int | None = None, default_system_prompt: str | None = None
) -> ChatMLTokenizer:
    """Config entry point: ``tokenizer._component_=medcap.data.chatml.chatml_tokenizer``."""
    return ChatMLTokenizer(path, max_seq_len=max_seq_len, default_system_prompt=default_system_prompt)
