"""data.py: every format is written here, byte by byte, in tmp_path; no network and no system
dataset needed."""

import gzip
import io
import os
import pickle
import re
import struct
import sys

import numpy as np
import pytest
import torch
from PIL import Image

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from data import DataError, load_dataset, save_grid, to_model_range, to_unit_range  # noqa: E402

FUZZ_CASES = 200


# -------------------------------------------------------------------------- writers for each format


def idx_bytes(array, magic):
    """IDX: big-endian magic, big-endian uint32 dims, then the uint8 payload."""
    return (
        struct.pack(f">{1 + array.ndim}I", magic, *array.shape) + array.astype(np.uint8).tobytes()
    )


def write_fashion(folder, split="train", n=5, gz=True, seed=0):
    """Writes the images and labels IDX files of one split; returns (images (n, 28, 28), labels
    (n,))."""
    rng = np.random.default_rng(seed)
    images = rng.integers(
        1, 256, size=(n, 28, 28), dtype=np.uint8
    )  # no zeros, so the padding stands out
    labels = rng.integers(0, 10, size=n, dtype=np.uint8)
    prefix = "train" if split == "train" else "t10k"
    folder.mkdir(parents=True, exist_ok=True)
    for base, content in (
        (f"{prefix}-images-idx3-ubyte", idx_bytes(images, 0x803)),
        (f"{prefix}-labels-idx1-ubyte", idx_bytes(labels, 0x801)),
    ):
        (folder / (base + ".gz" if gz else base)).write_bytes(
            gzip.compress(content) if gz else content
        )
    return images, labels


def cifar_records(images, labels):
    """CIFAR binary: per image 1 label byte, then the R, G and B planes, each 32x32 row-major."""
    return b"".join(
        bytes([y]) + x[0].tobytes() + x[1].tobytes() + x[2].tobytes()
        for x, y in zip(images, labels)
    )


def random_cifar(n, seed):
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, size=(n, 3, 32, 32), dtype=np.uint8), rng.integers(
        0, 10, size=n
    ).tolist()


def write_cifar(folder, fmt, n=2, protocol=2):
    """Writes 5 training batches and the test batch, n images each; returns {name: (images,
    labels)}."""
    folder.mkdir(parents=True, exist_ok=True)
    batches = {}
    for seed, name in enumerate([f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]):
        images, labels = batches[name] = random_cifar(n, seed)
        if fmt == "bin":
            (folder / f"{name}.bin").write_bytes(cifar_records(images, labels))
        else:
            batch = {
                b"batch_label": b"a batch",
                b"data": images.reshape(n, 3072),
                b"labels": labels,
            }
            (folder / name).write_bytes(pickle.dumps(batch, protocol=protocol))
    return batches


def python2_pickle(data, labels):
    """The protocol-2 bytes Python 2 with numpy 1.x writes for {'data': data, 'labels': labels}, as
    CIFAR ships."""

    def text(b):  # SHORT_BINSTRING: a Python 2 str
        return b"U" + bytes([len(b)]) + b

    def integer(v):  # BININT
        return b"J" + struct.pack("<i", v)

    dtype = (
        b"cnumpy\ndtype\n"
        + text(b"u1")
        + integer(0)
        + integer(1)
        + b"\x87R"  # dtype('u1', 0, 1)
        + b"("
        + integer(3)
        + text(b"|")
        + b"NNN"
        + integer(-1)
        + integer(-1)
        + integer(0)
        + b"tb"
    )
    array = (
        b"cnumpy.core.multiarray\n_reconstruct\n"
        + b"cnumpy\nndarray\n"
        + integer(0)
        + b"\x85"
        + text(b"b")
        + b"\x87R"
        + b"("
        + integer(1)
        + integer(data.shape[0])
        + integer(data.shape[1])
        + b"\x86"
        + dtype
        + b"\x89"
        + b"T"
        + struct.pack("<I", data.nbytes)
        + data.tobytes()
        + b"tb"
    )  # BUILD with __setstate__
    label_list = b"](" + b"".join(integer(v) for v in labels) + b"e"
    return b"\x80\x02}(" + text(b"data") + array + text(b"labels") + label_list + b"u."


def png_bytes(array, fmt="PNG"):
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format=fmt)
    return buf.getvalue()


# ----------------------------------------------------------------------------- Fashion-MNIST


