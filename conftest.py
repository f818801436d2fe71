"""What pytest must be told before it reads test_modelgate.py, so that it is in force while it does."""

import gc

import pytest


@pytest.hookimpl(wrapper=True)
def pytest_collection(session: pytest.Session) -> object:
    # No garbage collection while pytest reads the suite: it parses test_modelgate.py and rewrites its asserts as
    # trees of about a million objects, none of them in a cycle, and Python's collector walks them all each time
    # they have grown by a quarter (the long_lived_pending rule of CPython's Modules/gcmodule.c): 1.5 s of every
    # run in a fresh clone, as pytest keeps the rewritten module in __pycache__ only for the next run.
    gc.disable()
    try:
        return (yield)
    finally:
        gc.enable()
