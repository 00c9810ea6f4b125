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


def test_heldout_dirs_names_each_cache_and_refuses_bad_lists(tmp_path):
    """`dspark train --heldout_dir`: [NAME=]DIR entries; the first unnamed one is "heldout", later ones
    "heldout_NAME" (the directory's name without NAME); bad lists fail before any model loads."""
    from dspark_jax.cli.train import heldout_dirs
    for name in ("g", "t1", "other"):
        (tmp_path / name / "cache").mkdir(parents=True)
    g, t1, other = (str(tmp_path / n) for n in ("g", "t1", "other"))
    assert heldout_dirs("") == {}
    assert heldout_dirs(g) == {"heldout": tmp_path / "g"}
    assert heldout_dirs(f"{g}, t1={t1},{other}") == {"heldout": tmp_path / "g", "heldout_t1": tmp_path / "t1",
                                                      "heldout_other": tmp_path / "other"}
    assert heldout_dirs(f"t1={t1}") == {"heldout_t1": tmp_path / "t1"}
    (tmp_path / "x=1" / "cache").mkdir(parents=True)  # NAME ends at the first "=": a directory may contain one
    assert heldout_dirs(f"t1={tmp_path / 'x=1'}") == {"heldout_t1": tmp_path / "x=1"}
    for bad in (f"{g},{t1},{t1}", f"x={g},x={t1}", f"={g}", "x=", f"{g},,{t1}", "a/b=" + g):
        with pytest.raises(ValueError, match="--heldout_dir"):
            heldout_dirs(bad)
    with pytest.raises(FileNotFoundError, match="no cache/"):
        heldout_dirs(str(tmp_path / "missing"))
