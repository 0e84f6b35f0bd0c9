import numpy as np
import pytest
import torch
import torch_fidelity
from tiny_features import TINY

from dbl.data.images import ReferenceImages, UInt8Images, to_uint8
from dbl.evaluation.fid import FeatureExtractor, frechet_distance, reference_statistics, statistics, stats_cache_path


def image_sets():
    gen = torch.Generator().manual_seed(0)
    a = torch.randint(0, 256, (40, 3, 16, 16), generator=gen, dtype=torch.uint8)
    b = (torch.rand(30, 3, 16, 16, generator=gen) ** 2 * 255).to(torch.uint8)  # darker, a different distribution
    return a, b


def test_fid_equals_torch_fidelity(tmp_path):
    generated, reference = image_sets()
    extractor = FeatureExtractor(TINY, "8")
    ours_ref = reference_statistics(ReferenceImages(UInt8Images(reference), {"split": "test", "n": 30}, tmp_path),
                                    extractor, batch_size=7)
    ours = frechet_distance(statistics(extractor.features(generated.split(9))["8"]), ours_ref)
    theirs = torch_fidelity.calculate_metrics(
        input1=UInt8Images(generated), input2=UInt8Images(reference), fid=True, feature_extractor=TINY,
        feature_layer_fid="8", cuda=False, cache=False, verbose=False, save_cpu_ram=True,
    )["frechet_inception_distance"]
    assert ours > 0.01
    assert ours == pytest.approx(theirs, rel=1e-9, abs=1e-12)
    # and the check can fail: a different set gives a different distance
    other = frechet_distance(statistics(extractor.features([reference[:20]])["8"]), ours_ref)
    assert abs(other - theirs) > 1e-3


def test_generated_floats_round_trip_to_the_reference_pixels():
    pixels = torch.arange(256, dtype=torch.uint8).view(1, 1, 16, 16)
    assert torch.equal(to_uint8(pixels.float() / 127.5 - 1.0), pixels)
    assert to_uint8(torch.tensor([-3.0, 3.0])).tolist() == [0, 255]  # out-of-range samples clamp


def test_reference_statistics_are_cached_by_what_they_cover(tmp_path, monkeypatch):
    _, reference = image_sets()
    extractor = FeatureExtractor(TINY, "8")
    ref = ReferenceImages(UInt8Images(reference), {"dataset": "x", "split": "test", "n": 30}, tmp_path)
    first = reference_statistics(ref, extractor)
    path = stats_cache_path(ref, extractor)
    assert path.exists() and path.parent == tmp_path
    monkeypatch.setattr(FeatureExtractor, "__call__", lambda *a, **k: pytest.fail("cache miss"))
    again = reference_statistics(ref, extractor)
    assert np.array_equal(first["mu"], again["mu"]) and np.array_equal(first["sigma"], again["sigma"])
    smaller = ReferenceImages(UInt8Images(reference[:10]), {"dataset": "x", "split": "test", "n": 10}, tmp_path)
    assert stats_cache_path(smaller, extractor) != path


def test_gray_images_are_repeated_to_rgb():
    extractor = FeatureExtractor(TINY, "8")
    gray = torch.randint(0, 256, (4, 1, 8, 8), dtype=torch.uint8)
    assert torch.equal(extractor(gray)["8"], extractor(gray.repeat(1, 3, 1, 1))["8"])


def test_missing_weights_file_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="feature_extractor_weights_path"):
        FeatureExtractor(weights_path=str(tmp_path / "nope.pth"))


def test_fid_callback_checks_its_inputs_before_the_run_not_after(tmp_path):
    from types import SimpleNamespace

    from dbl.callbacks import FID
    from dbl.data import DigitsDataModule
    from dbl.errors import MissingDataError, UsageError

    trainer = SimpleNamespace(datamodule=SimpleNamespace(fid_reference=None), is_global_zero=True,
                              strategy=SimpleNamespace(root_device=torch.device("cpu")))
    missing = str(tmp_path / "nope.pth")
    FID(feature_extractor_weights_path=missing).setup(trainer, None, "fit")  # FID runs only at test: no check
    with pytest.raises(MissingDataError, match="feature_extractor_weights_path"):
        FID(feature_extractor_weights_path=missing, every_n_epochs=1).setup(trainer, None, "fit")
    with pytest.raises(MissingDataError, match="feature_extractor_weights_path"):
        FID(feature_extractor_weights_path=missing).setup(trainer, None, "test")
    trainer.datamodule = DigitsDataModule()  # no fid_reference
    with pytest.raises(UsageError, match="needs a DataModule with fid_reference"):
        FID(feature_extractor=TINY, feature_layer="8").setup(trainer, None, "test")
    tiny = FID(feature_extractor=TINY, feature_layer="8", every_n_epochs=1)
    trainer.datamodule = SimpleNamespace(fid_reference=None)
    tiny.setup(trainer, None, "fit")
    assert tiny._extractor is not None  # loaded once, reused by every evaluation


def test_statistics_cache_is_keyed_by_content_written_atomically_and_checked(tmp_path, monkeypatch):
    _, reference = image_sets()
    extractor = FeatureExtractor(TINY, "8")
    description = {"dataset": "x", "split": "test", "n": 30}
    ref = ReferenceImages(UInt8Images(reference), description, tmp_path)
    changed = reference.clone()
    changed[0, 0, 0, 0] ^= 1  # one pixel differs: same name, split and count
    assert stats_cache_path(ReferenceImages(UInt8Images(changed), description, tmp_path), extractor) != stats_cache_path(ref, extractor)
    first = reference_statistics(ref, extractor)
    assert [p.name for p in tmp_path.iterdir()] == [stats_cache_path(ref, extractor).name]  # no temporary file left
    # a damaged cache file is computed again and replaced
    stats_cache_path(ref, extractor).write_bytes(b"not an npz")
    again = reference_statistics(ref, extractor)
    assert np.array_equal(again["mu"], first["mu"]) and np.array_equal(again["sigma"], first["sigma"])
    with np.load(stats_cache_path(ref, extractor)) as f:
        assert np.array_equal(f["sigma"], first["sigma"])
    # a failure while writing leaves nothing behind
    monkeypatch.setattr(np, "savez", lambda path, **kw: (open(path, "wb").write(b"half"), (_ for _ in ()).throw(OSError("disk full"))))
    other = ReferenceImages(UInt8Images(changed), description, tmp_path / "other")
    with pytest.raises(OSError, match="disk full"):
        reference_statistics(other, extractor)
    assert not (tmp_path / "other").exists()  # not even the folder made for it


def test_reference_statistics_load_with_the_data_modules_workers(tmp_path, monkeypatch):
    from types import SimpleNamespace

    from dbl.callbacks import FID

    seen = []

    class Recorded(Exception):
        """Stops evaluate() once the reference statistics were asked for."""

    def record(ref, extractor, batch_size, cache_dir, num_workers=0, shard=None):
        seen.append(num_workers)
        raise Recorded

    monkeypatch.setattr("dbl.callbacks.fid.reference_statistics", record)
    _, reference = image_sets()
    datamodule = SimpleNamespace(hparams={"num_workers": 3},
                                 fid_reference=lambda split: ReferenceImages(UInt8Images(reference), {"split": split}, tmp_path))
    trainer = SimpleNamespace(datamodule=datamodule)
    callback = FID(feature_extractor=TINY, feature_layer="8", reference_splits=["test"])
    with pytest.raises(Recorded):
        callback.evaluate(trainer, SimpleNamespace(device=torch.device("cpu")), "test")
    assert seen == [3]