@pytest.mark.parametrize("gz", [True, False])
def test_fashion_pads_with_zeros_and_keeps_pixels_exactly(tmp_path, gz):
    images, labels = write_fashion(tmp_path, "train", n=5, gz=gz)
    x, y = load_dataset("fashion_mnist", str(tmp_path), "train")
    assert x.shape == (5, 1, 32, 32) and x.dtype == torch.uint8
    assert y.dtype == torch.int64 and y.tolist() == labels.tolist()
    assert torch.equal(x[:, 0, 2:30, 2:30], torch.from_numpy(images))
    border = torch.ones(32, 32, dtype=torch.bool)
    border[2:30, 2:30] = False
    assert (x[:, 0][:, border] == 0).all()


def test_the_validation_split_is_the_last_tenth_of_the_training_file_at_most_5000(tmp_path):
    # 60,000 training images give 55,000 and the last 5,000; 60 give 54 and 6; 5 are too few to hold
    # any out
    from data import validation_size

    assert (
        validation_size(60_000),
        validation_size(50_000),
        validation_size(60),
        validation_size(5),
    ) == (5000, 5000, 6, 0)
    images, labels = write_fashion(tmp_path, "train", n=60)
    (x, y), (xv, yv) = (
        load_dataset("fashion_mnist", str(tmp_path), split) for split in ("train", "val")
    )
    assert len(x) == 54 and len(xv) == 6
    assert torch.equal(torch.cat([x, xv])[:, 0, 2:30, 2:30], torch.from_numpy(images))
    assert torch.cat([y, yv]).tolist() == labels.tolist()
    small = tmp_path / "small"
    write_fashion(small, "train", n=5)
    assert len(load_dataset("fashion_mnist", str(small), "train")[0]) == 5
    with pytest.raises(DataError, match="too few to hold out a validation split"):
        load_dataset("fashion_mnist", str(small), "val")


def test_fashion_test_split_reads_the_t10k_files(tmp_path):
    write_fashion(tmp_path, "train", n=5, seed=0)
    images, labels = write_fashion(tmp_path, "test", n=3, seed=1)
    x, y = load_dataset("fashion_mnist", str(tmp_path), "test")
    assert x.shape == (3, 1, 32, 32) and torch.equal(x[:, 0, 2:30, 2:30], torch.from_numpy(images))
    assert y.tolist() == labels.tolist()


# ----------------------------------------------------------------------------- CIFAR-10


def test_cifar_binary_pixels_land_in_their_rgb_plane_row_and_column(tmp_path):
    record = bytearray([7] + [200] * 1024 + [100] * 1024 + [50] * 1024)  # label 7; R, G, B planes
    record[1 + 0 * 1024 + 0 * 32 + 1] = 11  # red,   row 0, column 1
    record[1 + 1 * 1024 + 1 * 32 + 0] = 22  # green, row 1, column 0
    record[1 + 2 * 1024 + 31 * 32 + 30] = 33  # blue, row 31, column 30
    folder = tmp_path / "cifar-10-batches-bin"
    folder.mkdir()
    (folder / "test_batch.bin").write_bytes(bytes(record) * 2)
    x, y = load_dataset("cifar10", str(tmp_path), "test")
    assert x.shape == (2, 3, 32, 32) and x.dtype == torch.uint8 and y.tolist() == [7, 7]
    assert x[0, 0, 0, 1] == 11 and x[0, 1, 1, 0] == 22 and x[1, 2, 31, 30] == 33
    assert x[0, 0, 0, 0] == 200 and x[0, 1, 0, 0] == 100 and x[0, 2, 0, 0] == 50
    assert (x == 200).sum() == 2 * 1023 and (x == 50).sum() == 2 * 1023


@pytest.mark.parametrize("fmt", ["bin", "py"])
@pytest.mark.parametrize("point_at", ["parent", "batches"])
def test_cifar_train_concatenates_five_batches_in_order(tmp_path, fmt, point_at):
    folder = tmp_path / f"cifar-10-batches-{fmt}"
    batches = write_cifar(folder, fmt, n=2)
    where = str(tmp_path if point_at == "parent" else folder)
    (x, y), (xv, yv) = (load_dataset("cifar10", where, split) for split in ("train", "val"))
    names = [f"data_batch_{i}" for i in range(1, 6)]
    assert x.shape == (9, 3, 32, 32) and xv.shape == (
        1,
        3,
        32,
        32,
    )  # the last tenth is the validation split
    assert x.dtype == torch.uint8 and y.dtype == torch.int64
    assert torch.equal(
        torch.cat([x, xv]), torch.from_numpy(np.concatenate([batches[n][0] for n in names]))
    )
    assert torch.cat([y, yv]).tolist() == sum((batches[n][1] for n in names), [])
    x, y = load_dataset("cifar10", str(folder), "test")
    assert (
        torch.equal(x, torch.from_numpy(batches["test_batch"][0]))
        and y.tolist() == batches["test_batch"][1]
    )


