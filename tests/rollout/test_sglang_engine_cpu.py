"""The parts of the SGLang engine that need no GPU: what a failed SGLang process does to the call in progress."""

import pytest


def test_a_failed_sglang_process_ends_the_call_with_an_error_not_a_kill():
    """SGLang's failed child sends SIGQUIT; our handler stops SGLang's processes and cancels the call's tasks: the
    engine call raises SGLangFailure (a traceback, an exit code), and later calls refuse at once."""
    import asyncio

    from r1moe.rollout.sglang_engine import SGLangEngine, SGLangFailure

    eng = SGLangEngine.__new__(SGLangEngine)  # the call wrapper only: no SGLang on this machine
    eng.failed = False

    def dies():
        eng.failed = True  # what the SIGQUIT handler sets before cancelling the tasks
        raise asyncio.CancelledError

    with pytest.raises(SGLangFailure, match="failed during dies"):
        eng._call(dies)
    with pytest.raises(SGLangFailure, match="failed earlier"):
        eng._call(lambda: 1)
    ok = SGLangEngine.__new__(SGLangEngine)
    ok.failed = False
    assert ok._call(lambda x: x + 1, 1) == 2
    with pytest.raises(ValueError):  # other errors pass through unchanged
        ok._call(lambda: int("x"))
