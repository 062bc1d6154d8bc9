"""Verifiable rewards for GRPO: answer extraction, matching, EDNM, format and repetition.

Entry points: :func:`compute_reward` / :func:`compute_rewards` with a :class:`RewardConfig` (per-task
mixing, see :mod:`m2mega.rewards.registry`). The building blocks are public too, for evaluation and the
data tools: :func:`extract_answer`, :func:`parse_choice`, :func:`parse_number`, :func:`numeric_match`,
:func:`math_equal`, :func:`ednm_reward`, :func:`format_reward`, :func:`repetition_stats`.
:class:`RewardFailureMeter` gives per-step counts of failed custom rewards and grader timeouts (training logs).
"""

from .ednm import ednm_reward, ednm_reward_tensor, relative_error
from .extract import extract_all_boxed, extract_answer, extract_boxed, extract_tag_block
from .failures import RewardFailureMeter, reward_failure_totals
from .format import format_reward, is_well_formed
from .match import (
    ParsedNumber,
    choice_match,
    normalize_text,
    numeric_match,
    parse_choice,
    parse_number,
    text_match,
)
from .math_equiv import math_equal, math_value
from .registry import (
    ANSWER_TYPES,
    RewardConfig,
    RewardResult,
    TaskRewardConfig,
    compute_reward,
    compute_rewards,
)
from .repetition import (
    RepetitionStats,
    longest_loop,
    ngram_repetition_rate,
    repetition_penalty,
    repetition_stats,
    tokenize_words,
)

__all__ = [
    "ANSWER_TYPES",
    "ParsedNumber",
    "RepetitionStats",
    "RewardConfig",
    "RewardFailureMeter",
    "RewardResult",
    "TaskRewardConfig",
    "choice_match",
    "compute_reward",
    "compute_rewards",
    "ednm_reward",
    "ednm_reward_tensor",
    "extract_all_boxed",
    "extract_answer",
    "extract_boxed",
    "extract_tag_block",
    "format_reward",
    "is_well_formed",
    "longest_loop",
    "math_equal",
    "ngram_repetition_rate",
    "normalize_text",
    "numeric_match",
    "parse_choice",
    "math_value",
    "parse_number",
    "relative_error",
    "repetition_penalty",
    "repetition_stats",
    "reward_failure_totals",
    "text_match",
    "tokenize_words",
]