@pytest.mark.parametrize("protocol", range(pickle.HIGHEST_PROTOCOL + 1))
def test_cifar_python_pickles_of_every_protocol(tmp_path, protocol):
    batches = write_cifar(tmp_path, "py", n=3, protocol=protocol)
    x, y = load_dataset("cifar10", str(tmp_path), "test")
    assert (
        torch.equal(x, torch.from_numpy(batches["test_batch"][0]))
        and y.tolist() == batches["test_batch"][1]
    )


def test_cifar_python2_pickle_as_cifar_ships_it(tmp_path):
    images, labels = random_cifar(3, seed=5)
    raw = python2_pickle(images.reshape(3, 3072), labels)
    reference = pickle.loads(
        raw, encoding="bytes"
    )  # the unrestricted unpickler agrees on what the bytes mean
    assert (
        np.array_equal(reference[b"data"], images.reshape(3, 3072))
        and reference[b"labels"] == labels
    )
    (tmp_path / "test_batch").write_bytes(raw)
    x, y = load_dataset("cifar10", str(tmp_path), "test")
    assert torch.equal(x, torch.from_numpy(images)) and y.tolist() == labels


class RunsAShellCommand:
    """Unpickling this with plain pickle runs `command` through os.system."""

    def __init__(self, command):
        self.command = command

    def __reduce__(self):
        return os.system, (self.command,)


@pytest.mark.parametrize("protocol", [0, 2, pickle.HIGHEST_PROTOCOL])
def test_unpickler_refuses_os_system_and_runs_nothing(tmp_path, protocol):
    images, labels = random_cifar(2, seed=0)
    marker = tmp_path / "pwned"
    payload = pickle.dumps(
        {
            b"data": images.reshape(2, 3072),
            b"labels": labels,
            b"x": RunsAShellCommand(f"touch {marker}"),
        },
        protocol=protocol,
    )
    (tmp_path / "test_batch").write_bytes(payload)
    with pytest.raises(
        DataError, match=r"forbidden global (posix|os|nt)\.system.*will not run code"
    ):
        load_dataset("cifar10", str(tmp_path), "test")
    assert not marker.exists()
    pickle.loads(payload)  # the payload is live: plain pickle runs it
    assert marker.exists()


@pytest.mark.parametrize(
    "global_name", [b"builtins\neval", b"builtins\ngetattr", b"numpy\nload", b"subprocess\nrun"]
)
def test_unpickler_refuses_every_global_outside_the_numpy_list(tmp_path, global_name):
    (tmp_path / "test_batch").write_bytes(b"c" + global_name + b"\n(S'1'\ntR.")
    with pytest.raises(
        DataError, match="forbidden global " + global_name.decode().replace("\n", r"\.")
    ):
        load_dataset("cifar10", str(tmp_path), "test")


def test_unpickler_refuses_a_memo_index_that_would_allocate_gigabytes(tmp_path):
    # EMPTY_LIST, LONG_BINPUT 10**6: CPython's unpickler would grow its memo table to that size (4e9
    # -> 64 GB)
    (tmp_path / "test_batch").write_bytes(b"\x80\x02]r" + struct.pack("<I", 10**6) + b".")
    assert "memo index 1000000" in expect_error(
        tmp_path / "test_batch", "cifar10", str(tmp_path), "test"
    )


def test_unpickler_refuses_out_of_band_buffers(tmp_path):
    buffers = []
    data = pickle.dumps(
        {b"data": np.zeros((2, 3072), np.uint8), b"labels": [0, 1]},
        protocol=5,
        buffer_callback=buffers.append,
    )  # NEXT_BUFFER: the pixels would come from elsewhere
    (tmp_path / "test_batch").write_bytes(data)
    assert "NEXT_BUFFER" in expect_error(tmp_path / "test_batch", "cifar10", str(tmp_path), "test")


@pytest.mark.parametrize("dtype", [np.float32, np.int64, object])
def test_cifar_python_data_that_is_not_uint8_is_refused(tmp_path, dtype):
    data = np.zeros((2, 3072), dtype=dtype)
    (tmp_path / "test_batch").write_bytes(
        pickle.dumps({b"data": data, b"labels": [0, 1]}, protocol=2)
    )
    expect_error(tmp_path / "test_batch", "cifar10", str(tmp_path), "test")


