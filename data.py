"""Datasets as uint8 tensors, and the one place images are scaled to [-1, 1].

`load_dataset` returns (images, labels): images uint8 (N, C, H, W), labels int64 (N,) or None.
Splits: "test" is the dataset's test set; its training set is split in two, "val" its last
validation_size(N) images (5,000 of Fashion-MNIST's 60,000), held out of every model and classifier
so that defaults are chosen on it, and "train" the rest. The diffusion code works in [-1, 1]:
`to_model_range` is the only way in, `to_unit_range` the only way out (`save_grid` uses it to write
pictures). Nothing is ever downloaded, and nothing in a data file is ever run.

File formats:
- Fashion-MNIST, IDX files (gzipped `.gz` as Debian's dataset-fashion-mnist ships them, or raw):
  a big-endian header, magic 0x00000803 then the dims N, 28, 28 (images) or magic 0x00000801
  then N (labels), followed by exactly N*28*28 (or N) unsigned bytes. The 28x28 images are
  zero-padded to 32x32.
- CIFAR-10 binary version (cifar-10-batches-bin/data_batch_{1..5}.bin, test_batch.bin): records of
  1 label byte + 3072 pixel bytes, which are the red plane, then green, then blue, each 32x32
  row-major.
- CIFAR-10 python version (cifar-10-batches-py/data_batch_{1..5}, test_batch): a pickled dict with
  b"data", a uint8 array (N, 3072) in the same layout, and b"labels", a list of N ints. Its opcodes
  are checked first, then it is unpickled with pure-Python stand-ins for the few numpy globals it
  names.
- Image folder: every .png/.jpg/.jpeg/.bmp/.webp file under a folder (recursively, sorted by path),
  converted to RGB, shorter side resized to image_size, centre-cropped. No labels. `split` picks the
  train/ or test/ subfolder if the folder has both; otherwise it is ignored and the whole folder is
  used.
"""

import gzip
import io
import math
import os
import pickle
import pickletools
import struct
import warnings
import zlib

import numpy as np
import torch
from PIL import Image

DEFAULT_FASHION_DIR = "/usr/share/datasets/fashion-mnist"
FASHION_CLASSES = (
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
)
CIFAR10_CLASSES = (
    "airplane",
    "automobile",
    "bird",
    "cat",
    "deer",
    "dog",
    "frog",
    "horse",
    "ship",
    "truck",
)
DATASETS = ("fashion_mnist", "cifar10", "folder")
SPLITS = ("train", "val", "test")
VAL_SIZE = (
    5000  # the validation split: the last 5,000 training images, or a tenth of fewer than 50,000
)
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".webp")
PIL_FORMATS = ("PNG", "JPEG", "BMP", "WEBP")  # never EPS & co: Pillow would run Ghostscript on them

FASHION_HINT = (
    "Install it with: apt-get install dataset-fashion-mnist (Debian) "
    "or pass --data_dir DIR holding the four IDX files"
)
CIFAR_HINT = (
    "Unpack the binary or python version from https://www.cs.toronto.edu/~kriz/cifar.html yourself "
    "(nothing is downloaded here) and pass --data_dir pointing at cifar-10-batches-bin/ or -py/ "
    "or their parent"
)


class DataError(Exception):
    """A data file is missing, damaged or not in the expected format; the message names it and says
    what to do."""


def load_dataset(name, data_dir=None, split="train", image_size=32):
    """Returns (images, labels): images uint8 (N, C, H, W) with H = W = image_size; labels int64
    (N,) or None."""
    if name not in DATASETS:
        raise DataError(f"unknown dataset {name!r}: choose one of {', '.join(DATASETS)}")
    if split not in SPLITS:
        raise DataError(
            f"unknown split {split!r} for dataset {name}: choose one of {', '.join(SPLITS)}"
        )
    if name != "fashion_mnist" and data_dir is None:
        raise DataError(f"dataset {name} needs --data_dir DIR (there is no default location)")
    loader = {
        "fashion_mnist": load_fashion_mnist,
        "cifar10": load_cifar10,
        "folder": load_image_folder,
    }[name]
    images, labels = loader(
        data_dir or DEFAULT_FASHION_DIR, "test" if split == "test" else "train", image_size
    )
    if split == "test":
        return images, labels
    n_train = len(images) - validation_size(len(images))
    if split == "val" and n_train == len(images):
        raise DataError(
            f"{name} has {len(images)} training images, too few to hold out a validation split "
            f"(a tenth of them, at least one); add images or use split 'train'"
        )
    part = slice(None, n_train) if split == "train" else slice(n_train, None)
    return images[part], (labels[part] if labels is not None else None)


