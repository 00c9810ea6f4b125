"""read_first_turns: the prompts of a JSONL file, and a clear error naming the file for every bad input."""
import json

import pytest

from dspark_jax.data import read_first_turns


def test_reads_first_turns_and_skips_blank_lines(tmp_path):
    path = tmp_path / "p.jsonl"
    path.write_text(json.dumps({"turns": ["a\u2028b", "second"]}) + "\n\n" + json.dumps({"turns": ["c"]}) + "\n")
    assert read_first_turns(path) == ["a\u2028b", "c"]


@pytest.mark.parametrize("content,error,message", [
    (None, FileNotFoundError, "prompts file not found"),
    ("dir", IsADirectoryError, "prompts file is a directory"),
    (b"\xff\xfe{}", ValueError, "not UTF-8 text (byte 0"),
    ("\n \n", ValueError, "prompts file is empty"),
    ('{"turns": ["x"]}\n{oops\n', ValueError, ":2: invalid JSON"),
    ('{"turns": []}\n', ValueError, ":1: expected an object with a non-empty 'turns' list"),
])
def test_bad_files_name_the_problem_and_the_path(tmp_path, content, error, message):
    path = tmp_path / "prompts.jsonl"
    if content == "dir":
        path.mkdir()
    elif isinstance(content, bytes):
        path.write_bytes(content)
    elif content is not None:
        path.write_text(content)
    with pytest.raises(error) as info:
        read_first_turns(path)
    assert message in str(info.value) and str(path) in str(info.value)
