"""The registry of pretrained encoders: shipped files verified, URL entries downloaded into the cache and
verified, every failure an error naming the entry and file; a wheel of the repository carries them."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from opdcells import registry
from opdcells.errors import RegistryError

REPO = Path(__file__).resolve().parents[1]


def test_every_shipped_entry_is_in_the_package_and_verifies():
    shipped = {n: e for n, e in registry.get_registered_encoders().items() if e.folder}
    assert {"opd_mobilenetv2_pretrained", "opd_mobilenetv2_pretrained_v2", "opd_mobilenetv2_pretrained_v3",
            "opd_resnet50_pretrained", "opd_dinov2_pretrained", "opd_vgg16_pretrained"} <= set(shipped)
    for name, entry in shipped.items():
        folder = registry.encoder_folder(name)
        assert folder.parent == registry.PACKAGE_DIR / "pretrained"
        config = registry.encoder_config(folder)
        assert config["architecture"] == entry.backbone and config["input_size"] == entry.input_size
        assert config["data"]["pixel_size_um"] == entry.pixel_size_um
        assert config["data"]["out_size"] == entry.out_size
        assert entry.init == f"opd:{name}@{registry.file_sha256(folder / registry.ENCODER_WEIGHTS)[:12]}"
    assert registry.DEFAULTS == {"mobilenetv2": "opd_mobilenetv2_pretrained_v3",
                                 "resnet50": "opd_resnet50_pretrained", "dinov2": "opd_dinov2_pretrained",
                                 "vgg16": "opd_vgg16_pretrained"}


def test_opd_weights_resolve_to_the_default_entry_or_name_the_missing_one(monkeypatch):
    resolved = registry.resolve_weights("mobilenetv2", "opd")
    assert resolved.kind == "file"
    assert resolved.init == registry.get_entry("opd_mobilenetv2_pretrained_v3").init
    for name in ("opd_mobilenetv2_pretrained", "opd_mobilenetv2_pretrained_v2"):   # earlier ones still load
        earlier = registry.resolve_weights("mobilenetv2", f"opd:{name}")
        assert earlier.init == registry.get_entry(name).init != resolved.init
    assert registry.resolve_weights("dinov2", "opd:opd_dinov2_pretrained").config["architecture"] == "dinov2"
    assert registry.resolve_weights("vgg16", "opd").config["input_size"] == 48
    monkeypatch.delitem(registry.DEFAULTS, "vgg16")   # a backbone without a shipped encoder
    with pytest.raises(RegistryError, match=r"registry.DEFAULTS\['vgg16'\]: no OPD-pretrained encoder"):
        registry.resolve_weights("vgg16", "opd")
    with pytest.raises(RegistryError, match="registry entry nope: no such pretrained encoder is registered"):
        registry.resolve_weights("mobilenetv2", "opd:nope")
    with pytest.raises(RegistryError, match="opd_dinov2_pretrained: is a dinov2 encoder, not mobilenetv2"):
        registry.resolve_weights("mobilenetv2", "opd:opd_dinov2_pretrained")
    assert registry.resolve_weights("resnet50", "none").init == "random"


def _zipped_encoder(tmp_path, extra: dict | None = None) -> tuple[Path, str]:
    """A .zip of an encoder folder (config + weights bytes) and its SHA-256."""
    archive = tmp_path / "enc.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        zf.writestr("enc/config.json", json.dumps({"architecture": "mobilenetv2", "alpha": 0.35}))
        zf.writestr("enc/encoder.weights.h5", b"weights" * 100)
        for name, data in (extra or {}).items():
            zf.writestr(name, data)
    return archive, registry.file_sha256(archive)


def _url_entry(monkeypatch, archive: Path, sha: str, name: str = "remote"):
    monkeypatch.setattr(registry, "REGISTRY", dict(registry.REGISTRY))
    return registry.register_encoder(registry.RegisteredEncoder(
        name=name, backbone="mobilenetv2", url=archive.as_uri(), sha256=sha, input_size=64,
        pixel_size_um=0.25, out_size=128, trained_on="a test", command="zip", commit="none"))


def test_url_entry_is_downloaded_once_into_the_cache_and_verified(tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    monkeypatch.setenv(registry.CACHE_ENV, str(cache))
    archive, sha = _zipped_encoder(tmp_path)
    _url_entry(monkeypatch, archive, sha)
    folder = registry.encoder_folder("remote")
    assert folder.parent == cache and (folder / "encoder.weights.h5").read_bytes() == b"weights" * 100
    assert registry.resolve_weights("mobilenetv2", "opd:remote").config["alpha"] == 0.35
    archive.unlink()                                   # the second use needs no download
    assert registry.encoder_folder("remote") == folder
    (folder / "encoder.weights.h5").write_bytes(b"tampered")
    with pytest.raises(RegistryError, match=f"{folder / 'encoder.weights.h5'}: corrupt: SHA-256.*delete"):
        registry.encoder_folder("remote")


def test_a_corrupt_or_unreachable_download_is_an_error_naming_the_url(tmp_path, monkeypatch):
    monkeypatch.setenv(registry.CACHE_ENV, str(tmp_path / "cache"))
    archive, sha = _zipped_encoder(tmp_path)
    _url_entry(monkeypatch, archive, "0" * 64)
    with pytest.raises(RegistryError, match=f"{archive.as_uri()}: corrupt download: SHA-256 {sha[:12]}"):
        registry.encoder_folder("remote")
    assert not list((tmp_path / "cache").iterdir())    # nothing half-written is left in the cache
    _url_entry(monkeypatch, tmp_path / "absent.zip", sha)
    with pytest.raises(RegistryError, match="absent.zip: cannot download pretrained encoder remote"):
        registry.encoder_folder("remote")
    odd, odd_sha = _zipped_encoder(tmp_path, {"enc/run.py": "print(1)"})
    _url_entry(monkeypatch, odd, odd_sha)
    with pytest.raises(RegistryError, match="not an encoder archive .*unexpected: run.py"):
        registry.encoder_folder("remote")


def test_registry_imports_no_tensorflow():
    code = "import sys, opdcells.registry, opdcells.config; print('tensorflow' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=REPO)
    assert out.stdout.strip() == "False"


@pytest.mark.slow
def test_a_wheel_of_the_repository_carries_and_verifies_the_shipped_encoders(tmp_path):
    source = tmp_path / "source"   # pip builds in the tree (build/, *.egg-info): a copy, not the checkout
    for name in ("pyproject.toml", "README.md"):
        source.mkdir(exist_ok=True)
        shutil.copy2(REPO / name, source / name)
    shutil.copytree(REPO / "opdcells", source / "opdcells", ignore=shutil.ignore_patterns("__pycache__"))
    subprocess.run([sys.executable, "-m", "pip", "wheel", str(source), "--no-deps", "--no-build-isolation",
                    "-q", "-w", str(tmp_path / "dist")], check=True, capture_output=True, cwd=tmp_path)
    wheel = next((tmp_path / "dist").glob("opdcells-*.whl"))
    site = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(site),
                    str(wheel)], check=True, capture_output=True, cwd=tmp_path)
    code = ("import json, opdcells, opdcells.registry as r; "
            "print(json.dumps({'file': opdcells.__file__, "
            "'folders': {n: str(r.encoder_folder(n)) for n in r.get_registered_encoders()}, "
            "'init': r.resolve_weights('mobilenetv2', 'opd').init}))")
    work = tmp_path / "elsewhere"
    work.mkdir()
    env = {**os.environ, "PYTHONPATH": str(site)}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=work, env=env)
    assert out.returncode == 0, out.stderr
    found = json.loads(out.stdout)
    assert Path(found["file"]).is_relative_to(site)
    assert set(found["folders"]) >= {"opd_mobilenetv2_pretrained_v3", "opd_dinov2_pretrained"}
    assert all(Path(folder).is_relative_to(site) for folder in found["folders"].values())
    assert found["init"] == registry.get_entry("opd_mobilenetv2_pretrained_v3").init