def validation_size(n):
    """How many of n training images form the validation split: VAL_SIZE, or n // 10 for fewer than
    10 VAL_SIZE."""
    return min(VAL_SIZE, n // 10)


def to_model_range(x_uint8):
    """uint8 pixels in [0, 255] -> float32 in [-1, 1]: x / 127.5 - 1."""
    if x_uint8.dtype != torch.uint8:
        raise TypeError(f"to_model_range expects uint8 pixels, got {x_uint8.dtype}")
    return x_uint8.float() / 127.5 - 1


def to_unit_range(x):
    """Model range [-1, 1] -> [0, 1] for saving pictures: (x + 1) / 2, clamped."""
    return ((x + 1) / 2).clamp(0, 1)


def save_grid(x, path, nrow=8, pad=2):
    """Saves images in model range [-1, 1], (B, C, H, W) with C = 1 or 3, as one PNG: nrow per row,
    white gaps."""
    x = (to_unit_range(x.detach().float().cpu()) * 255).round().to(torch.uint8)
    B, C, H, W = x.shape
    cols, rows = min(nrow, B), math.ceil(B / min(nrow, B))
    grid = torch.full((C, pad + rows * (H + pad), pad + cols * (W + pad)), 255, dtype=torch.uint8)
    for i, image in enumerate(x):
        top, left = pad + (i // cols) * (H + pad), pad + (i % cols) * (W + pad)
        grid[:, top : top + H, left : left + W] = image
    Image.fromarray(grid.permute(1, 2, 0).squeeze(-1).numpy()).save(
        path
    )  # (C, H, W) -> (H, W[, 3])


# ----------------------------------------------------------------------------- shared helpers


def loss_axis(values):
    """The y axis for a loss series: (scale, (ymin, ymax)), the limits covering every finite value
    (others ignored).

    Rule: "symlog" if the values change sign, else "log" if all are > 0 and max/min > 100 (more than
    2 decades), else "linear". A VAE's loss (the negative ELBO of a continuous likelihood) can go
    below 0, where a log axis has nothing to draw. Margins: 5% of the range (linear, symlog), 5% of
    the decades (log)."""
    v = np.asarray(values, dtype=np.float64)
    v = v[np.isfinite(v)]
    if len(v) == 0:
        return "linear", (0.0, 1.0)
    lo, hi = float(v.min()), float(v.max())
    if lo > 0 and hi / lo > 100:
        f = (hi / lo) ** 0.05  # 5% of the span in log space
        return "log", (lo / f, hi * f)
    if hi > lo:
        pad = 0.05 * (hi - lo)
    else:  # a constant series: a band around it
        pad = 0.05 * abs(lo) if lo != 0 else 0.5
    return ("symlog" if lo < 0 < hi else "linear"), (lo - pad, hi + pad)


def smooth(values, decay=None):
    """Exponential moving average with Adam's bias correction: s_t = decay s_{t-1} + (1 - decay)
    v_t, s_0 = 0, returned as s_t / (1 - decay^t), t = 1..n. Each output is a weighted mean of
    v_1..v_t with positive weights summing to 1, so it lies in [min v, max v]. Default decay: 1 -
    20/n, a time constant 1/(1 - decay) of 5% of the n points (no smoothing below 20 points)."""
    v = np.asarray(values, dtype=np.float64)
    decay = max(0.0, 1 - 20 / max(len(v), 1)) if decay is None else decay
    if not 0 <= decay < 1:
        raise ValueError(f"decay must be in [0, 1), got {decay}")
    s, out = 0.0, np.empty_like(v)
    for t, x in enumerate(v, start=1):
        s = decay * s + (1 - decay) * x
        out[t - 1] = s / (1 - decay**t)
    return out


def save_loss_curve(history, path, title):
    """A loss curve from [(step, loss), ...] to the PNG `path`: the raw series thin and faint, its
    EMA (smooth) over it, on the axis loss_axis chooses. Non-finite losses are dropped and counted
    in the title. Returns {"scale", "limits", "dropped"}."""
    h = np.asarray(history, dtype=np.float64).reshape(-1, 2)  # (n, 2): step, loss
    keep = np.isfinite(h[:, 1])
    steps, losses, dropped = h[keep, 0], h[keep, 1], int((~keep).sum())
    scale, limits = loss_axis(losses)
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3.5))
    ax.plot(steps, losses, lw=0.7, alpha=0.5, color="C0", label="logged")
    ax.plot(steps, smooth(losses), lw=1.8, color="C0", label="EMA")
    if (
        scale == "symlog"
    ):  # linear within about 1% of the largest |loss| (a power of 10), logarithmic beyond
        ax.set_yscale("symlog", linthresh=10 ** np.floor(np.log10(0.01 * np.abs(losses).max())))
        ax.axhline(0, color="gray", lw=0.5)
    else:
        ax.set_yscale(scale)
    ax.set_ylim(*limits)
    ax.set(
        xlabel="step",
        ylabel=f"loss ({scale} axis)",
        title=title
        + (f" ({dropped} non-finite value{'s' * (dropped > 1)} dropped)" if dropped else ""),
    )
    ax.legend(fontsize=8)
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return dict(scale=scale, limits=limits, dropped=dropped)


