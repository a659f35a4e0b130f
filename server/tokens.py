"""Text <-> token ids for the server: the model's tokenizer, or a byte-level fallback;
chat templates; incremental detokenization with OpenAI stop strings.

Byte fallback (models without tokenizer files, e.g. `dummy:` configs): text is encoded
as its UTF-8 bytes, one token id per byte (ids 0..255; needs vocab_size >= 256). Ids
0..255 decode back to those bytes (invalid UTF-8 shows as U+FFFD); any other id decodes
to the visible placeholder `<|id|>`, e.g. `<|4711|>`. No BOS/EOS is added.

Chat: with a tokenizer that has a `chat_template`, that template renders the messages
(add_generation_prompt=True) and the result is tokenized without adding special tokens.
Otherwise the documented plain template is used:

    <role>: <content>\\n      (one line per message, in order)
    assistant:              (the generation prompt, no trailing space)

Text that is not valid Unicode (a lone surrogate such as "\\ud800", which JSON can carry
as an escape) cannot be tokenized: `encode` and `chat_prompt` raise `InvalidText` naming
its position, which the server turns into a 400. `max_chars_per_token` bounds how much
text one token can stand for, so the server can reject a far too long prompt before
tokenizing it.
"""
from __future__ import annotations

import codecs
from typing import Any, Protocol, Sequence


class InvalidText(ValueError):
    """Text that has no UTF-8 encoding (a lone surrogate)."""

    def __init__(self, message: str, position: int) -> None:
        super().__init__(message)
        self.position = position


def check_text(text: str) -> None:
    """InvalidText unless `text` is valid Unicode (encodable as UTF-8)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise InvalidText(f"invalid Unicode: a lone surrogate U+{ord(text[e.start]):04X} at character "
                          f"{e.start} (text must be valid UTF-16 pairs / UTF-8)", e.start) from None


class TextCodec(Protocol):
    name: str
    max_chars_per_token: int

    def encode(self, text: str) -> list[int]: ...
    def decoder(self) -> "Detokenizer": ...
    def chat_prompt(self, messages: Sequence[tuple[str, str]]) -> list[int]: ...


def plain_chat_text(messages: Sequence[tuple[str, str]]) -> str:
    return "".join(f"{role}: {content}\n" for role, content in messages) + "assistant:"


class Detokenizer:
    """Turns a stream of token ids into text deltas."""

    def add(self, token_ids: Sequence[int]) -> str:  # pragma: no cover - interface
        raise NotImplementedError

    def flush(self) -> str:
        return ""


class ByteCodec:
    name = "bytes"
    max_chars_per_token = 1      # one token per UTF-8 byte: never fewer tokens than characters

    def __init__(self, vocab_size: int) -> None:
        if vocab_size < 256:
            raise ValueError(f"the byte-level fallback tokenizer needs vocab_size >= 256, got {vocab_size}; "
                             "give the model tokenizer files or send token-id prompts")
        self.vocab_size = vocab_size

    def encode(self, text: str) -> list[int]:
        check_text(text)
        return list(text.encode("utf-8"))

    def chat_prompt(self, messages: Sequence[tuple[str, str]]) -> list[int]:
        for _, content in messages:
            check_text(content)
        return self.encode(plain_chat_text(messages))

    def decoder(self) -> Detokenizer:
        return _ByteDetokenizer()


class _ByteDetokenizer(Detokenizer):
    def __init__(self) -> None:
        self._utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def add(self, token_ids: Sequence[int]) -> str:
        out = []
        for t in token_ids:
            if 0 <= t < 256:
                out.append(self._utf8.decode(bytes((t,))))
            else:
                out.append(self._utf8.decode(b"", final=True) + f"<|{t}|>")
        return "".join(out)

    def flush(self) -> str:
        return self._utf8.decode(b"", final=True)


class HFCodec:
    name = "hf"

    def __init__(self, tokenizer: Any) -> None:
        self.tok = tokenizer
        # the longest vocabulary entry (byte-level entries spell one character per byte, so
        # this bounds the characters a token can cover), doubled for normalizers
        vocab = tokenizer.get_vocab() if hasattr(tokenizer, "get_vocab") else {}
        self.max_chars_per_token = 2 * max((len(t) for t in vocab), default=64)

    def encode(self, text: str) -> list[int]:
        check_text(text)
        return list(self.tok.encode(text))

    def chat_prompt(self, messages: Sequence[tuple[str, str]]) -> list[int]:
        for _, content in messages:
            check_text(content)
        if getattr(self.tok, "chat_template", None):
            text = self.tok.apply_chat_template([{"role": r, "content": c} for r, c in messages],
                                                tokenize=False, add_generation_prompt=True)
            return list(self.tok.encode(text, add_special_tokens=False))
        return list(self.tok.encode(plain_chat_text(messages)))

    def decoder(self) -> Detokenizer:
        return _HFDetokenizer(self.tok)


class _HFDetokenizer(Detokenizer):
    """vLLM-style incremental decoding: decode a short window of ids and emit the new
    suffix once it no longer ends in an incomplete character."""

    def __init__(self, tok: Any) -> None:
        self.tok = tok
        self.ids: list[int] = []
        self.prefix = 0
        self.read = 0

    def _decode(self, ids: list[int]) -> str:
        return self.tok.decode(ids, skip_special_tokens=True)

    def add(self, token_ids: Sequence[int]) -> str:
        self.ids.extend(token_ids)
        prefix_text = self._decode(self.ids[self.prefix:self.read])
        new_text = self._decode(self.ids[self.prefix:])
        if len(new_text) > len(prefix_text) and not new_text.endswith("\ufffd"):
            self.prefix, self.read = self.read, len(self.ids)
            return new_text[len(prefix_text):]
        return ""

    def flush(self) -> str:
        prefix_text = self._decode(self.ids[self.prefix:self.read])
        new_text = self._decode(self.ids[self.prefix:])
        self.prefix = self.read = len(self.ids)
        return new_text[len(prefix_text):]


def make_codec(tokenizer: Any, vocab_size: int) -> HFCodec | ByteCodec | None:
    """The model's tokenizer, else the byte fallback (None when vocab < 256: token ids only)."""
    if tokenizer is not None:
        return HFCodec(tokenizer)
    if vocab_size >= 256:
        return ByteCodec(vocab_size)
    return None


