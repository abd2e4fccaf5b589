"""Prompts and continuations as token ids: one rule for special tokens, used by every forward pass."""

from __future__ import annotations


def encode(tokenizer, text: str) -> list[int]:
    """Token ids of a prompt, with the tokenizer's own special tokens (a BOS where the model expects one)."""
    return tokenizer(text, add_special_tokens=True)["input_ids"]


def encode_continuation(tokenizer, text: str) -> list[int]:
    """Token ids of a continuation (a target), never with special tokens."""
    return tokenizer(text, add_special_tokens=False)["input_ids"]
