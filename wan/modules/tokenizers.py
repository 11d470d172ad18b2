"""Prompt tokenizer for the umt5-xxl text encoder (a thin wrapper over a local HF tokenizer folder)."""
import html
import logging
import os
import re

import ftfy
from transformers import AutoTokenizer

__all__ = ["HuggingfaceTokenizer", "clean_whitespace"]

logger = logging.getLogger("wan")


def clean_whitespace(text: str) -> str:
    """Wan's clean='whitespace': ftfy, html-unescape twice, strip, collapse whitespace runs to one space."""
    text = ftfy.fix_text(text)
    text = html.unescape(html.unescape(text)).strip()
    return re.sub(r"\s+", " ", text).strip()


class HuggingfaceTokenizer:
    """Callable tokenizer: list of prompts -> ids [B, seq_len] (and mask [B, seq_len]).

    name: a local folder (e.g. <ckpt_dir>/google/umt5-xxl); the hub is never contacted.
    seq_len: pad/truncate every prompt to this many tokens (EOS kept as the last one); None pads to the longest.
    clean: None, 'whitespace' or 'lower' (whitespace + lower-case).
    """

    def __init__(self, name: str, seq_len: int | None = None, clean: str | None = None):
        if clean not in (None, "whitespace", "lower"):
            raise ValueError(f"unknown clean mode {clean!r}; expected None, 'whitespace' or 'lower'")
        if not os.path.isdir(name):
            raise FileNotFoundError(f"tokenizer folder not found: {name} "
                                    "(google/umt5-xxl/ comes with the official Wan2.2-T2V-A14B download)")
        self.name, self.seq_len, self.clean = name, seq_len, clean
        self.tokenizer = AutoTokenizer.from_pretrained(name, local_files_only=True)
        self.vocab_size = len(self.tokenizer)

    def _clean(self, text: str) -> str:
        if self.clean is None:
            return text
        text = clean_whitespace(text)
        return text.lower() if self.clean == "lower" else text

    def count_tokens(self, text: str, add_special_tokens: bool = True) -> int:
        """Untruncated token count of one prompt after cleaning, EOS included when add_special_tokens.

        A result above seq_len means __call__ will truncate the prompt (and log a warning)."""
        return len(self.tokenizer(self._clean(text), add_special_tokens=add_special_tokens)["input_ids"])

    def _warn_if_truncated(self, texts: list[str], add_special_tokens: bool) -> None:
        # The encoder only ever sees seq_len tokens; say so loudly instead of dropping text silently.
        for i, text in enumerate(texts):
            ids = self.tokenizer(text, add_special_tokens=add_special_tokens)["input_ids"]
            if len(ids) <= self.seq_len:
                continue
            n_text = self.seq_len - 1 if add_special_tokens else self.seq_len  # EOS takes the last slot
            dropped = self.tokenizer.decode(ids[n_text:], skip_special_tokens=True)
            dropped = dropped if len(dropped) <= 80 else dropped[:77] + "..."
            logger.warning(
                "prompt %d has %d tokens (EOS included), more than text_len=%d: truncated to its first %d "
                "tokens%s, dropping %r", i, len(ids), self.seq_len, n_text, " + EOS" if add_special_tokens else "",
                dropped)

    def __call__(self, sequence: str | list[str], return_mask: bool = False, add_special_tokens: bool = True):
        texts = [sequence] if isinstance(sequence, str) else list(sequence)
        texts = [self._clean(t) for t in texts]
        if self.seq_len is None:
            kw = dict(padding="longest")
        else:
            self._warn_if_truncated(texts, add_special_tokens)
            kw = dict(padding="max_length", truncation=True, max_length=self.seq_len)
        out = self.tokenizer(texts, return_tensors="pt", add_special_tokens=add_special_tokens, **kw)
        # ids, mask: [B, seq_len] int64; mask is 1 on real tokens (incl. EOS), 0 on padding
        return (out.input_ids, out.attention_mask) if return_mask else out.input_ids