def _read_file(path, hint):
    """The bytes of a file, gunzipped if its name ends in .gz; every failure becomes a DataError
    naming it."""
    try:
        with open(path, "rb") as f:
            raw = f.read()
        return gzip.decompress(raw) if path.endswith(".gz") else raw
    except FileNotFoundError:
        raise DataError(f"{path} not found. {hint}") from None
    except (OSError, EOFError, zlib.error) as e:  # unreadable, or a damaged/truncated gzip stream
        raise DataError(f"{path}: cannot read it ({type(e).__name__}: {e}). {hint}") from None


def _require_dir(path, what, hint):
    if not os.path.isdir(path):
        raise DataError(f"{what} folder {path} not found. {hint}")


def _labels_tensor(labels, n, path):
    """n class indices 0..9 (a uint8 array, or a list of ints from a pickle) as an int64 tensor."""
    labels = labels.tolist() if isinstance(labels, np.ndarray) else labels
    if not (
        isinstance(labels, list)
        and len(labels) == n
        and all(type(v) is int and 0 <= v < 10 for v in labels)
    ):
        raise DataError(
            f"{path}: expected {n} labels that are class indices 0..9; the file is damaged"
        )
    return torch.tensor(labels, dtype=torch.int64)


# ----------------------------------------------------------------------------- Fashion-MNIST (IDX)


def load_fashion_mnist(data_dir, split, image_size):
    """(N, 1, 32, 32) uint8 images, 28x28 centred in a zero border of 2 px, and (N,) int64
    labels."""
    if image_size != 32:
        raise DataError(
            "Fashion-MNIST is 28x28 zero-padded to 32x32; "
            f"image_size={image_size} is not supported, use 32"
        )
    _require_dir(data_dir, "Fashion-MNIST", FASHION_HINT)
    prefix = "train" if split == "train" else "t10k"
    image_path = _find_idx(data_dir, f"{prefix}-images-idx3-ubyte")
    label_path = _find_idx(data_dir, f"{prefix}-labels-idx1-ubyte")
    images = _read_idx(image_path, 0x00000803, (28, 28))  # (N, 28, 28)
    labels = _read_idx(label_path, 0x00000801, ())  # (N,)
    if len(images) != len(labels):
        raise DataError(
            f"{image_path} holds {len(images)} images but {label_path} holds {len(labels)} labels: "
            f"the files do not belong together. {FASHION_HINT}"
        )
    images = np.pad(images, ((0, 0), (2, 2), (2, 2)))  # (N, 28, 28) -> (N, 32, 32), zeros around
    return torch.from_numpy(images).unsqueeze(1), _labels_tensor(labels, len(images), label_path)


