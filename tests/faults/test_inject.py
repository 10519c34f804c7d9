"""The suite's own check of a refusal: it reads the error message itself,
not the traceback, and takes only words that tell the user what to do."""
from __future__ import annotations

import subprocess

import pytest
from inject import assert_refused, call


def raising(message: str):
    def main(argv):
        raise ValueError(message)
    return main


def chained(cause: str, message: str):
    """An error raised while handling another: the traceback shows both, the user's error is the last."""
    def main(argv):
        try:
            raise KeyError(cause)
        except KeyError as error:
            raise ValueError(message) from error
    return main


@pytest.mark.parametrize("main", [
    raising("data.parquet: bad rows, because of the input"),  # "use" inside "because"
    raising("data.parquet: bad rows; check it"),  # "check": not an instruction that says what to do
    raising("data.parquet: bad rows; the settings differ"),  # "set" only inside a longer word
    chained("rerun it", "data.parquet: bad rows"),
], ids=["because", "check", "inside-a-word", "traceback-only"])
def test_an_error_without_advice_is_not_a_refusal(main):
    with pytest.raises(AssertionError, match="says nothing on what to do"):
        assert_refused(call(main, []), "data.parquet")


def test_a_name_only_in_the_traceback_is_not_named():
    main = chained("data.parquet", "bad rows: delete the file and rerun the stage that wrote it")
    with pytest.raises(AssertionError, match="does not name 'data.parquet'"):
        assert_refused(call(main, []), "data.parquet")


def test_a_refusal_with_name_and_advice_passes():
    assert_refused(call(raising("data.parquet: bad rows; delete it and rerun the stage that wrote it"), []),
                   "data.parquet", "ValueError")
    printed = subprocess.CompletedProcess([], 1, stdout="progress\n", stderr="Traceback ...\n  File x\n"
                                          "ValueError: data.parquet: empty; rerun the stage that wrote it\n\n")
    assert_refused(printed, "data.parquet")
    with pytest.raises(AssertionError, match="says nothing on what to do"):
        assert_refused(subprocess.CompletedProcess([], 1, stdout="rerun it\n", stderr="ValueError: data.parquet\n"),
                       "data.parquet")
