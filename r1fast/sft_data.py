"""SFT training data: JSONL records ({"prompt", "completion"} or {"messages"}) read, rendered with a prompt
template, tokenized and cut to max_seq_len, with one-line errors naming the user's ``path:line``."""

from __future__ import annotations

from r1fast.config_io import DataError
from r1fast.data.jsonl import iter_json_objects
from r1fast.rewards.format import continue_open_think, open_think_tail
from r1fast.stage_io import check_chat_template, check_file, data_errors, empty_data_error, encode_prompt, render_prompt

__all__ = ["SFTRecord", "encode_sft_examples", "fit_sft_examples", "read_sft_records", "tokenize_sft_records"]


class SFTRecord(tuple):
    """One training record: the pair ``(prompt spec, completion)`` (unpacks and compares as a plain tuple) plus
    ``where``, the ``path:line`` it was read from, so an encoding error found later still names the user's line."""

    where: str

    def __new__(cls, spec: dict, completion: str, where: str):
        rec = super().__new__(cls, (spec, completion))
        rec.where = where
        return rec


def _messages_error(msgs) -> str | None:
    """Why ``msgs`` is not a usable chat record (None when it is): every message needs string role and content."""
    if not isinstance(msgs, list) or len(msgs) < 2:
        return "'messages' must be a list of >= 2 messages ending with an assistant message with string content"
    for i, m in enumerate(msgs):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
            return f"messages[{i}] must be an object with string 'role' and 'content' (got {m!r:.80})"
    if msgs[-1]["role"] != "assistant":
        return f"the last message is the target and must have role 'assistant' (got {msgs[-1]['role']!r})"
    return None


def read_sft_records(path: str, *, limit: int | None = None) -> list[SFTRecord]:
    """(prompt spec, completion) per line: spec is {"prompt": str} or {"messages": [...]}; each remembers its line.

    Bad data is a ``DataError`` (a ValueError) naming ``path:line``, or naming ``data`` for an empty file.
    """
    check_file(path, "data")
    out = []
    with data_errors():  # the JSONL reader's ValueError (path:line) is the user's data, not a bug
        for line_no, rec in iter_json_objects(path):
            if limit is not None and len(out) >= limit:
                break
            where = f"{path}:{line_no}"
            if "messages" in rec:
                msgs = rec["messages"]
                if (why := _messages_error(msgs)) is not None:
                    raise DataError(f"{where}: {why}")
                out.append(SFTRecord({"messages": msgs[:-1]}, msgs[-1]["content"], where))
            elif isinstance(rec.get("prompt"), str) and isinstance(rec.get("completion"), str):
                out.append(SFTRecord({"prompt": rec["prompt"]}, rec["completion"], where))
            else:
                raise DataError(f"{where}: expected string 'prompt' and 'completion', or 'messages' "
                                f"(got keys {sorted(rec)})")
    if not out:
        raise empty_data_error(path, "data", '{"prompt": ..., "completion": ...} or {"messages": [...]}')
    return out


def _unencodable_field(spec: dict, tokenizer, err: ValueError) -> str:
    """``err`` (the rendered prompt failed to encode) blamed on the user's field, whose position it then names;
    the rendered prompt's position (409 for a 4-character prompt under r1_zero) means nothing to the user."""
    fields = ([("prompt", spec["prompt"])] if "prompt" in spec
              else [(f"messages[{i}].content", m["content"]) for i, m in enumerate(spec["messages"])])
    for name, text in fields:
        try:
            tokenizer.encode(text)
        except ValueError as field_err:
            return f"{name}: {str(field_err).removeprefix('text: ')}"
    return f"the rendered prompt: {str(err).removeprefix('text: ')}"  # the template's own text


def tokenize_sft_records(records, tokenizer, template: str) -> list[tuple[list[int], list[int]]]:
    """(prompt ids, completion ids without EOS) per record, or a one-line error before any training:
    ``ConfigError`` naming ``template`` for 'chat' without a chat template, ``DataError`` naming the record's
    ``path:line`` (``record N`` for records not read from a file) for one that cannot be rendered or encoded."""
    check_chat_template(tokenizer, template, "template")
    out = []
    for n, rec in enumerate(records, 1):
        spec, completion = rec
        where = getattr(rec, "where", f"record {n}")
        try:
            text = render_prompt(tokenizer, template, **spec)
        except ValueError as err:  # e.g. a system message under a named template
            raise DataError(f"{where}: {err}") from None
        try:
            prompt_ids = encode_prompt(tokenizer, text, template)
        except ValueError as err:  # a character the tokenizer cannot encode
            raise DataError(f"{where}: {_unencodable_field(spec, tokenizer, err)}") from None
        if not prompt_ids:  # the first target token would have no position to be predicted from
            raise DataError(f"{where}: the prompt encodes to no tokens (template {template!r}, tokenizer without "
                            "<bos>); give a non-empty prompt or a template that adds text")
        completion = continue_open_think(completion, open_think_tail(text))  # one think block, not two
        try:
            completion_ids = tokenizer.encode(completion)
        except ValueError as err:
            raise DataError(f"{where}: completion: {str(err).removeprefix('text: ')}") from None
        out.append((prompt_ids, completion_ids))
    return out


def fit_sft_examples(tokenized, eos_id: int, max_seq_len: int) -> tuple[list[tuple[list, list]], int]:
    """(prompt ids, completion ids + EOS) of each tokenized record that fits in ``max_seq_len``, and how many did not."""
    examples = [(p, c + [eos_id]) for p, c in tokenized if len(p) + len(c) + 1 <= max_seq_len]
    return examples, len(tokenized) - len(examples)


def encode_sft_examples(records, tokenizer, template: str, max_seq_len: int) -> tuple[list[tuple[list, list]], int]:
    """(prompt ids, completion ids + EOS) per record, and how many were dropped for exceeding max_seq_len.
    Errors as ``tokenize_sft_records``."""
    return fit_sft_examples(tokenize_sft_records(records, tokenizer, template), tokenizer.eos_id, max_seq_len)
