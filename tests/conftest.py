"""Make the repository root importable when pytest runs from it."""
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


def pytest_configure(config):
    """One intra-op thread per test process: tests start several processes, and oversubscribed cores crawl."""
    import torch

    torch.set_num_threads(1)