# ----------------------------------------------------------------------------- image folder


def test_image_folder_resizes_crops_and_keeps_constant_colours(tmp_path):
    colours = {"a.png": (255, 0, 0), "b.png": (10, 200, 30), "sub/c.png": (0, 0, 255)}
    sizes = {"a.png": (40, 30), "b.png": (32, 32), "sub/c.png": (20, 50)}  # (H, W)
    (tmp_path / "sub").mkdir()
    for name, colour in colours.items():
        Image.new("RGB", sizes[name][::-1], colour).save(tmp_path / name)
    Image.new("L", (17, 23), 77).save(tmp_path / "d.png")  # grey -> RGB
    Image.new("RGB", (64, 48), (9, 9, 9)).save(tmp_path / "e.jpg")
    (tmp_path / "notes.txt").write_text("not an image")
    for size in (16, 32):
        x, y = load_dataset("folder", str(tmp_path), image_size=size)
        assert y is None and x.shape == (5, 3, size, size) and x.dtype == torch.uint8
        expected = {
            0: colours["a.png"],
            1: colours["b.png"],
            2: (77, 77, 77),
            4: colours["sub/c.png"],
        }
        for i, colour in expected.items():  # sorted paths: a.png b.png d.png e.jpg sub/c.png
            assert (x[i] == torch.tensor(colour, dtype=torch.uint8).view(3, 1, 1)).all()


def test_image_folder_centre_crop_takes_the_middle_of_the_long_side(tmp_path):
    stripes = np.zeros((32, 96, 3), np.uint8)
    stripes[:, 32:64] = 255  # white middle third of a wide image
    Image.fromarray(stripes).save(tmp_path / "wide.png")
    x, _ = load_dataset("folder", str(tmp_path), image_size=32)
    assert (x == 255).all()


def test_image_folder_uses_train_and_test_subfolders_when_both_exist(tmp_path):
    for split, n in (("train", 3), ("test", 2)):
        (tmp_path / split).mkdir()
        for i in range(n):
            Image.new("RGB", (8, 8), (i, i, i)).save(tmp_path / split / f"{i}.png")
    assert load_dataset("folder", str(tmp_path), "train", image_size=8)[0].shape[0] == 3
    assert load_dataset("folder", str(tmp_path), "test", image_size=8)[0].shape[0] == 2


