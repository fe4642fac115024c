"""Data: corpora, tokenizers, packed token shards (and, later, the prepare pipeline)."""