def _find_idx(data_dir, base):
    """The gzipped file if present, else the raw one."""
    for path in (os.path.join(data_dir, base + ".gz"), os.path.join(data_dir, base)):
        if os.path.isfile(path):
            return path
    raise DataError(f"{os.path.join(data_dir, base)}[.gz] not found. {FASHION_HINT}")


def _read_idx(path, magic, item_shape):
    """An IDX file of unsigned bytes as a read-only uint8 array of the dims its header gives."""
    raw = _read_file(path, FASHION_HINT)
    ndim = 1 + len(item_shape)
    header = 4 + 4 * ndim  # magic, then one big-endian uint32 per dim
    if len(raw) < header:
        raise DataError(
            f"{path}: {len(raw)} bytes, shorter than the {header}-byte IDX header; "
            "the file is truncated"
        )
    found, *dims = struct.unpack(f">{1 + ndim}I", raw[:header])
    if found != magic:
        raise DataError(
            f"{path}: IDX magic is 0x{found:08x}, expected 0x{magic:08x}; wrong or damaged file"
        )
    if tuple(dims[1:]) != item_shape:
        raise DataError(
            f"{path}: items are {tuple(dims[1:])}, expected {item_shape}; not Fashion-MNIST"
        )
    if len(raw) - header != math.prod(dims):
        raise DataError(
            f"{path}: header says {' x '.join(map(str, dims))} = {math.prod(dims)} bytes of data, "
            f"the file holds {len(raw) - header}; the file is truncated or damaged"
        )
    return np.frombuffer(raw, np.uint8, offset=header).reshape(dims)


# -------------------------------------------------------------- CIFAR-10 (binary or python version)


def load_cifar10(data_dir, split, image_size):
    """(N, 3, 32, 32) uint8 images and (N,) int64 labels: 5 training batches or the test batch."""
    if image_size != 32:
        raise DataError(
            f"CIFAR-10 images are 32x32; image_size={image_size} is not supported, use 32"
        )
    folder, suffix = _find_cifar(data_dir)
    read = _read_cifar_bin if suffix == ".bin" else _read_cifar_pickle
    names = [f"data_batch_{i}" for i in range(1, 6)] if split == "train" else ["test_batch"]
    batches = [read(os.path.join(folder, name + suffix)) for name in names]
    return torch.cat([images for images, _ in batches]), torch.cat(
        [labels for _, labels in batches]
    )


def _find_cifar(data_dir):
    """(folder, suffix): data_dir itself or its batches subfolder; suffix '.bin' (binary) or ''
    (python)."""
    _require_dir(data_dir, "CIFAR-10", CIFAR_HINT)
    for folder in (
        data_dir,
        *(os.path.join(data_dir, f"cifar-10-batches-{v}") for v in ("bin", "py")),
    ):
        for suffix in (".bin", ""):
            if any(
                os.path.isfile(os.path.join(folder, n + suffix))
                for n in ("data_batch_1", "test_batch")
            ):
                return folder, suffix
    raise DataError(
        f"no CIFAR-10 batches (data_batch_1[.bin], test_batch[.bin]) in {data_dir} "
        f"or its cifar-10-batches-bin/ or cifar-10-batches-py/ subfolder. {CIFAR_HINT}"
    )


def _read_cifar_bin(path):
    """One binary batch: whole 3073-byte records of 1 label byte + 3072 pixel bytes (R, G, B
    planes)."""
    raw = _read_file(path, CIFAR_HINT)
    if len(raw) == 0 or len(raw) % 3073:
        raise DataError(
            f"{path}: {len(raw)} bytes, expected a whole number of 3073-byte records "
            f"(30730000 bytes for a full batch of 10000); the file is truncated or damaged"
        )
    records = np.frombuffer(raw, np.uint8).reshape(-1, 3073)
    images = records[:, 1:].reshape(
        -1, 3, 32, 32
    )  # (N, 3072) -> (N, C, H, W): planes are row-major
    return torch.from_numpy(images.copy()), _labels_tensor(records[:, 0], len(records), path)


