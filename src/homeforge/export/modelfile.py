"""An Ollama ``Modelfile`` beside a GGUF: ``ollama create NAME -f Modelfile``.

Ollama's prompt templates are Go templates, not Jinja. A ChatML chat template (ours,
Qwen2, SmolLM2) is written as its Go equivalent; for any other template the TEMPLATE
line is left out and Ollama falls back to the ``tokenizer.chat_template`` in the GGUF.
"""

from __future__ import annotations

from pathlib import Path

CHATML_GO = (
    '{{- if .System }}<|im_start|>system\n{{ .System }}<|im_end|>\n{{ end }}'
    '{{- range .Messages }}<|im_start|>{{ .Role }}\n{{ .Content }}<|im_end|>\n{{ end }}'
    '<|im_start|>assistant\n'
)


def modelfile_text(gguf_name: str, tokenizer) -> str:
    from homeforge.export.common import chat_template

    tmpl = chat_template(tokenizer) or ""
    lines = ["# Ollama: ollama create MODEL_NAME -f Modelfile   (written by homeforge)", f"FROM ./{gguf_name}"]
    stops = []
    if "<|im_start|>" in tmpl and "<|im_end|>" in tmpl:
        lines.append(f'TEMPLATE """{CHATML_GO}"""')
        stops.append("<|im_end|>")
    elif tmpl:
        lines.append("# the chat template is in the GGUF (tokenizer.chat_template); Ollama reads it from there")
    eos = getattr(tokenizer, "eos_token", None)
    if eos and eos not in stops:
        stops.append(eos)
    lines += [f'PARAMETER stop "{s}"' for s in stops]
    return "\n".join(lines) + "\n"


def write_modelfile(path: Path, gguf_name: str, tokenizer) -> None:
    path.write_text(modelfile_text(gguf_name, tokenizer), encoding="utf-8")