def test_image_folder_refuses_postscript_disguised_as_png(tmp_path):
    path = tmp_path / "x.png"  # Pillow would hand EPS to Ghostscript, which runs PostScript
    path.write_bytes(b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 8 8\nshowpage\n")
    message = expect_error(path, "folder", str(tmp_path))
    assert (
        "UnidentifiedImageError" in message
    )  # never recognised as EPS, so never given to Ghostscript


# ----------------------------------------------------------------------------- model range


def test_model_range_maps_0_and_255_to_minus_one_and_one_and_round_trips():
    x = torch.arange(256, dtype=torch.uint8)
    m = to_model_range(x)
    assert (
        m.dtype == torch.float32 and m[0] == -1 and m[255] == 1 and m.min() >= -1 and m.max() <= 1
    )
    u = to_unit_range(m)
    assert (u * 255 - x.float()).abs().max() <= 255 * torch.finfo(torch.float32).eps
    assert torch.equal(torch.round(u * 255).to(torch.uint8), x)
    assert to_unit_range(torch.tensor([-3.0, 3.0])).tolist() == [0.0, 1.0]
    with pytest.raises(TypeError):
        to_model_range(m)


@pytest.mark.parametrize("channels", [1, 3])
def test_save_grid_tiles_images_row_by_row_with_white_gaps(tmp_path, channels):
    x = (
        torch.linspace(-1, 1, 5).view(5, 1, 1, 1).expand(5, channels, 4, 6)
    )  # 5 flat images, black to white
    save_grid(x, tmp_path / "grid.png", nrow=3)
    grid = np.asarray(Image.open(tmp_path / "grid.png"))
    assert grid.shape[:2] == (2 + 2 * (4 + 2), 2 + 3 * (6 + 2))  # 2 rows of 3, 2 px gaps
    assert grid.ndim == (2 if channels == 1 else 3)
    assert (
        grid[2, 2].max() == 0 and grid[2 + 6, 2 + 8].min() == 255
    )  # image 0 black, image 4 (row 1, col 1) white
    assert (grid[2 + 6, 2 + 2 * 8] == 255).all() and (
        grid[:2] == 255
    ).all()  # the missing 6th tile and the gaps
    assert (grid[2, 2 + 8] == 64).all()  # image 1: -0.5 -> 0.25 * 255 = 63.75 -> 64


# ----------------------------------------------------------------------------- clear errors


def expect_error(match, *args, **kwargs):
    with pytest.raises(DataError, match=re.escape(str(match))) as info:
        load_dataset(*args, **kwargs)
    return str(info.value)


def test_errors_name_the_missing_folder_or_file(tmp_path):
    missing = tmp_path / "nowhere"
    assert "apt-get install dataset-fashion-mnist" in expect_error(
        missing, "fashion_mnist", str(missing)
    )
    write_fashion(tmp_path, "train")
    (tmp_path / "train-labels-idx1-ubyte.gz").unlink()
    assert "--data_dir" in expect_error(
        tmp_path / "train-labels-idx1-ubyte", "fashion_mnist", str(tmp_path)
    )
    expect_error(missing, "cifar10", str(missing))
    expect_error(missing, "folder", str(missing))
    expect_error(tmp_path, "cifar10", str(tmp_path))  # a folder without CIFAR batches
    (tmp_path / "empty").mkdir()
    expect_error(tmp_path / "empty", "folder", str(tmp_path / "empty"))
    write_cifar(tmp_path / "c", "bin")
    (tmp_path / "c" / "data_batch_3.bin").unlink()
    expect_error(tmp_path / "c" / "data_batch_3.bin", "cifar10", str(tmp_path / "c"))


def test_errors_for_wrong_magic_truncation_and_count_mismatch(tmp_path):
    images_path, labels_path = (
        tmp_path / "t10k-images-idx3-ubyte",
        tmp_path / "t10k-labels-idx1-ubyte",
    )
    images, labels = np.zeros((3, 28, 28), np.uint8), np.zeros(3, np.uint8)
    labels_path.write_bytes(idx_bytes(labels, 0x801))
    images_path.write_bytes(idx_bytes(images, 0x801))
    assert "0x00000803" in expect_error(images_path, "fashion_mnist", str(tmp_path), "test")
    images_path.write_bytes(idx_bytes(images, 0x803)[:-1])
    assert "2351" in expect_error(
        images_path, "fashion_mnist", str(tmp_path), "test"
    )  # 3*28*28 - 1 bytes held
    images_path.write_bytes(idx_bytes(images, 0x803)[:10])
    expect_error(images_path, "fashion_mnist", str(tmp_path), "test")
    images_path.write_bytes(idx_bytes(images[:2], 0x803))
    message = expect_error(images_path, "fashion_mnist", str(tmp_path), "test")
    assert str(labels_path) in message and "2 images" in message and "3 labels" in message
    (tmp_path / "t10k-labels-idx1-ubyte.gz").write_bytes(
        gzip.compress(idx_bytes(labels, 0x801))[:-5]
    )
    expect_error(tmp_path / "t10k-labels-idx1-ubyte.gz", "fashion_mnist", str(tmp_path), "test")


def test_errors_for_truncated_cifar_batch_and_bad_labels(tmp_path):
    images, labels = random_cifar(2, seed=0)
    path = tmp_path / "test_batch.bin"
    path.write_bytes(cifar_records(images, labels)[:-100])
    message = expect_error(path, "cifar10", str(tmp_path), "test")
    assert "6046 bytes" in message and "3073" in message
    path.write_bytes(cifar_records(images, [3, 10]))
    expect_error(path, "cifar10", str(tmp_path), "test")


def test_errors_for_unknown_name_split_or_size(tmp_path):
    assert "fashion_mnist, cifar10, folder" in expect_error("mnist", "mnist")
    assert "train, val, test" in expect_error("valid", "fashion_mnist", str(tmp_path), "valid")
    expect_error("image_size=28", "fashion_mnist", str(tmp_path), image_size=28)
    expect_error("image_size=64", "cifar10", str(tmp_path), image_size=64)
    expect_error("--data_dir", "cifar10")


# --------------------------------------------------------------- fuzz: DataError or a valid dataset


def mutate(rng, good):
    """One damaged variant of the valid bytes `good`."""
    kind = rng.integers(5)
    if kind == 0:  # truncated at a random offset
        return good[: rng.integers(len(good))]
    if kind == 1:  # random bytes
        return rng.bytes(int(rng.integers(0, 2 * len(good))))
    if kind == 2:  # a valid prefix (the header, say), then random bytes
        cut = int(rng.integers(len(good)))
        return good[:cut] + rng.bytes(int(rng.integers(0, 2 * len(good) - cut)))
    flipped = bytearray(good)  # a few random bytes overwritten
    for i in rng.integers(len(good), size=int(rng.integers(1, 4))):
        flipped[i] = rng.integers(256)
    if kind == 3:
        return bytes(flipped)
    return good[: int(rng.integers(len(good)))] + good  # 4: a repeated chunk


def check_fuzz(name, folder, split, image_size, channels, labelled):
    """Returns 'ok' for a loaded dataset of the right shapes, 'error' for a DataError; fails on
    anything else."""
    try:
        x, y = load_dataset(name, str(folder), split, image_size)
    except DataError:
        return "error"
    except Exception as e:  # noqa: BLE001 (the point of the test)
        pytest.fail(f"{name} raised {type(e).__name__}: {e}")
    assert x.dtype == torch.uint8 and x.shape[1:] == (channels, image_size, image_size)
    if labelled:
        assert y.dtype == torch.int64 and y.shape == (len(x),) and 0 <= y.min() and y.max() < 10
    return "ok"


def fuzz(tmp_path, name, good_files, load_kwargs):
    """FUZZ_CASES folders, each holding the good files with one of them damaged (gzipped or raw
    alike)."""
    rng = np.random.default_rng(0)
    outcomes = []
    for case in range(FUZZ_CASES):
        folder = tmp_path / f"case{case}"
        folder.mkdir()
        target = list(good_files)[rng.integers(len(good_files))]
        for filename, good in good_files.items():
            content = mutate(rng, good) if filename == target else good
            if filename.endswith(".gz"):  # damage the raw content or the gzip stream itself
                content = (
                    gzip.compress(content)
                    if filename != target or rng.integers(2)
                    else mutate(rng, gzip.compress(good))
                )
            (folder / filename).write_bytes(content)
        outcomes.append(check_fuzz(name, folder, **load_kwargs))
    assert {"ok", "error"} <= set(outcomes), (
        "the fuzz should produce both loadable and broken files"
    )


@pytest.mark.parametrize("gz", [True, False])
def test_fuzz_fashion_idx(tmp_path, gz):
    images, labels = np.random.default_rng(0).integers(0, 10, size=(2, 3, 28, 28), dtype=np.uint8)
    suffix = ".gz" if gz else ""
    good = {
        f"t10k-images-idx3-ubyte{suffix}": idx_bytes(images, 0x803),
        f"t10k-labels-idx1-ubyte{suffix}": idx_bytes(labels[:, 0, 0], 0x801),
    }
    fuzz(
        tmp_path,
        "fashion_mnist",
        good,
        dict(split="test", image_size=32, channels=1, labelled=True),
    )


def test_fuzz_cifar_binary(tmp_path):
    good = {"test_batch.bin": cifar_records(*random_cifar(2, seed=0))}
    fuzz(tmp_path, "cifar10", good, dict(split="test", image_size=32, channels=3, labelled=True))


@pytest.mark.parametrize("protocol", [2, pickle.HIGHEST_PROTOCOL, "python2"])
def test_fuzz_cifar_python(tmp_path, protocol):
    images, labels = random_cifar(2, seed=0)
    data = images.reshape(2, 3072)
    raw = (
        python2_pickle(data, labels)
        if protocol == "python2"
        else pickle.dumps({b"data": data, b"labels": labels}, protocol=protocol)
    )
    fuzz(
        tmp_path,
        "cifar10",
        {"test_batch": raw},
        dict(split="test", image_size=32, channels=3, labelled=True),
    )


@pytest.mark.parametrize("fmt", ["PNG", "JPEG", "BMP", "WEBP"])
def test_fuzz_image_folder(tmp_path, fmt, monkeypatch):
    monkeypatch.setattr(
        Image, "MAX_IMAGE_PIXELS", 10**5
    )  # damaged headers may claim huge sizes: fail fast
    array = np.random.default_rng(0).integers(0, 256, size=(12, 10, 3), dtype=np.uint8)
    good = {
        "ok.png": png_bytes(array),
        f"x.{fmt.lower().replace('jpeg', 'jpg')}": png_bytes(array, fmt),
    }
    fuzz(tmp_path, "folder", good, dict(split="train", image_size=8, channels=3, labelled=False))
