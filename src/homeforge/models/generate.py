"""Text generation from a local causal LM (greedy or sampled)."""

from __future__ import annotations

import torch


@torch.no_grad()
def generate_text(model, tokenizer, prompt: str, max_new_tokens: int = 50, temperature: float = 0.0,
                  top_p: float = 1.0, top_k: int = 0, seed: int | None = None, chat: bool = False) -> str:
    """Continue ``prompt``; temperature 0 is greedy. With ``chat`` the chat template is applied."""
    if chat:
        text = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                             add_generation_prompt=True)
    else:
        text = prompt
    enc = tokenizer(text, return_tensors="pt", add_special_tokens=False)
    device = next(model.parameters()).device
    input_ids = enc["input_ids"].to(device)
    if input_ids.shape[1] == 0:
        input_ids = torch.tensor([[tokenizer.bos_token_id or tokenizer.eos_token_id]], device=device)
    from homeforge.runtime import seeded

    kwargs = dict(max_new_tokens=max_new_tokens, pad_token_id=tokenizer.pad_token_id or tokenizer.eos_token_id,
                  eos_token_id=tokenizer.eos_token_id)
    if temperature > 0:
        kwargs.update(do_sample=True, temperature=temperature, top_p=top_p, top_k=top_k or None)
    else:
        kwargs.update(do_sample=False, temperature=None, top_p=None, top_k=None)
    with seeded(seed):
        out = model.generate(input_ids=input_ids, attention_mask=torch.ones_like(input_ids), **kwargs)
    return tokenizer.decode(out[0, input_ids.shape[1]:], skip_special_tokens=True)
