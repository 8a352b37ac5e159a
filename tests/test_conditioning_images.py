"""load_image at the boundary: every kind of file becomes upright 8-bit RGB, or an ImageInputError naming it."""

import warnings

import numpy as np
import pytest
from PIL import Image

from hyperlora.conditioning.images import ImageInputError, load_image

RED, BLUE = (220, 20, 30), (20, 40, 210)


def pixels(image):
    return np.asarray(image).astype(int)


def two_halves(width=40, height=20):
    """Left half red, right half blue: shows rotations and flips."""
    array = np.zeros((height, width, 3), np.uint8)
    array[:, : width // 2] = RED
    array[:, width // 2 :] = BLUE
    return Image.fromarray(array)


def test_grayscale_becomes_rgb_with_equal_channels(tmp_path):
    path = tmp_path / "gray.png"
    Image.fromarray(np.arange(256, dtype=np.uint8).reshape(16, 16)).save(path)
    image = load_image(path)
    assert image.mode == "RGB" and image.size == (16, 16)
    assert (pixels(image) == np.arange(256).reshape(16, 16, 1)).all()


@pytest.mark.parametrize("background", [(255, 255, 255), (127, 127, 127)])
def test_rgba_is_composited_on_the_background(tmp_path, background):
    array = np.zeros((4, 3, 4), np.uint8)
    array[:, 0] = (*RED, 255)   # opaque
    array[:, 1] = (*RED, 0)     # transparent
    array[:, 2] = (0, 0, 0, 128)  # half-transparent black
    path = tmp_path / "rgba.png"
    Image.fromarray(array, mode="RGBA").save(path)
    image = pixels(load_image(path, background=background))
    assert (image[:, 0] == RED).all(), "opaque pixels keep their colour"
    assert (image[:, 1] == background).all(), "transparent pixels show the background"
    assert np.allclose(image[:, 2], np.array(background) * 127 / 255, atol=1), "alpha 128 blends half-way"


def test_la_and_palette_transparency_use_the_background(tmp_path):
    la = Image.fromarray(np.array([[[10, 255], [10, 0]]], np.uint8), mode="LA")
    la.save(tmp_path / "la.png")
    assert pixels(load_image(tmp_path / "la.png"))[0].tolist() == [[10, 10, 10], [255, 255, 255]]

    palette = Image.new("P", (2, 1))
    palette.putpalette([*RED, *BLUE] + [0] * 762)
    palette.putdata([0, 1])
    palette.save(tmp_path / "p.png", transparency=1)
    assert pixels(load_image(tmp_path / "p.png"))[0].tolist() == [list(RED), [255, 255, 255]]


def test_16_bit_grayscale_is_scaled_not_clipped(tmp_path):
    values = np.array([[0, 257, 32896, 65535]], np.uint16)  # 8-bit 0, 1, 128, 255
    path = tmp_path / "gray16.png"
    Image.fromarray(values).save(path)
    with Image.open(path) as stored:
        assert stored.mode.startswith("I")
    assert pixels(load_image(path))[0, :, 0].tolist() == [0, 1, 128, 255]


def test_32_bit_integer_and_float_images(tmp_path):
    Image.fromarray(np.array([[0, 65535]], np.int32), mode="I").save(tmp_path / "i32.tif")
    assert pixels(load_image(tmp_path / "i32.tif"))[0, :, 0].tolist() == [0, 255]
    Image.fromarray(np.array([[0.0, 0.5, 1.0, 2.0]], np.float32), mode="F").save(tmp_path / "f.tif")
    assert pixels(load_image(tmp_path / "f.tif"))[0, :, 0].tolist() == [0, 128, 255, 255]


def test_16_bit_rgb_keeps_its_colours(tmp_path):
    cv2 = pytest.importorskip("cv2")
    rgb16 = np.zeros((2, 2, 3), np.uint16)
    rgb16[..., 0], rgb16[..., 2] = 65535, 257 * 100
    cv2.imwrite(str(tmp_path / "rgb16.png"), rgb16[..., ::-1])
    assert (pixels(load_image(tmp_path / "rgb16.png")) == (255, 0, 100)).all()


def test_cmyk_becomes_rgb(tmp_path):
    Image.new("CMYK", (3, 3), (255, 0, 0, 0)).save(tmp_path / "cmyk.tif")  # pure cyan ink
    Image.new("CMYK", (8, 8), (0, 255, 255, 0)).save(tmp_path / "cmyk.jpg", quality=95)  # red ink
    assert (pixels(load_image(tmp_path / "cmyk.tif")) == (0, 255, 255)).all()
    assert np.allclose(pixels(load_image(tmp_path / "cmyk.jpg")), (255, 0, 0), atol=8)


@pytest.mark.parametrize(
    "orientation, top_colour, size", [(1, None, (40, 20)), (6, RED, (20, 40)), (8, BLUE, (20, 40))]
)
def test_exif_orientation_is_applied(tmp_path, orientation, top_colour, size):
    path = tmp_path / "rotated.jpg"
    exif = Image.Exif()
    exif[0x0112] = orientation
    two_halves().save(path, exif=exif, quality=95)
    image = load_image(path)
    assert image.size == size
    if top_colour is not None:  # 6: rotate 90 clockwise for display, so the stored left edge goes on top
        assert np.allclose(pixels(image)[2, 10], top_colour, atol=12)


def test_multi_frame_gif_gives_the_first_frame(tmp_path):
    frames = [Image.new("RGB", (4, 4), colour) for colour in (RED, BLUE)]
    frames[0].save(tmp_path / "anim.gif", save_all=True, append_images=frames[1:])
    assert np.allclose(pixels(load_image(tmp_path / "anim.gif")), RED, atol=8)


def test_large_jpeg_is_decoded_at_reduced_scale_and_bounded(tmp_path):
    path = tmp_path / "large.jpg"
    big = two_halves(3000, 2000)
    big.save(path, quality=90)
    image = load_image(path, max_side=512)
    assert image.mode == "RGB" and image.size == (512, 341)
    reference = big.resize((512, 341), Image.Resampling.LANCZOS)
    assert np.abs(pixels(image) - pixels(reference)).mean() < 3

    with Image.open(path) as opened:  # draft decodes 3000x2000 at 1/4 scale, still above 512
        opened.draft("RGB", (512, 341))
        assert opened.size == (750, 500)
    with Image.open(path) as opened:  # a lazily opened image handed to us is not drafted in place
        assert load_image(opened, max_side=512).size == (512, 341) and opened.size == (3000, 2000)


def test_small_images_keep_their_size(tmp_path):
    two_halves().save(tmp_path / "small.png")
    assert load_image(tmp_path / "small.png", max_side=40).size == (40, 20)
    assert load_image(tmp_path / "small.png", max_side=10).size == (10, 5)


def test_too_many_pixels_is_refused_without_pil_warnings(tmp_path, monkeypatch):
    path = tmp_path / "big.png"
    Image.new("RGB", (300, 200)).save(path)
    with pytest.raises(ImageInputError, match=r"big\.png.*300x200.*max_pixels"):
        load_image(path, max_pixels=10_000)

    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 40_000)  # 60,000 px: above PIL's warning level
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert load_image(path).size == (300, 200)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 20_000)  # above twice the limit: PIL refuses
    with pytest.raises(ImageInputError, match=r"big\.png.*decompression bomb"):
        load_image(path)


