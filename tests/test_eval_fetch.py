"""The metric-weight fetcher: where each file comes from, where it lands, and that a file whose
SHA-256 does not match is never kept. The network calls are replaced; nothing is downloaded."""

from __future__ import annotations

import hashlib
from pathlib import Path
from types import SimpleNamespace

import pytest

from deblurcli.errors import WeightsError
from deblurcli.evaluation import fetch
from deblurcli.evaluation.metrics import METRICS, HFFile, WeightFile

# the shipped function, taken before conftest's autouse fixture replaces it in every test
REAL_FETCH = fetch.fetch_file


@pytest.fixture()
def real_fetch(monkeypatch):
    """``fetch.fetch_file`` as shipped, with torch hub's downloader and the Hub replaced."""
    module = SimpleNamespace(fetch_file=REAL_FETCH, source=fetch.source)
    downloads: list[tuple[str, str, str]] = []

    def download_url_to_file(url, dst, hash_prefix=None, progress=True):
        content = b"weights of " + url.encode()
        digest = hashlib.sha256(content).hexdigest()
        if hash_prefix is not None and not digest.startswith(hash_prefix):
            raise RuntimeError(f'invalid hash value (expected "{hash_prefix}", got "{digest}")')
        Path(dst).write_bytes(content)
        downloads.append((url, dst, hash_prefix))

    import torch.hub

    monkeypatch.setattr(torch.hub, "download_url_to_file", download_url_to_file)
    return module, downloads


def _hub_etag(monkeypatch, etag: str) -> None:
    import huggingface_hub

    monkeypatch.setattr(huggingface_hub, "get_hf_file_metadata",
                        lambda url, **kw: SimpleNamespace(etag=f'"{etag}"'))


def test_offline_is_the_flag_or_hf_hub_offline(monkeypatch):
    """One rule for eval and for a model's hub id, huggingface_hub's: deblur read "False" and
    "no" as offline."""
    from deblurcli.modelindex import offline_requested

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    assert not offline_requested(False) and offline_requested(True)
    for value, offline in (("1", True), ("true", True), ("ON", True), ("Yes", True),
                           ("0", False), ("", False), ("False", False), ("no", False),
                           ("off", False)):
        monkeypatch.setenv("HF_HUB_OFFLINE", value)
        assert offline_requested(False) is offline, value
    monkeypatch.delenv("HF_HUB_OFFLINE")
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")  # huggingface_hub reads it too
    assert offline_requested(False)


def test_torchvision_backbones_are_checked_against_the_hash_in_their_name(real_fetch,
                                                                          empty_torch_home):
    module, downloads = real_fetch
    wf = WeightFile("checkpoints", "alexnet-owt-7be5be79.pth")
    # the fake server's bytes do not hash to 7be5be79...: the file must not be kept
    with pytest.raises(WeightsError, match="checksum mismatch"):
        module.fetch_file(wf)
    assert not (empty_torch_home / "hub" / "checkpoints" / wf.name).exists()
    url, hash_prefix = module.source(wf)
    assert url == "https://download.pytorch.org/models/alexnet-owt-7be5be79.pth"
    assert hash_prefix == "7be5be79"


def test_pyiqa_files_come_from_its_hub_repo_checked_by_the_hubs_sha256(real_fetch, monkeypatch,
                                                                       empty_torch_home):
    module, downloads = real_fetch
    wf = WeightFile("pyiqa", "niqe_modelparameters.mat", "option")
    from huggingface_hub import hf_hub_url

    expected_url = hf_hub_url(fetch.PYIQA_REPO, wf.name)
    good = hashlib.sha256(b"weights of " + expected_url.encode()).hexdigest()
    _hub_etag(monkeypatch, good)
    path = module.fetch_file(wf)
    assert path == empty_torch_home / "hub" / "pyiqa" / wf.name and path.is_file()
    assert downloads == [(expected_url, str(path), good)]
    # a file name carrying a hash prefix must agree with the Hub's hash
    with pytest.raises(WeightsError, match="does not match"):
        module.fetch_file(METRICS["lpips"].weights[0])


def test_hugging_face_files_with_a_wrong_hash_are_deleted(real_fetch, monkeypatch, tmp_path):
    module, _ = real_fetch
    blob = tmp_path / "model.safetensors"

    def hf_hub_download(repo_id, filename, **kw):
        blob.write_bytes(b"tampered")
        return str(blob)

    import huggingface_hub

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", hf_hub_download)
    _hub_etag(monkeypatch, hashlib.sha256(b"genuine").hexdigest())
    item = HFFile("timm/some-model", ("model.safetensors",))
    with pytest.raises(WeightsError, match="checksum mismatch"):
        module.fetch_file(item)
    assert not blob.exists()
    _hub_etag(monkeypatch, hashlib.sha256(b"tampered").hexdigest())
    assert module.fetch_file(item) == blob and blob.is_file()


def test_every_metric_file_has_a_verified_source(monkeypatch):
    """No metric needs a file the fetcher cannot fetch with a checksum."""
    _hub_etag(monkeypatch, "ab" * 32)
    for spec in METRICS.values():
        for wf in spec.weights:
            if wf.folder == "pyiqa" and fetch.name_hash(wf.name):
                _hub_etag(monkeypatch, fetch.name_hash(wf.name) + "0" * (64 - len(
                    fetch.name_hash(wf.name))))
            url, sha = fetch.source(wf)
            assert url.startswith("https://") and len(sha) >= 8
            _hub_etag(monkeypatch, "ab" * 32)
