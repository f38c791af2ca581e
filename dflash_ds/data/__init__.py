"""Training data: JSONL conversations -> token ids + loss mask.

Pipeline::

    JSONL files --read_conversations--> [[{"role", "content"}, ...], ...]
                --tokenize_conversation--> {"input_ids": [S], "loss_mask": [S]}
                --build_dataset--> datasets.Dataset (cached, multiprocess)
                --collate_batch--> {"input_ids", "loss_mask", "attention_mask"}: [b, S] long tensors

The loss mask is 1 on assistant content tokens and on the assistant turn's end-of-turn token (e.g.
``<|im_end|>``), 0 on system/user turns, role headers and template-injected text such as Qwen3's empty
``<think>\\n\\n</think>\\n\\n`` block. The drafter's anchors are drawn from this mask, so a wrong
mask silently trains the drafter on prompts instead of responses: it is tested against decoded text.

A regenerated record (:mod:`dflash_ds.regenerate`) carries the target's own ids of its last answer
(``"answer_ids"``): they replace that answer's re-tokenised text, which may merge differently from what the target
wrote. An example in which the MASK id occurs (say a message quoting ``<|mask|>``) is reported with its file and
line: the drafter would read MASK in the clean stream.

Modules, in pipeline order: :mod:`.records` (reading and validating JSONL lines), :mod:`.chat` (chat-template
rendering, loss masks), :mod:`.dataset` (:class:`DataConfig`, the cached ``datasets`` build), :mod:`.batching`
(sequence lengths, collate).
"""

from .batching import collate_batch, sequence_lengths
from .chat import (
    check_template_roundtrip, render_chat, stored_ids_fit, tokenize_conversation, tokenize_with_stored_answer,
)
from .dataset import TRUNCATED_POLICIES, DataConfig, build_dataset, dataset_key, mask_position
from .records import (
    BAD_LINE_POLICIES, ROLES, TEXT_ROLE, BadLineError, Conversation, Message, Record, answer_ids_of, conversation_of,
    parse_json_object, read_conversations, read_records,
)

__all__ = [
    "dataset_key",
    "BAD_LINE_POLICIES",
    "BadLineError",
    "Conversation",
    "DataConfig",
    "Message",
    "ROLES",
    "Record",
    "TEXT_ROLE",
    "TRUNCATED_POLICIES",
    "answer_ids_of",
    "build_dataset",
    "check_template_roundtrip",
    "collate_batch",
    "conversation_of",
    "mask_position",
    "parse_json_object",
    "read_conversations",
    "read_records",
    "render_chat",
    "sequence_lengths",
    "stored_ids_fit",
    "tokenize_conversation",
    "tokenize_with_stored_answer",
]
