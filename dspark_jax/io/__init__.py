"""Model file and tokenizer I/O."""
