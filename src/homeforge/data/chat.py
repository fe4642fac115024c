"""Chat records: convert alpaca / sharegpt shapes to OpenAI ``messages``; tokenize with loss masks.

``tokenize_chat`` renders the conversation with the tokenizer's own chat template (ChatML
for homeforge tokenizers, the model's template for ``tokenizer.from_dir``) and sets
``loss_mask`` to 1 exactly on the tokens of assistant contents and on the end-of-turn
token that closes each assistant message.
"""

from __future__ import annotations

ROLES = {"system", "user", "assistant", "tool"}
_SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
                   "chatgpt": "assistant", "bing": "assistant", "bard": "assistant", "model": "assistant",
                   "system": "system", "tool": "tool", "function": "tool"}


def to_messages(row: dict, messages_field: str = "messages") -> tuple[list[dict] | None, str | None]:
    """(messages, None) or (None, problem) for an OpenAI, sharegpt or alpaca shaped record."""
    if messages_field in row:
        msgs = row[messages_field]
        if not isinstance(msgs, list):
            return None, f"{messages_field!r} is not a list"
        out = []
        for m in msgs:
            if not isinstance(m, dict) or "role" not in m or "content" not in m:
                return None, "a message lacks 'role' or 'content'"
            if m["role"] not in ROLES:
                return None, f"unknown role {m['role']!r}"
            if not isinstance(m["content"], str):
                return None, "a message content is not a string"
            out.append({"role": m["role"], "content": m["content"]})
    elif "conversations" in row:
        conv = row["conversations"]
        if not isinstance(conv, list):
            return None, "'conversations' is not a list"
        out = []
        for m in conv:
            if not isinstance(m, dict) or "from" not in m or "value" not in m:
                return None, "a sharegpt turn lacks 'from' or 'value'"
            role = _SHAREGPT_ROLES.get(str(m["from"]).lower())
            if role is None:
                return None, f"unknown sharegpt speaker {m['from']!r}"
            out.append({"role": role, "content": str(m["value"])})
        if row.get("system"):
            out.insert(0, {"role": "system", "content": str(row["system"])})
    elif "instruction" in row and "output" in row:
        prompt = str(row["instruction"])
        if row.get("input"):
            prompt += "\n\n" + str(row["input"])
        out = [{"role": "user", "content": prompt}, {"role": "assistant", "content": str(row["output"])}]
        if row.get("system"):
            out.insert(0, {"role": "system", "content": str(row["system"])})
    else:
        return None, f"no {messages_field!r}, 'conversations' or 'instruction'/'output' fields"
    if not any(m["role"] == "assistant" for m in out):
        return None, "no assistant message"
    return out, None


def tokenize_chat(tok, messages: list[dict], max_length: int | None = None) -> tuple[list[int], list[int]]:
    """Token ids and loss mask (1 on assistant contents + their closing end-of-turn token)."""
    text = tok.apply_chat_template(messages, tokenize=False)
    spans = []  # (start, end) char spans of assistant contents in the rendered text
    prev = ""
    for i, m in enumerate(messages):
        cur = tok.apply_chat_template(messages[: i + 1], tokenize=False)
        if m["role"] == "assistant" and m["content"]:
            seg_start = len(prev) if cur.startswith(prev) else 0
            at = cur.find(m["content"], seg_start)
            if at < 0:
                raise ValueError("the chat template does not render assistant contents verbatim")
            spans.append((at, at + len(m["content"])))
        prev = cur
    enc = tok(text, add_special_tokens=False, return_offsets_mapping=True)
    ids, offsets = enc["input_ids"], enc["offset_mapping"]
    special = set(tok.all_special_ids)
    mask = [0] * len(ids)
    j = 0
    for s, e in spans:
        while j < len(ids) and offsets[j][1] <= s:
            j += 1
        while j < len(ids) and offsets[j][0] < e:
            mask[j] = 1
            j += 1
        # the end-of-turn token closing this message (skip whitespace-only tokens before it)
        k = j
        while k < len(ids) and ids[k] not in special and not text[offsets[k][0]:offsets[k][1]].strip():
            k += 1
        if k < len(ids) and ids[k] in special:
            mask[k] = 1
            j = k + 1
    if max_length is not None and len(ids) > max_length:
        ids, mask = ids[:max_length], mask[:max_length]
    return ids, mask
