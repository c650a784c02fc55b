"""Joint transforms keep image and mask aligned; masks are only ever resampled nearest-neighbour."""
import numpy as np
import pytest

from pipeline.train.transforms import TrainTransform


def _scene(h=90, w=120):
    image = np.zeros((h, w, 3), np.uint8)
    mask = np.zeros((h, w), np.uint8)
    image[20:50, 30:70] = (255, 0, 0)  # a red box, class 3
    mask[20:50, 30:70] = 3
    image[60:80, 85:110] = (0, 0, 255)  # a blue box, class 7 (breaks left/right symmetry)
    mask[60:80, 85:110] = 7
    mask[18:20, 30:70] = 255  # a void border above the red box
    return image, mask


@pytest.mark.parametrize("seed", range(25))
def test_shapes_land_on_the_same_pixels(seed):
    image, mask = _scene()
    t = TrainTransform(crop_size=64, min_scale=0.5, max_scale=2.0)
    img, msk = t(image, mask, np.random.default_rng(seed))
    assert img.shape == (64, 64, 3) and msk.shape == (64, 64) and img.dtype == np.uint8
    assert set(np.unique(msk)) <= {0, 3, 7, 255}  # nearest-neighbour: no new values
    for cls, channel in [(3, 0), (7, 2)]:
        in_mask = msk == cls
        in_image = img[:, :, channel] > 127
        # Bilinear (image) and nearest (mask) edges may differ by one pixel, nowhere else.
        assert not (_erode(in_mask) & ~in_image).any(), (seed, cls)
        assert not (_erode(in_image) & ~in_mask).any(), (seed, cls)


def _erode(a):
    """Pixels whose whole 3x3 neighbourhood is set (image borders count as set)."""
    p = np.pad(a, 1, constant_values=True)
    out = np.ones_like(a)
    for dy in range(3):
        for dx in range(3):
            out &= p[dy:dy + a.shape[0], dx:dx + a.shape[1]]
    return out


def test_padding_is_void_and_flip_moves_both():
    image, mask = _scene(20, 30)
    t = TrainTransform(crop_size=64, min_scale=1.0, max_scale=1.0, flip=False)
    img, msk = t(image, mask, np.random.default_rng(0))
    assert (msk[20:, :] == 255).all() and (msk[:, 30:] == 255).all()
    assert (img[20:, :] == 0).all()
    flipper = TrainTransform(crop_size=20, min_scale=1.0, max_scale=1.0)
    image, mask = image[:20, :20].copy(), mask[:20, :20].copy()
    mask[2:6, 1:4] = 5  # asymmetric content, so a flip is visible
    image[2:6, 1:4] = 77
    seen = set()
    for seed in range(20):
        i2, m2 = flipper(image, mask, np.random.default_rng(seed))
        same = np.array_equal(m2, mask)
        assert same or np.array_equal(m2, mask[:, ::-1])
        assert np.array_equal(i2, image if same else image[:, ::-1])
        seen.add(same)
    assert seen == {True, False}


def test_bad_parameters():
    with pytest.raises(ValueError):
        TrainTransform(crop_size=0)
    with pytest.raises(ValueError):
        TrainTransform(min_scale=2.0, max_scale=1.0)
