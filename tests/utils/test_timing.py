from dspark_jax.utils.timing import interleaved_seconds


def test_interleaved_seconds_runs_each_once_per_pass_in_turn():
    calls = []
    runs = {name: (lambda name=name: calls.append(name) or 0) for name in ("a", "b")}
    times = interleaved_seconds(runs, 3)
    assert calls == ["a", "b"] + ["a", "b"] * 3  # one warm-up each, then the passes in turn
    assert set(times) == {"a", "b"} and all(len(t) == 3 and min(t) >= 0 for t in times.values())
    calls.clear()
    interleaved_seconds(runs, 2, warmup=False)
    assert calls == ["a", "b", "a", "b"]
