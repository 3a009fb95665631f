import numpy as np
import pytest
import torch
from PIL import Image

from reslab.data.folders import FolderSource, open_image
from reslab.errors import ReslabError


def make_tree(root, classes=("cat", "dog"), per_class=6, size=(20, 12)):
    for c, name in enumerate(classes):
        (root / name).mkdir(parents=True)
        for i in range(per_class):
            Image.new("RGB", size, (200 * c, 40 * i, 90)).save(root / name / f"{i}.png")
    return root


def test_split_fraction_and_worker_decoding(tmp_path):
    source = FolderSource(make_tree(tmp_path / "pets"), size=16, val_fraction=0.25, workers=1)
    assert source.classes == ("cat", "dog") and (source.train_size, source.test_size) == (9, 3)
    images, labels = next(source.train_batches(4, torch.Generator().manual_seed(0)))
    assert images.shape == (4, 3, 16, 16) and images.dtype == torch.uint8
    assert set(labels.tolist()) <= {0, 1}


def test_train_and_val_folders(tmp_path):
    make_tree(tmp_path / "set" / "train")
    make_tree(tmp_path / "set" / "val", per_class=2)
    source = FolderSource(tmp_path / "set", size=8, workers=0)
    assert (source.train_size, source.test_size) == (12, 4)
    assert sum(len(labels) for _, labels in source.test_batches(3)) == 4


