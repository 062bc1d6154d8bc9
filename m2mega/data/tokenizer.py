"""Tokenizers for m2mega: a tiny offline Qwen2-style BPE builder, and one wrapper for real tokenizers.

(a) :func:`build_tiny_qwen_tokenizer` trains a byte-level BPE in-process with the ``tokenizers`` library
    (Qwen2's pre-tokenizer regex, NFC normaliser, byte-level decoder: the same pipeline as HF's
    ``Qwen2Tokenizer``), appends Qwen2.5-VL's special tokens in Qwen's order, and saves an HF tokenizer
    directory (``tokenizer.json`` + ``tokenizer_config.json`` with the Qwen2-VL chat template) that
    ``transformers.AutoTokenizer.from_pretrained(dir)`` loads offline. Tests and the CPU demo use it.

    ``<think>``/``</think>``/``<answer>``/``</answer>`` are plain text, as in the real Qwen2.5-VL
    vocabulary (where they are not added tokens), so a checkpoint converted from HF tokenises our data
    identically. The default training corpus contains them, so BPE merges them into a few tokens.

(b) :func:`build_tokenizer` wraps a real tokenizer (``HuggingFaceTokenizer``: any Qwen2.5-VL tokenizer
    directory; ``SentencePieceTokenizer``: a ``.model`` file) loaded through megatron-core's tokenizer
    library classes, and exposes the ids the model and loader need (``image_token_id``,
    ``vision_start_token_id``, ``eos_id``, ``pad_id``, ...) plus :meth:`M2Tokenizer.encode_segments`, which
    tokenises a rendered chat (see :mod:`m2mega.data.chat_template`) and returns the loss mask with it.
"""

from __future__ import annotations

import json
import os
from abc import ABC, abstractmethod
from typing import Iterable, Sequence

import numpy as np

from .chat_template import QWEN2VL_CHAT_TEMPLATE, Segment

__all__ = [
    "QWEN_SPECIAL_TOKENS",
    "QWEN_PRETOKENIZE_REGEX",
    "TOKENIZER_TYPES",
    "M2Tokenizer",
    "HFTokenizer",
    "SPTokenizer",
    "build_tokenizer",
    "build_tiny_qwen_tokenizer",
    "build_tiny_sentencepiece",
    "default_tokenizer_corpus",
]

#: Qwen2.5-VL's special (added, ``special=True``) tokens, in vocabulary order (151643.. in the real model).
QWEN_SPECIAL_TOKENS = (
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|object_ref_start|>",
    "<|object_ref_end|>",
    "<|box_start|>",
    "<|box_end|>",
    "<|quad_start|>",
    "<|quad_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|vision_pad|>",
    "<|image_pad|>",
    "<|video_pad|>",
)