def _read_cifar_pickle(path):
    """One python batch: a pickled dict with b"data", uint8 (N, 3072), and b"labels", a list of N
    ints."""
    raw = _read_file(path, CIFAR_HINT)
    try:
        _check_opcodes(raw)
        batch = _SafeUnpickler(io.BytesIO(raw), path).load()
    except DataError:
        raise
    except (
        Exception
    ) as e:  # a damaged pickle fails in many ways: UnpicklingError, EOFError, ValueError, ...
        raise DataError(
            f"{path}: not a readable CIFAR-10 python batch ({type(e).__name__}: {e}). {CIFAR_HINT}"
        ) from None
    data = batch.get(b"data") if isinstance(batch, dict) else None
    if not (
        isinstance(data, _PickledArray) and data.shape is not None and data.shape[1:] == (3072,)
    ):
        raise DataError(
            f"{path}: expected a dict whose b'data' is a uint8 array (N, 3072); "
            "not a CIFAR-10 python batch"
        )
    images = data.numpy().reshape(-1, 3, 32, 32)  # (N, 3072) -> (N, C, H, W)
    return torch.from_numpy(images), _labels_tensor(batch.get(b"labels"), len(images), path)


_REFUSED_OPCODES = {
    "INST",
    "OBJ",
    "NEWOBJ",
    "NEWOBJ_EX",
    "PERSID",
    "BINPERSID",
    "EXT1",
    "EXT2",
    "EXT4",
    "NEXT_BUFFER",
    "READONLY_BUFFER",
}  # CIFAR needs none of them


def _check_opcodes(raw):
    """Walks the pickle's opcodes without building anything (pickletools.genops), before unpickling.

    This catches what find_class cannot: a length longer than the file, or a memo index like 4e9 for
    which CPython's unpickler would allocate tens of GB. Opcodes that instantiate classes or fetch
    outside objects (persistent ids, extension codes, out-of-band buffers) are refused."""
    with warnings.catch_warnings():
        warnings.simplefilter(
            "error"
        )  # e.g. a bad escape in a protocol-0 string: an error, not a warning
        for count, (opcode, arg, _) in enumerate(pickletools.genops(raw), 1):
            if opcode.name in _REFUSED_OPCODES:
                raise ValueError(f"pickle opcode {opcode.name} is not allowed in a data file")
            if opcode.name in ("PUT", "BINPUT", "LONG_BINPUT") and arg > count:
                raise ValueError(f"memo index {arg} at opcode {count} is out of range")


class _UInt8:
    """Stands in for numpy.dtype while unpickling; only 'u1', the dtype of CIFAR's pixels, is
    accepted."""

    def __init__(self, name, align=False, copy=True):
        if name not in ("u1", b"u1"):
            raise ValueError(f"dtype {name!r} is not uint8 ('u1')")

    def __setstate__(self, state):
        pass  # (version, byte order, ...): we read the bytes as uint8 whatever the state says


class _PickledArray:
    """Stands in for a numpy array while unpickling: its uint8 bytes and shape, checked, then given
    to numpy."""

    shape = raw = None

    def __setstate__(
        self, state
    ):  # ndarray.__setstate__'s (version, shape, dtype, is_fortran, raw bytes)
        version, shape, dtype, is_fortran, raw = state
        if not (
            isinstance(shape, tuple)
            and all(type(d) is int and d >= 0 for d in shape)
            and isinstance(dtype, _UInt8)
            and not is_fortran
            and isinstance(raw, (bytes, bytearray))
            and len(raw) == math.prod(shape)
        ):
            raise ValueError("not a C-ordered uint8 array whose bytes match its shape")
        self.shape, self.raw = shape, bytearray(raw)

    def numpy(self):
        return np.frombuffer(self.raw, np.uint8).reshape(self.shape)


_NDARRAY = object()  # what the pickle's numpy.ndarray stands for: compared with, never called


