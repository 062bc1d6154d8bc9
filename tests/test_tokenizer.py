"""Tiny Qwen2-style tokenizer, the Python chat-template renderer and the tokenizer wrappers."""

import re
import time

import numpy as np
import pytest

from m2mega.data.chat_template import (
    DEFAULT_SYSTEM_PROMPT,
    QWEN2VL_CHAT_TEMPLATE,
    render_segments,
    render_text,
    with_system_prompt,
)
from m2mega.data.tokenizer import (
    QWEN_SPECIAL_TOKENS,
    build_tiny_qwen_tokenizer,
    build_tiny_sentencepiece,
    build_tokenizer,
)

CONVERSATIONS = [
    # RL prompt with an image, no system turn
    [{"role": "user", "content": [{"type": "image", "image": "a.png"}, {"type": "text", "text": "How many?"}]}],
    # SFT with system, two images, unicode, assistant content starting with a newline
    [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": [{"type": "text", "text": "Compare "}, {"type": "image", "image": "a.png"},
                                     {"type": "text", "text": " and "}, {"type": "image", "image": "b.png"},
                                     {"type": "text", "text": " — ünïcödé ✓\n\n"}]},
        {"role": "assistant", "content": "\n<think> left is 3.5m </think><answer> \\boxed{3.5} </answer>"},
    ],
    # multi-turn, string contents, trailing spaces
    [
        {"role": "user", "content": "1+1?  "},
        {"role": "assistant", "content": "<think>1+1=2</think><answer>2</answer>"},
        {"role": "user", "content": "and 2+2?"},
        {"role": "assistant", "content": "  <think> 4 </think><answer>4</answer>  "},
    ],
]


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory):
    return build_tiny_qwen_tokenizer(str(tmp_path_factory.mktemp("tok")), vocab_size=700)


@pytest.fixture(scope="module")
def hf(tok_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tok_dir)


def _ids(x):
    return list(x["input_ids"] if hasattr(x, "keys") else x)


def test_build_is_fast_and_sized(tmp_path):
    t = time.perf_counter()
    d = build_tiny_qwen_tokenizer(str(tmp_path / "t"), vocab_size=450)
    assert time.perf_counter() - t < 2.0
    tk = build_tokenizer("HuggingFaceTokenizer", d)
    assert tk.vocab_size == 450
    # Qwen's order: the special tokens follow the BPE vocabulary, contiguous, in Qwen2.5-VL's order.
    ids = [tk.token_to_id(t) for t in QWEN_SPECIAL_TOKENS]
    assert ids == list(range(450 - len(QWEN_SPECIAL_TOKENS), 450))
    with pytest.raises(ValueError, match="vocab_size"):
        build_tiny_qwen_tokenizer(str(tmp_path / "u"), vocab_size=100)


def test_autotokenizer_loads_offline_with_template(hf, tok_dir):
    assert len(hf) == 700
    assert hf.eos_token == "<|im_end|>" and hf.pad_token == "<|endoftext|>"
    assert hf.chat_template == QWEN2VL_CHAT_TEMPLATE
    # specials are atomic; think/answer tags are plain text (as in the real Qwen2.5-VL vocabulary)
    assert hf.convert_tokens_to_ids("<|image_pad|>") != hf.unk_token_id
    enc = hf("<|vision_start|><|image_pad|><|vision_end|>", add_special_tokens=False)["input_ids"]
    assert len(enc) == 3
    text = "<think> x = 4 </think><answer> ünïcödé \\boxed{4} </answer>"
    assert hf.decode(hf(text, add_special_tokens=False)["input_ids"]) == text


@pytest.mark.parametrize("k", range(len(CONVERSATIONS)))
@pytest.mark.parametrize("system", [None, DEFAULT_SYSTEM_PROMPT])
def test_render_matches_jinja_and_ids_match_hf(hf, tok_dir, k, system):
    msgs = with_system_prompt(CONVERSATIONS[k], system)
    gen = msgs[-1]["role"] == "user"
    ref_text = hf.apply_chat_template(msgs, tokenize=False, add_generation_prompt=gen)
    assert render_text(msgs, add_generation_prompt=gen) == ref_text
    tk = build_tokenizer("HuggingFaceTokenizer", tok_dir)
    ids, mask = tk.encode_segments(render_segments(msgs, add_generation_prompt=gen))
    assert ids.dtype == np.int32
    assert ids.tolist() == _ids(hf.apply_chat_template(msgs, tokenize=True, add_generation_prompt=gen))
    # The loss covers exactly the assistant turns: per turn, the content and its <|im_end|>. Leading
    # whitespace that ends in a newline may merge with the header's "\n" into one pre-token; its tokens
    # count as loss only from the first one that starts inside the content.
    from m2mega.data.preprocess import loss_spans_from_mask

    turns = [m["content"] + "<|im_end|>" for m in msgs if m["role"] == "assistant"]
    spans = loss_spans_from_mask(mask)
    assert len(spans) == len(turns)
    for (a, b), full in zip(spans, turns):
        got = tk.decode(ids[a:b])
        assert full.endswith(got) and got.endswith(re.sub(r"^\s*[\r\n]+", "", full)), (got, full)
    if gen:
        assert not mask.any()
        assert tk.decode(ids).endswith("<|im_start|>assistant\n")


def test_special_ids(tok_dir):
    tk = build_tokenizer("HuggingFaceTokenizer", tok_dir)
    sp = tk.special_token_ids()
    assert sp["image_token_id"] == tk.token_to_id("<|image_pad|>")
    assert sp["vision_start_token_id"] == tk.token_to_id("<|vision_start|>")
    assert sp["eos_id"] == tk.token_to_id("<|im_end|>") and sp["pad_id"] == tk.token_to_id("<|endoftext|>")
    assert len(set(sp.values()) - {sp["vocab_size"]}) == 7  # eos == im_end
    with pytest.raises(KeyError, match="no token"):
        tk.token_to_id("<|not_a_token|>")


def test_sentencepiece_wrapper(tmp_path):
    path = build_tiny_sentencepiece(str(tmp_path / "sp"), vocab_size=400)
    tk = build_tokenizer("SentencePieceTokenizer", path)
    for t in QWEN_SPECIAL_TOKENS:
        assert tk.token_to_id(t) >= 0
    msgs = with_system_prompt(CONVERSATIONS[1], DEFAULT_SYSTEM_PROMPT)
    segs = render_segments(msgs)
    ids, mask = tk.encode_segments(segs)
    # per-segment encoding: concatenation of each segment's ids, mask = that segment's flag
    want_ids, want_mask = [], []
    for s in segs:
        part = tk.encode(s.text)
        want_ids += part
        want_mask += [s.loss] * len(part)
    assert ids.tolist() == want_ids and mask.tolist() == want_mask
    assert (ids == tk.image_token_id).sum() == 2
    assert "<answer>" in tk.decode(ids[mask])


def test_build_tokenizer_errors(tmp_path):
    with pytest.raises(ValueError, match="unknown --tokenizer-type"):
        build_tokenizer("GPT2BPETokenizer", str(tmp_path))
    with pytest.raises(FileNotFoundError, match="not a tokenizer directory"):
        build_tokenizer("HuggingFaceTokenizer", str(tmp_path / "missing"))
    with pytest.raises(FileNotFoundError, match="not found"):
        build_tokenizer("SentencePieceTokenizer", str(tmp_path / "missing.model"))