QWEN_PRETOKENIZE_REGEX = (
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"""
)

TOKENIZER_TYPES = ("HuggingFaceTokenizer", "SentencePieceTokenizer")


class M2Tokenizer(ABC):
    """What preprocessing, the loader and the trainers need from a tokenizer.

    Attributes are token ids: ``image_token_id`` (``<|image_pad|>``), ``video_token_id``,
    ``vision_start_token_id``, ``vision_end_token_id``, ``im_start_id``, ``im_end_id``, ``eos_id``
    (``<|im_end|>``: ends an assistant turn, stops generation), ``pad_id`` (``<|endoftext|>``), and
    ``vocab_size`` (number of ids, special tokens included).
    """

    vocab_size: int
    name: str

    def _init_special_ids(self) -> None:
        get = self.token_to_id
        self.endoftext_id = get("<|endoftext|>")
        self.im_start_id = get("<|im_start|>")
        self.im_end_id = get("<|im_end|>")
        self.vision_start_token_id = get("<|vision_start|>")
        self.vision_end_token_id = get("<|vision_end|>")
        self.image_token_id = get("<|image_pad|>")
        self.video_token_id = get("<|video_pad|>")
        self.eos_id = self.im_end_id
        self.pad_id = self.endoftext_id

    @abstractmethod
    def token_to_id(self, token: str) -> int:
        """Id of a special/added token; raises ``KeyError`` naming the token when it is missing."""

    @abstractmethod
    def encode(self, text: str) -> list[int]:
        """Token ids of ``text`` (special-token strings in it map to their ids; nothing is prepended)."""

    @abstractmethod
    def decode(self, ids: Iterable[int], skip_special_tokens: bool = False) -> str:
        """Text of ``ids``."""

    @abstractmethod
    def encode_segments(self, segments: Sequence[Segment]) -> tuple[np.ndarray, np.ndarray]:
        """Token ids (int32) of the concatenated segments and a bool mask of tokens from ``loss`` segments."""

    def special_token_ids(self) -> dict[str, int]:
        """The ids the model and loader need, by name (written into the dataset sidecar)."""
        return {
            "image_token_id": self.image_token_id,
            "video_token_id": self.video_token_id,
            "vision_start_token_id": self.vision_start_token_id,
            "vision_end_token_id": self.vision_end_token_id,
            "im_start_id": self.im_start_id,
            "im_end_id": self.im_end_id,
            "eos_id": self.eos_id,
            "pad_id": self.pad_id,
            "vocab_size": self.vocab_size,
        }


class HFTokenizer(M2Tokenizer):
    """A Hugging Face tokenizer directory, loaded with megatron-core's ``HuggingFaceTokenizer`` (AutoTokenizer).

    Encoding goes through the Rust backend on the whole rendered conversation, so ids are exactly what
    ``apply_chat_template(tokenize=True)`` gives; character offsets then assign each token to the loss mask.
    """

    def __init__(self, path: str) -> None:
        from megatron.core.tokenizers.text.libraries.huggingface_tokenizer import HuggingFaceTokenizer

        if not os.path.isdir(path):
            raise FileNotFoundError(f"HuggingFaceTokenizer: '{path}' is not a tokenizer directory")
        self.name = path
        self.hf = HuggingFaceTokenizer(path, use_fast=True).tokenizer
        backend = getattr(self.hf, "backend_tokenizer", None)
        if backend is None:
            raise ValueError(f"HuggingFaceTokenizer: '{path}' has no fast (tokenizers) backend; need tokenizer.json")
        self.backend = backend
        self.vocab_size = len(self.hf)
        self._init_special_ids()

    def token_to_id(self, token: str) -> int:
        tid = self.backend.token_to_id(token)
        if tid is None:
            raise KeyError(f"tokenizer '{self.name}' has no token {token!r} (not a Qwen2.5-VL tokenizer?)")
        return tid

    def encode(self, text: str) -> list[int]:
        return self.backend.encode(text, add_special_tokens=False).ids

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = False) -> str:
        return self.backend.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)

    def encode_segments(self, segments: Sequence[Segment]) -> tuple[np.ndarray, np.ndarray]:
        text = "".join(s.text for s in segments)
        enc = self.backend.encode(text, add_special_tokens=False)
        ids = np.asarray(enc.ids, dtype=np.int32)
        # Loss char ranges; a token belongs to the loss when its first character does. (A pre-token that
        # straddles "assistant\n" + content, e.g. "\n\n" when the content starts with a newline, counts as
        # context: the first character is the header's.)
        bounds, pos = [], 0
        for s in segments:
            if s.loss and s.text:
                bounds.append((pos, pos + len(s.text)))
            pos += len(s.text)
        mask = np.zeros(len(ids), dtype=bool)
        if bounds:
            starts = np.asarray([o[0] for o in enc.offsets], dtype=np.int64)
            for lo, hi in bounds:
                mask |= (starts >= lo) & (starts < hi)
        return ids, mask


class SPTokenizer(M2Tokenizer):
    """A SentencePiece model, loaded with megatron-core's ``SentencePieceTokenizer`` (legacy mode, which
    splits on special-token strings and appends any missing Qwen special tokens after the SP vocabulary).

    SentencePiece tokenises each segment on its own (it has no character offsets that survive its
    whitespace handling), so a loss boundary is always a token boundary.
    """

    def __init__(self, path: str) -> None:
        from megatron.core.tokenizers.text.libraries.sentencepiece_tokenizer import SentencePieceTokenizer

        if not os.path.isfile(path):
            raise FileNotFoundError(f"SentencePieceTokenizer: model file '{path}' not found")
        self.name = path
        self.sp = SentencePieceTokenizer(path, special_tokens=list(QWEN_SPECIAL_TOKENS), legacy=True)
        self.vocab_size = self.sp.vocab_size
        self._init_special_ids()

    def token_to_id(self, token: str) -> int:
        if token in self.sp.special_token_to_id:
            return self.sp.special_token_to_id[token]
        tid = self.sp.tokenizer.piece_to_id(token)
        if tid == self.sp.tokenizer.unk_id():
            raise KeyError(f"SentencePiece model '{self.name}' has no token {token!r}")
        return tid

    def encode(self, text: str) -> list[int]:
        return self.sp.text_to_ids(text)

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = False) -> str:
        ids = [int(i) for i in ids]
        if skip_special_tokens:
            ids = [i for i in ids if i not in self.sp.id_to_special_token]
        return self.sp.ids_to_text(ids)

    def encode_segments(self, segments: Sequence[Segment]) -> tuple[np.ndarray, np.ndarray]:
        ids: list[int] = []
        mask: list[bool] = []
        for s in segments:
            if not s.text:
                continue
            part = self.sp.text_to_ids(s.text)
            ids.extend(part)
            mask.extend([s.loss] * len(part))
        return np.asarray(ids, dtype=np.int32), np.asarray(mask, dtype=bool)


def build_tokenizer(tokenizer_type: str, tokenizer_model: str) -> M2Tokenizer:
    """Megatron-style factory: ``tokenizer_type`` in :data:`TOKENIZER_TYPES`, ``tokenizer_model`` a path."""
    if tokenizer_type == "HuggingFaceTokenizer":
        return HFTokenizer(tokenizer_model)
    if tokenizer_type == "SentencePieceTokenizer":
        return SPTokenizer(tokenizer_model)
    raise ValueError(f"unknown --tokenizer-type {tokenizer_type!r}; choose from {', '.join(TOKENIZER_TYPES)}")


def default_tokenizer_corpus() -> list[str]:
    """A small built-in corpus: English, digits, math and the reasoning-format tags, so a tiny BPE trained
    on it tokenises the demo data and the system prompt compactly."""
    from .chat_template import DEFAULT_SYSTEM_PROMPT

    base = [
        DEFAULT_SYSTEM_PROMPT,
        "<think> Let me think step by step. First, count the objects in the image. </think>"
        "<answer> \\boxed{12} </answer>",
        "<think> The triangle has sides 3, 4 and 5, so the area is 3 * 4 / 2 = 6. </think><answer> 6 </answer>",
        "<think> Compare the distances: the chair is closer to the camera than the table. </think>"
        "<answer> A </answer>",
        "Question: How many red squares are there? Options: (A) 1 (B) 2 (C) 3 (D) 4. Answer with the letter.",
        "What is the distance in meters between the sofa and the lamp? Estimate the room size in square meters.",
        "The quick brown fox jumps over the lazy dog. Numbers: 0 1 2 3 4 5 6 7 8 9 10 100 3.14 -2 1/2 x^2 + y^2.",
        "Which object is on the left? Which is larger, the blue circle or the green triangle? Explain why.",
        "Solve for x: 2x + 3 = 11, so x = 4. Check: 2 * 4 + 3 = 11. Verified.",
        "user assistant system image picture video describe the scene answer question reasoning",
        "In the kitchen there is a refrigerator next to the window, a wooden table with four chairs, a sink "
        "below the cabinet, and a microwave oven above the stove. The bedroom contains a bed, a desk, a "
        "bookshelf, a television, a mirror and a plant near the door.",
        "Geometry: a circle of radius r has circumference 2 pi r and area pi r squared. A rectangle with "
        "width w and height h has perimeter 2(w + h). Parallel lines never intersect; perpendicular lines "
        "meet at a right angle of ninety degrees. The hypotenuse is the longest side.",
        "Statistics: the mean of 2, 4, 6 and 8 is 5, the median is 5, and the range is 6. Probability "
        "values lie between zero and one. A fair coin lands heads with probability one half.",
        "Spatial relations: above, below, behind, in front of, between, inside, outside, left, right, "
        "nearest, farthest, tallest, shortest, largest, smallest, clockwise, counterclockwise, relative "
        "direction, absolute distance, object count, room size, route plan, appearance order.",
        "Functions and graphs: the slope of the line through (1, 2) and (3, 8) is 3; the parabola y = x^2 "
        "- 4x + 3 crosses the axis at x = 1 and x = 3; the maximum value occurs at the vertex.",
        "Therefore, hence, because, however, although, suppose, assume, verify, recheck, compute, "
        "subtract, multiply, divide, add, equals, greater than, less than, approximately, exactly.",
        "Colors and shapes: red, orange, yellow, green, blue, purple, black, white, gray, brown; cube, "
        "sphere, cylinder, cone, pyramid, hexagon, pentagon, octagon, square, triangle, circle.",
    ]
    return base * 8


def build_tiny_qwen_tokenizer(
    out_dir: str, vocab_size: int = 512, texts: Iterable[str] | None = None, model_max_length: int = 32768
) -> str:
    """Train a Qwen2-style byte-level BPE on ``texts`` (default: :func:`default_tokenizer_corpus`) and save
    it as an HF tokenizer directory at ``out_dir``; returns ``out_dir``.

    ``vocab_size`` is the total number of ids including the 14 special tokens (the BPE part may come out
    smaller when the corpus has too few distinct pairs). Deterministic for a given corpus; < 0.1 s.
    """
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers
    from tokenizers import processors, trainers

    n_special = len(QWEN_SPECIAL_TOKENS)
    if vocab_size < 256 + n_special:
        raise ValueError(f"vocab_size must be >= {256 + n_special} (256 bytes + {n_special} specials), got {vocab_size}")
    tok = Tokenizer(models.BPE())
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(QWEN_PRETOKENIZE_REGEX), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False),
        ]
    )
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size - n_special,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(list(texts) if texts is not None else default_tokenizer_corpus(), trainer=trainer)
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in QWEN_SPECIAL_TOKENS])

    os.makedirs(out_dir, exist_ok=True)
    tok.save(os.path.join(out_dir, "tokenizer.json"))
    added = {
        str(tok.token_to_id(t)): {
            "content": t, "lstrip": False, "normalized": False, "rstrip": False, "single_word": False,
            "special": True,
        }
        for t in QWEN_SPECIAL_TOKENS
    }
    config = {
        "tokenizer_class": "Qwen2Tokenizer",
        "add_prefix_space": False,
        "added_tokens_decoder": added,
        "additional_special_tokens": [t for t in QWEN_SPECIAL_TOKENS if t not in ("<|endoftext|>", "<|im_end|>")],
        "bos_token": None,
        "eos_token": "<|im_end|>",
        "pad_token": "<|endoftext|>",
        "unk_token": None,
        "errors": "replace",
        "split_special_tokens": False,
        "clean_up_tokenization_spaces": False,
        "model_max_length": model_max_length,
        "chat_template": QWEN2VL_CHAT_TEMPLATE,
    }
    with open(os.path.join(out_dir, "tokenizer_config.json"), "w", encoding="utf-8") as f:
        json.dump(config, f, indent=2, ensure_ascii=False)
    return out_dir


def build_tiny_sentencepiece(out_prefix: str, vocab_size: int = 400, texts: Iterable[str] | None = None) -> str:
    """Train a tiny SentencePiece BPE model (Qwen special tokens as user-defined symbols) at
    ``out_prefix.model``; returns that path. For tests of the ``SentencePieceTokenizer`` path."""
    import io

    import sentencepiece as spm

    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(list(texts) if texts is not None else default_tokenizer_corpus()),
        model_writer=buf,
        vocab_size=vocab_size,
        model_type="bpe",
        user_defined_symbols=list(QWEN_SPECIAL_TOKENS),
        byte_fallback=True,
        hard_vocab_limit=False,
        minloglevel=2,
    )
    path = out_prefix + ".model"
    with open(path, "wb") as f:
        f.write(buf.getvalue())
    return path
