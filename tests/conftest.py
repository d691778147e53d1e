import pytest
import torch


@pytest.fixture(autouse=True, scope="session")
def one_thread():
    # The tests run tiny models: intra-op threads cost more than they save there (about 10x more on busy cores).
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def _shared_data_line() -> str:
    import os
    from pathlib import Path

    shared = Path(os.environ.get("PREFIXSHARE_SHARED", Path(__file__).resolve().parents[2] / "shared"))
    if (shared / "tokenizers").exists() and (shared / "data").exists():
        return f"prefixshare: real tokenizer and data from {shared}"
    return (
        f"prefixshare: no real tokenizer and data at {shared} (set PREFIXSHARE_SHARED to a folder with tokenizers/ "
        "and data/): the tests that read them SKIP; every other test runs on tokenizers built in code"
    )


def pytest_report_header(config):
    """Say at the top of the run (and again at its end, which -q keeps) whether the real tokenizer and data are
    there: without them the tests that read them skip, each with its reason in the summary."""
    return _shared_data_line()


def pytest_terminal_summary(terminalreporter):
    terminalreporter.write_line(_shared_data_line())