def test_truncated_file_is_a_clear_error(tmp_path):
    path = tmp_path / "truncated.jpg"
    two_halves(200, 200).save(path, quality=90)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(ImageInputError, match=r"truncated\.jpg.*(corrupt|truncated)"):
        load_image(path)


def test_corrupt_png_data_is_a_clear_error(tmp_path):
    path = tmp_path / "corrupt.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(path)
    data = bytearray(path.read_bytes())
    data[200:260] = bytes(60)  # zero a stretch of the compressed pixel data
    path.write_bytes(bytes(data))
    with pytest.raises(ImageInputError, match=r"corrupt\.png"):
        load_image(path)


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda p: p.write_text("not an image at all"), "not an image file"),
        (lambda p: p.write_bytes(b""), "empty"),
        (lambda p: p.mkdir(), "directory"),
        (lambda p: None, "no such file"),
    ],
)
def test_unusable_paths_name_the_file_and_the_problem(tmp_path, make, message):
    path = tmp_path / "photo.jpg"
    make(path)
    with pytest.raises(ImageInputError, match=rf"photo\.jpg.*{message}"):
        load_image(str(path))


def test_pil_input_is_converted_and_left_untouched():
    original = Image.new("RGBA", (3000, 10), (*RED, 0))
    image = load_image(original, max_side=300)
    assert image.size == (300, 1) and image.mode == "RGB"
    assert (pixels(image) == 255).all()
    assert original.mode == "RGBA" and original.size == (3000, 10)

    rgb = Image.new("RGB", (5, 5), RED)
    assert load_image(rgb) is not rgb


def test_arrays_bytes_and_file_objects_load_as_rgb_and_bad_sources_fail_clearly(tmp_path):
    import io

    from PIL import Image

    from hyperlora.conditioning.images import ImageInputError

    rgb = np.zeros((20, 30, 3), np.uint8)
    rgb[..., 0] = 200
    assert load_image(rgb).getpixel((0, 0)) == (200, 0, 0)
    assert load_image(rgb.astype(np.float32) / 255).getpixel((0, 0)) == (200, 0, 0)
    assert load_image((rgb.astype(np.uint16) * 257)).getpixel((0, 0)) == (200, 0, 0)
    assert load_image(np.ones((4, 4), bool)).getpixel((0, 0)) == (255, 255, 255)
    assert load_image(np.zeros((4, 4, 4), np.uint8)).mode == "RGB"  # transparent: composited on white
    buffer = io.BytesIO()
    Image.fromarray(rgb).save(buffer, format="PNG")
    assert load_image(buffer.getvalue()).size == (30, 20)
    buffer.seek(0)
    assert load_image(buffer).size == (30, 20)
    with pytest.raises(ImageInputError, match="H x W"):
        load_image(np.zeros((3, 20, 30), np.uint8))
    with pytest.raises(ImageInputError, match=r"\[0, 1\]"):
        load_image(rgb.astype(np.float32))
    with pytest.raises(ImageInputError, match="not an image file"):
        load_image(b"not an image")
    with pytest.raises(ImageInputError, match="not an image source"):
        load_image(12345)
