import io
import os
import struct
import subprocess
import sys
import zlib


import numpy as np
import pytest
from PIL import Image

from hashsearch.encoders import images
from hashsearch.encoders.images import ImageRejected, image_from_array, is_image_name, load_image
from hashsearch.errors import HashsearchError


def _save(img, path, **kw):
    img.save(path, **kw)
    return str(path)


def _loads_rgb(path, size):
    im = load_image(path)
    assert im.mode == "RGB" and im.size == size
    return np.asarray(im)


def test_grayscale_and_palette(tmp_path):
    a = _loads_rgb(_save(Image.new("L", (8, 6), 77), tmp_path / "g.png"), (8, 6))
    assert (a == 77).all()
    pal = Image.new("RGB", (5, 5), (10, 200, 30)).convert("P", palette=Image.Palette.ADAPTIVE)
    a = _loads_rgb(_save(pal, tmp_path / "p.gif"), (5, 5))
    assert tuple(a[0, 0]) == (10, 200, 30)


def test_rgba_composited_on_white(tmp_path):
    im = Image.new("RGBA", (4, 4), (255, 0, 0, 0))
    im.putpixel((0, 0), (0, 0, 255, 255))
    a = _loads_rgb(_save(im, tmp_path / "a.png"), (4, 4))
    assert tuple(a[1, 1]) == (255, 255, 255) and tuple(a[0, 0]) == (0, 0, 255)


def test_cmyk_jpeg(tmp_path):
    a = _loads_rgb(_save(Image.new("CMYK", (8, 8), (0, 255, 255, 0)), tmp_path / "c.jpg"), (8, 8))
    assert a[..., 0].mean() > 200 and a[..., 1].mean() < 60  # red


def test_16bit_png_scaled_not_clipped(tmp_path):
    arr = np.full((4, 6), 65535 // 2, dtype=np.uint16)
    path = _save(Image.fromarray(arr), tmp_path / "deep.png")
    with Image.open(path) as raw:
        assert raw.mode.startswith("I")
    a = _loads_rgb(path, (6, 4))
    assert abs(int(a[0, 0, 0]) - 127) <= 1


def test_exif_rotation_applied(tmp_path):
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees on display
    path = _save(Image.new("RGB", (40, 20), "green"), tmp_path / "r.jpg", exif=exif)
    assert load_image(path).size == (20, 40)


def test_gif_first_frame(tmp_path):
    frames = [Image.new("RGB", (6, 6), c) for c in ("red", "blue")]
    path = _save(frames[0], tmp_path / "anim.gif", save_all=True, append_images=frames[1:])
    assert tuple(np.asarray(load_image(path))[0, 0]) == (255, 0, 0)


@pytest.mark.parametrize("content, reason", [
    (None, "missing file"),
    (b"", "empty file"),
    (b"hello, I am text\n" * 10, "not an image"),
])
def test_rejects_unusable_files(tmp_path, content, reason):
    path = tmp_path / "x.jpg"
    if content is not None:
        path.write_bytes(content)
    with pytest.raises(ImageRejected, match=reason):
        load_image(str(path))


def test_truncated_jpeg_rejected(tmp_path):
    buf = io.BytesIO()
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(buf, "JPEG")
    path = tmp_path / "cut.jpg"
    path.write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
    with pytest.raises(ImageRejected, match="truncated"):
        load_image(str(path))


def _png_declaring(path, width, height):
    """A tiny valid 1-bit PNG whose header claims width x height pixels."""
    buf = io.BytesIO()
    Image.new("1", (1, 1)).save(buf, "PNG")
    data = bytearray(buf.getvalue())
    start = 8 + 8  # signature, then IHDR length + type
    data[start:start + 8] = struct.pack(">II", width, height)
    data[start + 13:start + 17] = struct.pack(">I", zlib.crc32(bytes(data[start - 4:start + 13])))
    path.write_bytes(bytes(data))
    return str(path)


def test_decompression_bomb_header_rejected(tmp_path):
    with pytest.raises(ImageRejected, match="too many pixels"):
        load_image(_png_declaring(tmp_path / "bomb.png", 50_000, 50_000))


@pytest.mark.parametrize("side", [110, 200])  # between MAX and 2*MAX (PIL warns), and above (PIL raises)
def test_pixel_limit_enforced(tmp_path, monkeypatch, side):
    monkeypatch.setattr(images, "MAX_PIXELS", 10_000)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", Image.MAX_IMAGE_PIXELS)  # restored afterwards
    path = _save(Image.new("RGB", (side, side)), tmp_path / "big.png")
    with pytest.raises(ImageRejected, match="too many pixels"):
        load_image(path)
    assert load_image(_save(Image.new("RGB", (100, 100)), tmp_path / "ok.png")).size == (100, 100)


def test_image_from_array():
    assert image_from_array(np.zeros((3, 5), np.uint8)).mode == "RGB"
    im = image_from_array(np.full((3, 5, 3), 9, np.uint8))
    assert im.size == (5, 3) and np.asarray(im).max() == 9
    with pytest.raises(HashsearchError, match=r"expected a uint8 HxW or HxWx3 array, got float32 \(3, 5\)"):
        image_from_array(np.zeros((3, 5), np.float32))


def test_extensions():
    assert is_image_name("A.JPEG") and is_image_name("b.webp") and not is_image_name("notes.txt")


# -- decode_file: the torchvision fast path must match the PIL path exactly ----------------------------
def _jpeg(path, size, mode="RGB", seed=0):
    rng = np.random.default_rng(seed)
    shape = (size, size, 3) if mode == "RGB" else (size, size)
    Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8), mode).save(path, quality=90)
    return str(path)


