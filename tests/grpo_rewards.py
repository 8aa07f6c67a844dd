"""Reward functions the GRPO tests name by dotted path (`tests.grpo_rewards:...`), as a user's own would be."""

from __future__ import annotations

import math

# A fixed eighth of the tiny tokenizer's 512 ids: a random model writes about 1 in 8 of its tokens from it, so a
# group's completions differ in reward from the first step, and a model that learns writes mostly these.
TARGET_IDS = range(64, 128)


def target_share(prompts, completions, completion_ids, **columns):
    """The share of a completion's tokens that lie in TARGET_IDS: learnable, and dense from step 1."""
    return [sum(i in TARGET_IDS for i in ids) / max(len(ids), 1) for ids in completion_ids]


def raises(prompts, completions, completion_ids, **columns):
    raise KeyError("answer")


def wrong_length(prompts, completions, completion_ids, **columns):
    return [1.0] * (len(completions) + 1)


def nan_reward(prompts, completions, completion_ids, **columns):
    return [math.nan] * len(completions)


def columns_seen(prompts, completions, completion_ids, **columns):
    """Records what it was handed (tests read SEEN), scoring 0."""
    SEEN.append({"prompts": prompts, "completions": completions, **columns})
    return [0.0] * len(completions)


SEEN: list[dict] = []


def strict(
    prompts, completions, completion_ids, prompt_ids, reference, tools, id, trainer_state, log_extra, log_metric
):
    """No **kwargs: it takes exactly the columns trl passes for tests/data/grpo_prompts.jsonl."""
    return [0.0] * len(completions)
