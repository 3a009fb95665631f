import torch

from reslab.data.transforms import (
    InputSpec,
    augment,
    cutmix,
    random_crop,
    random_erasing,
    random_resized_crop,
    shifted,
    to_input,
)


def gen(seed=0):
    return torch.Generator().manual_seed(seed)


def test_crop_moves_each_image_by_at_most_the_padding():
    x = torch.arange(2 * 1 * 6 * 6, dtype=torch.float32).view(2, 1, 6, 6) + 1
    out = random_crop(x, 2, gen())
    assert out.shape == x.shape
    padded = torch.nn.functional.pad(x, (2,) * 4)
    for i in range(2):
        windows = [padded[i, :, dy : dy + 6, dx : dx + 6] for dy in range(5) for dx in range(5)]
        assert any(torch.equal(out[i], w) for w in windows)
    assert not torch.equal(random_crop(x, 2, gen(0)), random_crop(x, 2, gen(3)))


def test_crop_pads_with_the_fill_of_each_channel():
    x = torch.ones(64, 2, 6, 6)
    fill = torch.tensor([-1.0, -2.0])
    out = random_crop(x, 2, gen(), fill)
    for channel, value in enumerate(fill.tolist()):
        values = set(out[:, channel].unique().tolist())
        assert values == {1.0, value}  # the image and its padding, nothing else
    # the same windows as padding with zeros: only the padding's value differs
    zero = random_crop(x, 2, gen())
    assert torch.equal(out == 1, zero == 1)


def test_shifted_views_move_the_batch_and_fill_the_border():
    x = torch.arange(2 * 2 * 5 * 6, dtype=torch.float32).view(2, 2, 5, 6) + 1
    fill = torch.tensor([-1.0, -2.0])
    right, left, down, up = shifted(x, 2, fill)
    assert all(v.shape == x.shape for v in (right, left, down, up))
    assert torch.equal(right[..., 2:], x[..., :-2]) and torch.equal(left[..., :-2], x[..., 2:])
    assert torch.equal(down[..., 2:, :], x[..., :-2, :]) and torch.equal(
        up[..., :-2, :], x[..., 2:, :]
    )
    for channel, value in enumerate(fill.tolist()):
        assert (right[:, channel, :, :2] == value).all() and (
            left[:, channel, :, -2:] == value
        ).all()
        assert (down[:, channel, :2] == value).all() and (up[:, channel, -2:] == value).all()


def test_black_is_a_zero_pixel_after_normalisation():
    spec = InputSpec(
        size=4, source_size=4, channels=2, mean=(0.5, 0.2), std=(0.25, 0.1), stem="small"
    )
    black = to_input(torch.zeros(1, 2, 4, 4, dtype=torch.uint8), spec)
    torch.testing.assert_close(black[0, :, 0, 0], spec.black())


def test_erasing_zeros_a_rectangle_and_is_reproducible():
    x = torch.ones(64, 1, 28, 28)
    out = random_erasing(x, 1.0, gen())
    erased = (out == 0).flatten(1).float().mean(1)
    assert ((erased >= 0.01) & (erased <= 0.4)).all()
    rows = (out == 0).any(3).squeeze(1)  # each erased area is one band of rows ...
    assert all(torch.diff(r.nonzero().squeeze(1)).le(1).all() for r in rows)
    assert torch.equal(out, random_erasing(x, 1.0, gen()))
    assert torch.equal(random_erasing(x, 0.0, gen()), x)


def test_augment_keeps_shape_and_flips_some():
    x = torch.rand(32, 1, 8, 8)
    out = augment(x, 0, 0.0, gen())
    flipped = [torch.equal(out[i], x[i].flip(2)) for i in range(32)]
    kept = [torch.equal(out[i], x[i]) for i in range(32)]
    assert all(f or k for f, k in zip(flipped, kept, strict=True)) and 0 < sum(flipped) < 32


def test_to_input_normalises_and_resizes():
    spec = InputSpec(size=14, source_size=28, channels=1, mean=(0.5,), std=(0.25,), stem="small")
    images = torch.full((2, 1, 28, 28), 255, dtype=torch.uint8)
    x = to_input(images, spec, channels_last=True)
    assert x.shape == (2, 1, 14, 14) and x.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(x, torch.full_like(x, 2.0))
    assert InputSpec.from_dict(spec.to_dict()) == spec


def test_cutmix_pastes_one_box_from_the_shuffled_batch():
    x = torch.arange(8, dtype=torch.float32).view(8, 1, 1, 1).expand(8, 1, 12, 12) + 1
    for seed in range(5):
        out, order, lam = cutmix(x, 1.0, gen(seed))
        assert sorted(order.tolist()) == list(range(8))
        for i in range(8):
            pasted = out[i, 0] == x[order[i], 0]
            kept = out[i, 0] == x[i, 0]
            assert (pasted | kept).all()
            if order[i] != i:  # the pasted pixels are one box whose area matches lam
                assert abs(pasted.float().mean().item() - (1 - lam)) < 1e-6
                rows, cols = pasted.any(1).nonzero(), pasted.any(0).nonzero()
                box = (rows.max() - rows.min() + 1) * (cols.max() - cols.min() + 1)
                assert pasted.sum() == (box if pasted.any() else 0)
        assert torch.equal(out, cutmix(x, 1.0, gen(seed))[0])


def test_cutmix_off_leaves_the_batch_and_the_draws_alone():
    x = torch.rand(4, 1, 8, 8)
    g = gen()
    out, order, lam = cutmix(x, 0.0, g)
    assert out is x and lam == 1.0 and order.tolist() == [0, 1, 2, 3]
    assert torch.equal(g.get_state(), gen().get_state())


def test_random_resized_crop_windows_and_draws():
    x = torch.arange(4 * 16 * 16, dtype=torch.float32).view(4, 1, 16, 16).expand(4, 3, 16, 16)
    # the whole image at its own size, for a window of all of it: the identity
    whole = random_resized_crop(x, 16, gen(), scale=(1.0, 1.0), ratio=(1.0, 1.0))
    torch.testing.assert_close(whole, x)
    # a quarter of the area at ratio 1: a centred-anywhere 8x8 window stretched to 16x16,
    # so neighbouring output pixels differ by about half a pixel of the input
    out = random_resized_crop(x.to(torch.uint8), 16, gen(), scale=(0.25, 0.25), ratio=(1, 1))
    assert out.shape == (4, 3, 16, 16) and out.dtype == torch.float32
    steps = out[:, 0, 8, 1:] - out[:, 0, 8, :-1]
    assert torch.allclose(steps[:, 2:-2], torch.full_like(steps[:, 2:-2], 0.5), atol=1e-4)
    # the same generator state draws the same windows; another seed others
    again = random_resized_crop(x, 16, gen(), scale=(0.25, 0.25), ratio=(1, 1))
    other = random_resized_crop(x, 16, gen(1), scale=(0.25, 0.25), ratio=(1, 1))
    assert torch.equal(again, random_resized_crop(x, 16, gen(), scale=(0.25, 0.25), ratio=(1, 1)))
    assert not torch.equal(again, other)
