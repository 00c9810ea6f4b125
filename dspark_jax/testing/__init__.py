"""Test fixtures the suite (and anyone testing code built on dspark-jax) shares: tiny random target configs and
targets with a character tokenizer (`tiny_configs`, `tiny_target`), an oracle drafter that proposes the target's
own greedy continuation (`oracle_drafter`), and a throwaway redis-server (`redis_server`, needs pytest)."""
