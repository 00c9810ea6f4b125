"""Comma-separated flag values of the serving commands (`cli.common.positive_ints`, `kv_buckets_flag`)."""
from __future__ import annotations

import pytest

from dspark_jax.cli.common import kv_buckets_flag, positive_ints


def test_positive_ints_parses_and_names_the_flag_on_bad_input():
    assert positive_ints("1, 4,8", "slots") == [1, 4, 8]
    for bad in ("", ",", "1,,4", "1,4,", "1,x", "0,2", "-1", "+4", "1_0", "4.0"):
        with pytest.raises(ValueError, match="--slots"):
            positive_ints(bad, "slots")


def test_kv_buckets_flag_default_auto_and_explicit():
    assert kv_buckets_flag("", 512) is None  # EngineConfig: max_len alone
    assert kv_buckets_flag(" auto ", 512) == kv_buckets_flag("AUTO", 512) == (128, 256, 512)
    assert kv_buckets_flag("64,512", 512) == (64, 512)
    for bad in ("64,big", "256,64,512", "64,64,512", "64,256", "64,1024"):
        with pytest.raises(ValueError, match="--kv_buckets"):
            kv_buckets_flag(bad, 512)
