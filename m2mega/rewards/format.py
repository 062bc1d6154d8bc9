"""Format reward: the response is exactly one think block followed by exactly one answer block.

Accepted shape (surrounding whitespace allowed, nothing else)::

    <think> non-empty reasoning </think> <answer> non-empty answer </answer>

Neither block may contain another ``<think>``, ``</think>``, ``<answer>`` or ``</answer>`` tag, so nested,
repeated, unclosed or out-of-order tags all score 0, as does any text before ``<think>`` or after
``</answer>``. When the chat template already put ``<think>`` at the end of the prompt, pass
``think_prefilled=True`` and the response is checked as if it started with ``<think>``.
"""

from __future__ import annotations

__all__ = ["format_reward", "is_well_formed"]

_TAGS = ("<think>", "</think>", "<answer>", "</answer>")


def is_well_formed(response: str | None, think_prefilled: bool = False) -> bool:
    """True when ``response`` has the shape described in the module docstring. Never raises."""
    if not isinstance(response, str):
        return False
    s = ("<think>" + response) if think_prefilled else response
    s = s.strip()
    # Each tag exactly once: this alone rules out nesting and repetition.
    if any(s.count(t) != 1 for t in _TAGS):
        return False
    if not (s.startswith("<think>") and s.endswith("</answer>")):
        return False
    t_close = s.index("</think>")
    a_open = s.index("<answer>")
    if a_open < t_close or s[t_close + len("</think>") : a_open].strip():
        return False
    think = s[len("<think>") : t_close]
    answer = s[a_open + len("<answer>") : -len("</answer>")]
    return bool(think.strip()) and bool(answer.strip())


def format_reward(response: str | None, think_prefilled: bool = False) -> float:
    """1.0 for a well-formed response (see :func:`is_well_formed`), else 0.0."""
    return 1.0 if is_well_formed(response, think_prefilled) else 0.0