def _pil_calls(monkeypatch) -> list:
    """Count decode_file's trips through PIL, the path every image can take (the fast one is for some JPEGs)."""
    from hashsearch.encoders import preprocess
    calls, decode = [], preprocess.decode_image
    monkeypatch.setattr(preprocess, "decode_image", lambda data: calls.append(len(data)) or decode(data))
    return calls


@pytest.mark.parametrize("mode", ["RGB", "L"])
def test_decode_file_fast_path_matches_pil(tmp_path, mode, monkeypatch):
    import torch
    from hashsearch.encoders import preprocess
    path = _jpeg(tmp_path / "a.jpg", 32, mode)
    slow = preprocess.to_uint8_tensor(load_image(path), 32)
    pil = _pil_calls(monkeypatch)
    assert torch.equal(preprocess.decode_file(path, 32), slow)
    assert pil == []                                         # already at the size: the fast path, PIL's pixels


def test_decode_file_falls_back_to_pil(tmp_path, monkeypatch):
    import torch
    from hashsearch.encoders import preprocess
    pil = _pil_calls(monkeypatch)
    other = _jpeg(tmp_path / "b.jpg", 40)
    assert torch.equal(preprocess.decode_file(other, 32), preprocess.to_uint8_tensor(load_image(other), 32))
    assert len(pil) == 1                                     # needs a resize: PIL path
    whole = open(_jpeg(tmp_path / "c.jpg", 32), "rb").read()
    cut = tmp_path / "cut.jpg"
    cut.write_bytes(whole[: len(whole) // 2])
    with pytest.raises(ImageRejected, match="truncated"):
        preprocess.decode_file(str(cut), 32)
    assert len(pil) == 2                                     # truncated: PIL decides, and rejects it


def _special_file(tmp_path, kind: str) -> str:
    """Something named like an image that is no regular file: reading it would block, or never end."""
    path = tmp_path / kind / "x.jpg"
    path.parent.mkdir()
    if kind == "FIFO":
        os.mkfifo(path)             # opening it waits for a writer that never comes
    elif kind == "device":
        path.symlink_to("/dev/zero")    # reads forever
    else:
        path.mkdir()
    return str(path)


@pytest.mark.parametrize("kind", ["FIFO", "device", "directory"])
def test_special_files_are_rejected_with_their_kind(tmp_path, kind):
    with pytest.raises(ImageRejected, match=f"x.jpg is a {kind}"):
        load_image(_special_file(tmp_path, kind))


def test_decode_file_refuses_special_files_before_reading(tmp_path):
    # decode_file's JPEG fast path reads the file itself; before the fix a FIFO blocked it forever and
    # /dev/zero was read until memory ran out, so this runs in a child bounded in time and memory.
    paths = [_special_file(tmp_path, kind) for kind in ("FIFO", "device", "directory")]
    code = f"""
import resource
from hashsearch.encoders.images import ImageRejected
from hashsearch.encoders.preprocess import decode_file
vm = next(int(line.split()[1]) * 1024 for line in open("/proc/self/status") if line.startswith("VmSize"))
resource.setrlimit(resource.RLIMIT_AS, (vm + (1 << 30), vm + (1 << 30)))
for path in {paths!r}:
    try:
        decode_file(path, 32)
    except ImageRejected as exc:
        print(exc)
"""
    child = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert child.returncode == 0, child.stderr
    assert child.stdout.splitlines() == [f"{p} is a {kind}" for p, kind in zip(paths, ("FIFO", "device", "directory"))]


def test_files_over_the_byte_limit_are_rejected(tmp_path, monkeypatch):
    path = _save(Image.new("RGB", (64, 64)), tmp_path / "big.png")
    size = os.path.getsize(path)
    monkeypatch.setattr(images, "MAX_BYTES", size - 1)
    with pytest.raises(ImageRejected, match=f"larger than {size - 1} bytes"):
        load_image(path)
    monkeypatch.setattr(images, "MAX_BYTES", size)
    assert load_image(path).size == (64, 64)