def test_empty_folder_and_empty_class_are_clear_errors(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(ReslabError, match="has no class folders"):
        FolderSource(tmp_path / "empty")
    make_tree(tmp_path / "pets")
    (tmp_path / "pets" / "fish").mkdir()
    with pytest.raises(ReslabError, match=r"class folder .*fish has no images"):
        FolderSource(tmp_path / "pets")
    with pytest.raises(ReslabError, match="does not exist"):
        FolderSource(tmp_path / "nowhere")


def test_open_image_any_mode_and_corrupt_file(tmp_path):
    Image.new("RGBA", (50, 30), (255, 0, 0, 128)).save(tmp_path / "a.png")
    Image.new("P", (7, 9)).save(tmp_path / "b.png")
    assert open_image(tmp_path / "a.png", 1, 28).shape == (1, 28, 28)
    assert open_image(tmp_path / "b.png", 3, 16).shape == (3, 16, 16)
    (tmp_path / "bad.jpg").write_bytes(b"not an image")
    with pytest.raises(ReslabError, match=r"bad\.jpg: not a readable image"):
        open_image(tmp_path / "bad.jpg", 1, 28)


def test_16_bit_grayscale_is_scaled_and_float_images_are_refused(tmp_path):
    # PIL's convert clips 16-bit values above 255, which turned such an image white
    levels = np.arange(256, dtype=np.uint16).reshape(16, 16)
    Image.fromarray(levels * 257).save(tmp_path / "deep.png")
    Image.fromarray(levels.astype(np.uint8)).save(tmp_path / "flat.png")
    for channels in (1, 3):
        deep = open_image(tmp_path / "deep.png", channels, 16)
        assert torch.equal(deep, open_image(tmp_path / "flat.png", channels, 16))
    Image.fromarray(levels.astype(np.float32) / 255).save(tmp_path / "float.tiff")
    with pytest.raises(ReslabError, match=r"float\.tiff: a 32-bit float image"):
        open_image(tmp_path / "float.tiff", 1, 16)


def test_a_photos_exif_orientation_is_applied(tmp_path):
    # stored 40x20 with its left quarter white, tagged "rotate 90 clockwise to display": the
    # upright image is 20 wide and 40 high with its top quarter white
    photo = Image.new("L", (40, 20), 0)
    photo.paste(255, (0, 0, 10, 20))
    exif = Image.Exif()
    exif[0x0112] = 6  # Orientation
    photo.save(tmp_path / "phone.jpg", exif=exif, quality=95)
    rows = open_image(tmp_path / "phone.jpg", 1, 16)[0].float().mean(1)
    assert rows[:3].min() > 200 and rows[5:].max() < 30


def test_corrupt_file_is_skipped_with_a_count_or_stops_with_strict(tmp_path):
    make_tree(tmp_path / "pets")
    (tmp_path / "pets" / "cat" / "broken.png").write_bytes(b"\x89PNG garbage")
    (tmp_path / "pets" / "cat" / "empty.jpg").write_bytes(b"")
    source = FolderSource(tmp_path / "pets", size=8, val_fraction=0.5, workers=1)
    assert sorted(p.name for p in source.skipped) == ["broken.png", "empty.jpg"]
    assert "skipped 2 unreadable file(s)" in source.description
    names = [p.name for p, _ in source.train.samples + source.val.samples]
    assert "broken.png" not in names and "empty.jpg" not in names
    for split in (source.train_batches(13, torch.Generator()), source.test_batches(13)):
        assert len(list(split)) > 0
    with pytest.raises(ReslabError, match=r"broken\.png: not a readable image") as info:
        FolderSource(tmp_path / "pets", size=8, val_fraction=0.5, workers=1, strict=True)
    assert "\n" not in str(info.value)


def test_a_file_that_breaks_only_when_decoded_is_named(tmp_path):
    make_tree(tmp_path / "pets")
    source = FolderSource(tmp_path / "pets", size=8, val_fraction=0.5, workers=1)
    broken = source.train.samples[0][0]
    broken.write_bytes(b"\x89PNG garbage")  # damaged after the scan
    with pytest.raises(ReslabError, match=r"not a readable image") as info:
        list(source.train_batches(64, torch.Generator()))
    assert broken.name in str(info.value) and "\n" not in str(info.value)


def test_a_test_folder_is_the_held_out_split(tmp_path):
    make_tree(tmp_path / "set" / "train")
    make_tree(tmp_path / "set" / "test", per_class=3)
    source = FolderSource(tmp_path / "set", size=8, workers=0)
    # the classes are cat and dog, not train and test
    assert source.classes == ("cat", "dog") and (source.train_size, source.test_size) == (12, 6)
    assert "train/ and test/" in source.description


def test_a_split_folder_alone_is_not_taken_for_a_class(tmp_path):
    make_tree(tmp_path / "only-train" / "train")
    (tmp_path / "only-train" / "other").mkdir()
    with pytest.raises(ReslabError, match=r"only-train/train has no held-out folder .*--data"):
        FolderSource(tmp_path / "only-train")
    make_tree(tmp_path / "only-val" / "val")
    make_tree(tmp_path / "only-val" / "extra")
    with pytest.raises(ReslabError, match=r"only-val/val has no train/ beside it"):
        FolderSource(tmp_path / "only-val")


def test_one_class_is_a_clear_error(tmp_path):
    make_tree(tmp_path / "cats", classes=("cat",))
    with pytest.raises(ReslabError, match=r"one class folder \(cat\); a classifier needs two"):
        FolderSource(tmp_path / "cats")


def test_centre_crop_keeps_the_middle_and_the_shorter_side(tmp_path):
    # three vertical bands, red | green | blue, in a 60x20 image: resizing the shorter side to
    # 20 and cropping 20x20 keeps the green middle alone; squashing keeps all three
    picture = Image.new("RGB", (60, 20), (255, 0, 0))
    picture.paste((0, 255, 0), (20, 0, 40, 20))
    picture.paste((0, 0, 255), (40, 0, 60, 20))
    picture.save(tmp_path / "bands.png")
    crop = open_image(tmp_path / "bands.png", 3, 16, resize=20)
    assert crop.shape == (3, 16, 16)
    assert crop[1].min() >= 250 and crop[0].max() <= 5 and crop[2].max() <= 5
    squashed = open_image(tmp_path / "bands.png", 3, 16)
    assert squashed[0, :, 0].min() >= 250 and squashed[2, :, -1].min() >= 250
