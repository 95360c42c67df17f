"""The test suite's own machinery: stored references that cannot rewrite themselves, and one thread
count for this process and every subprocess the tests start."""
import json
import os
import subprocess
import sys

import pytest
import torch


def test_regenerating_a_reference_fails_the_run_that_did_it(tmp_path, monkeypatch, reference):
    path = tmp_path / "losses" / "x.json"
    monkeypatch.setenv("LLAMA2_UPDATE_REFERENCE", "1")
    with pytest.raises(pytest.fail.Exception, match="reference regenerated: .*rerun without LLAMA2_UPDATE_REFERENCE"):
        reference(path, {1: 2.5, 2: 2.25})
    assert json.loads(path.read_text()) == {"1": 2.5, "2": 2.25}
    monkeypatch.delenv("LLAMA2_UPDATE_REFERENCE")
    assert reference(path, {1: 2.5, 2: 2.0}) == {"1": 2.5, "2": 2.25}  # the values are the caller's to compare


@pytest.mark.parametrize("stored,got,match", [
    ({}, {1: 1.0}, "empty reference"),
    ({"1": 1.0}, {1: 1.0, 2: 0.9}, r"steps \['1'\], run logged \['1', '2'\]"),  # a step the file lacks
    ({"1": 1.0, "2": 0.9, "3": 0.8}, {1: 1.0, 2: 0.9}, "steps"),  # a step the run did not log
    ({"1": {"loss": 1.0}}, {1: {"loss": 1.0, "kl": 0.0}}, "kl"),  # a value the file lacks
])
def test_a_reference_must_hold_exactly_the_steps_checked(tmp_path, monkeypatch, reference, stored, got, match):
    monkeypatch.delenv("LLAMA2_UPDATE_REFERENCE", raising=False)
    path = tmp_path / "x.json"
    path.write_text(json.dumps(stored))
    with pytest.raises(AssertionError, match=match):
        reference(path, got)


def test_subprocesses_run_with_the_thread_count_of_the_tests():
    # the tests compare subprocess losses and sampled texts exactly with this process's
    code = "import torch; print(torch.get_num_threads())"
    r = subprocess.run([sys.executable, "-c", code], env=dict(os.environ), capture_output=True, text=True, check=True)
    assert int(r.stdout) == torch.get_num_threads() == int(os.environ["OMP_NUM_THREADS"])
