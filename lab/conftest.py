"""The lab's checks borrow the product suite's fixtures: ``pairs`` and the no-download guard."""

from __future__ import annotations

import importlib.util
from pathlib import Path

_spec = importlib.util.spec_from_file_location(
    "deblurcli_tests_conftest", Path(__file__).resolve().parents[1] / "tests" / "conftest.py")
_product = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_product)

pairs = _product.pairs
_no_metric_downloads = _product._no_metric_downloads