class StopChecker:
    """Text out of a detokenizer, cut at the first OpenAI stop string. Text that could be
    the start of a stop string is held back until it cannot."""

    def __init__(self, detok: Detokenizer | None, stops: Sequence[str]) -> None:
        self.detok = detok
        self.stops = [s for s in stops if s]
        self.pending = ""          # decoded, not yet emitted
        self.stopped = False
        self.text = ""             # everything emitted

    def add(self, token_ids: Sequence[int]) -> str:
        """Text to emit for these tokens ('' if held back); sets `stopped` on a stop string."""
        if self.detok is None or self.stopped:
            return ""
        self.pending += self.detok.add(token_ids)
        return self._emit(final=False)

    def finish(self) -> str:
        """The rest of the text at the end of generation."""
        if self.detok is None or self.stopped:
            return ""
        self.pending += self.detok.flush()
        return self._emit(final=True)

    def _emit(self, final: bool) -> str:
        if self.stops:
            # the earliest stop string across pending text (search includes the tail kept back)
            hits = [(i, s) for s in self.stops if (i := self.pending.find(s)) >= 0]
            if hits:
                i = min(h[0] for h in hits)
                out, self.pending, self.stopped = self.pending[:i], "", True
                self.text += out
                return out
            if not final:
                keep = 0
                for s in self.stops:
                    for k in range(min(len(s) - 1, len(self.pending)), 0, -1):
                        if self.pending.endswith(s[:k]):
                            keep = max(keep, k)
                            break
                out = self.pending[:len(self.pending) - keep]
                self.pending = self.pending[len(self.pending) - keep:]
                self.text += out
                return out
        out, self.pending = self.pending, ""
        self.text += out
        return out