def _reconstruct(subtype, shape, typecode):
    """Stands in for numpy's _reconstruct (protocols 0-4): an empty array, filled by BUILD ->
    __setstate__."""
    if subtype is not _NDARRAY:
        raise ValueError("_reconstruct may only build numpy.ndarray")
    return _PickledArray()


def _frombuffer(buf, dtype, shape, order):
    """Stands in for numpy's _frombuffer (protocol 5): an array from raw bytes."""
    array = _PickledArray()
    array.__setstate__((1, shape, dtype, order != "C", buf))
    return array


def _latin1_encode(text, encoding):
    """Stands in for codecs.encode, which protocol-2 pickles use to store bytes: str -> latin-1
    bytes only."""
    if not isinstance(text, str) or encoding not in ("latin1", "latin-1"):
        raise ValueError(
            "codecs.encode is only allowed as str -> latin1, "
            f"got {type(text).__name__}, {encoding!r}"
        )
    return text.encode("latin1")


class _SafeUnpickler(pickle.Unpickler):
    """An unpickler that knows seven globals, all pure-Python stand-ins; lists, dicts, str, bytes
    and ints need none.

    Pickle runs code only through the globals it looks up (find_class), and none of these can run
    code or even reach numpy: arrays come out as _PickledArray (bytes + shape) and numpy sees only
    checked bytes. encoding="bytes" reads the Python 2 pickles CIFAR-10 ships (keys b"data",
    b"labels")."""

    GLOBALS = {
        ("numpy.core.multiarray", "_reconstruct"): _reconstruct,  # numpy < 2 and Python 2 pickles
        ("numpy._core.multiarray", "_reconstruct"): _reconstruct,  # numpy >= 2
        ("numpy.core.numeric", "_frombuffer"): _frombuffer,
        ("numpy._core.numeric", "_frombuffer"): _frombuffer,
        ("numpy", "ndarray"): _NDARRAY,
        ("numpy", "dtype"): _UInt8,
        ("_codecs", "encode"): _latin1_encode,
    }

    def __init__(self, file, path):
        super().__init__(file, encoding="bytes")
        self.path = path

    def find_class(self, module, name):
        if (module, name) in self.GLOBALS:
            return self.GLOBALS[module, name]
        raise DataError(
            f"{self.path} tried to load the forbidden global {module}.{name}: refusing, "
            f"this code will not run code from data files. Use the genuine CIFAR-10 files"
        )


# ----------------------------------------------------------------------------- image folder


def load_image_folder(data_dir, split, image_size):
    """(N, 3, image_size, image_size) uint8 images from every image file under data_dir, and labels
    None."""
    hint = f"pass --data_dir DIR holding {'/'.join(IMAGE_EXTENSIONS)} images"
    _require_dir(data_dir, "image", hint)
    if all(os.path.isdir(os.path.join(data_dir, s)) for s in ("train", "test")):
        data_dir = os.path.join(data_dir, split)
    paths = sorted(
        os.path.join(root, f)
        for root, _, files in os.walk(data_dir)
        for f in files
        if f.lower().endswith(IMAGE_EXTENSIONS)
    )
    if not paths:
        raise DataError(f"no images found under {data_dir}; {hint}")
    images = np.stack([_read_image(p, image_size) for p in paths])  # (N, H, W, 3)
    return torch.from_numpy(images).permute(
        0, 3, 1, 2
    ).contiguous(), None  # (N, H, W, C) -> (N, C, H, W)


def _read_image(path, size):
    """One image as a (size, size, 3) uint8 array: RGB, shorter side resized to size, centre
    crop."""
    try:
        with Image.open(path, formats=PIL_FORMATS) as im:
            im = im.convert("RGB")
    except Exception as e:  # Pillow's decoders fail in many ways on damaged files
        raise DataError(
            f"{path}: cannot read this image ({type(e).__name__}: {e}); fix or remove it"
        ) from None
    scale = size / min(im.size)
    im = im.resize(
        (max(size, round(im.width * scale)), max(size, round(im.height * scale))),
        Image.Resampling.BICUBIC,
    )
    left, top = (im.width - size) // 2, (im.height - size) // 2
    return np.asarray(im.crop((left, top, left + size, top + size)))
