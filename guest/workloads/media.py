"""Image and audio file decoding with no imaging/audio libraries: a minimal PNG codec, stdlib ``wave`` and ``.npy``.

Everything a decoder does not understand becomes BadMediaFormat with the reason, never a numpy or zlib traceback.
"""

from __future__ import annotations

import struct
import wave
import zlib
from pathlib import Path

import numpy as np

from .errors import BadMediaFormat

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_PNG_CHANNELS = {0: 1, 2: 3, 4: 2, 6: 4}  # colour type → samples per pixel (grey, RGB, grey+alpha, RGBA)
MAX_PIXELS = 4096 * 4096


def _paeth(a: int, b: int, c: int) -> int:
    p = a + b - c
    pa, pb, pc = abs(p - a), abs(p - b), abs(p - c)
    if pa <= pb and pa <= pc:
        return a
    return b if pb <= pc else c


def _unfilter(raw: bytes, width: int, height: int, bpp: int, where: str) -> np.ndarray:
    stride = width * bpp
    if len(raw) != height * (stride + 1):
        raise BadMediaFormat(f"{where}: image data is {len(raw)} bytes, expected {height * (stride + 1)}")
    rows = np.frombuffer(raw, dtype=np.uint8).reshape(height, stride + 1)
    out = np.zeros((height, stride), dtype=np.uint8)
    previous = np.zeros(stride, dtype=np.uint8)
    for y in range(height):
        kind, line = int(rows[y, 0]), rows[y, 1:]
        if kind == 0:
            current = line.copy()
        elif kind == 1:  # Sub: a running sum per channel, mod 256
            current = (np.cumsum(line.reshape(width, bpp).astype(np.int64), axis=0) % 256).astype(np.uint8).reshape(-1)
        elif kind == 2:  # Up
            current = line + previous
        elif kind in (3, 4):  # Average / Paeth depend on the byte just decoded: sequential by nature
            values = bytearray(stride)
            for x in range(stride):
                left = values[x - bpp] if x >= bpp else 0
                up = int(previous[x])
                upper_left = int(previous[x - bpp]) if x >= bpp else 0
                predictor = (left + up) // 2 if kind == 3 else _paeth(left, up, upper_left)
                values[x] = (int(line[x]) + predictor) & 0xFF
            current = np.frombuffer(bytes(values), dtype=np.uint8)
        else:
            raise BadMediaFormat(f"{where}: unknown PNG filter type {kind} in row {y}")
        out[y] = current
        previous = current
    return out


def decode_png(data: bytes, where: str = "PNG") -> np.ndarray:
    """8-bit, non-interlaced grey/RGB/grey+alpha/RGBA PNG → HxWx3 uint8 (alpha dropped)."""
    if not data.startswith(PNG_SIGNATURE):
        raise BadMediaFormat(f"{where}: not a PNG file (bad signature)")
    offset, header, idat = len(PNG_SIGNATURE), None, bytearray()
    while True:
        if offset + 8 > len(data):
            raise BadMediaFormat(f"{where}: truncated PNG (no IEND chunk)")
        length, kind = struct.unpack(">I4s", data[offset : offset + 8])
        body = data[offset + 8 : offset + 8 + length]
        crc_bytes = data[offset + 8 + length : offset + 12 + length]
        if len(body) != length or len(crc_bytes) != 4:
            raise BadMediaFormat(f"{where}: truncated PNG chunk {kind!r}")
        if zlib.crc32(kind + body) != struct.unpack(">I", crc_bytes)[0]:
            raise BadMediaFormat(f"{where}: CRC mismatch in PNG chunk {kind!r}")
        offset += 12 + length
        if kind == b"IHDR":
            header = struct.unpack(">IIBBBBB", body)
        elif kind == b"IDAT":
            idat += body
        elif kind == b"IEND":
            break
    if header is None:
        raise BadMediaFormat(f"{where}: PNG has no IHDR chunk")
    width, height, depth, colour, _compression, _filter, interlace = header
    if depth != 8 or colour not in _PNG_CHANNELS:
        raise BadMediaFormat(
            f"{where}: unsupported PNG (bit depth {depth}, colour type {colour}); need 8-bit grey/RGB(A)"
        )
    if interlace:
        raise BadMediaFormat(f"{where}: interlaced PNG is not supported")
    if not 0 < width * height <= MAX_PIXELS:
        raise BadMediaFormat(f"{where}: PNG size {width}x{height} is out of range")
    try:
        raw = zlib.decompress(bytes(idat))
    except zlib.error as error:
        raise BadMediaFormat(f"{where}: corrupt PNG image data ({error})") from error
    channels = _PNG_CHANNELS[colour]
    pixels = _unfilter(raw, width, height, channels, where).reshape(height, width, channels)
    if channels in (1, 2):
        return np.repeat(pixels[:, :, :1], 3, axis=2)
    return np.ascontiguousarray(pixels[:, :, :3])


def encode_png(rgb: np.ndarray) -> bytes:
    """HxWx3 uint8 → PNG bytes (filter 0, for synthetic samples and tests)."""
    if rgb.ndim != 3 or rgb.shape[2] != 3 or rgb.dtype != np.uint8:
        raise ValueError("encode_png wants an HxWx3 uint8 array")
    height, width, _ = rgb.shape
    raw = b"".join(b"\x00" + rgb[y].tobytes() for y in range(height))

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return PNG_SIGNATURE + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b"")


def _load_npy(path: Path) -> np.ndarray:
    try:
        array = np.load(path, allow_pickle=False)  # no pickle: a media file must never run code
    except (ValueError, OSError, EOFError) as error:
        raise BadMediaFormat(f"{path}: not a readable .npy array ({error})") from error
    if not isinstance(array, np.ndarray) or array.dtype.kind not in "uif":
        raise BadMediaFormat(f"{path}: .npy must hold a numeric array, got dtype {getattr(array, 'dtype', '?')}")
    return array


def read_image(path: str | Path) -> np.ndarray:
    """PNG or .npy (HxWx3, 3xHxW or HxW; uint8 0–255 or float 0–1) → HxWx3 float32 in [0, 1]."""
    file = Path(path)
    if not file.is_file():
        raise BadMediaFormat(f"image {file} does not exist")
    suffix = file.suffix.lower()
    if suffix == ".png":
        return decode_png(file.read_bytes(), str(file)).astype(np.float32) / 255.0
    if suffix != ".npy":
        raise BadMediaFormat(f"image {file}: unsupported format {suffix or '(no extension)'}; use .png or .npy")
    array = _load_npy(file)
    if array.ndim == 2:
        array = np.repeat(array[:, :, None], 3, axis=2)
    elif array.ndim == 3 and array.shape[0] == 3 and array.shape[2] != 3:
        array = array.transpose(1, 2, 0)
    if array.ndim != 3 or array.shape[2] != 3:
        raise BadMediaFormat(f"image {file}: expected HxWx3, 3xHxW or HxW, got shape {array.shape}")
    scaled = array.astype(np.float32) / 255.0 if array.dtype.kind in "ui" else array.astype(np.float32)
    if not np.isfinite(scaled).all():
        raise BadMediaFormat(f"image {file}: contains NaN or infinity")
    return np.asarray(np.clip(scaled, 0.0, 1.0), dtype=np.float32)


def _resample(samples: np.ndarray, source_rate: int, target_rate: int) -> np.ndarray:
    if source_rate == target_rate or samples.size == 0:
        return samples
    duration = samples.size / source_rate
    target_times = np.arange(int(round(duration * target_rate))) / target_rate
    return np.asarray(np.interp(target_times, np.arange(samples.size) / source_rate, samples), dtype=np.float32)


def read_audio(path: str | Path, sample_rate: int) -> np.ndarray:
    """PCM WAV (8/16/32-bit, any channel count, any rate → mono at ``sample_rate``) or a 1-D .npy waveform."""
    file = Path(path)
    if not file.is_file():
        raise BadMediaFormat(f"audio {file} does not exist")
    suffix = file.suffix.lower()
    if suffix == ".npy":
        array = _load_npy(file)
        if array.ndim != 1 or array.size == 0:
            raise BadMediaFormat(f"audio {file}: expected a non-empty 1-D waveform, got shape {array.shape}")
        return np.clip(array.astype(np.float32), -1.0, 1.0)
    if suffix != ".wav":
        raise BadMediaFormat(f"audio {file}: unsupported format {suffix or '(no extension)'}; use .wav or .npy")
    try:
        with wave.open(str(file), "rb") as reader:
            channels, width, rate = reader.getnchannels(), reader.getsampwidth(), reader.getframerate()
            frames = reader.readframes(reader.getnframes())
    except (wave.Error, EOFError, struct.error) as error:
        raise BadMediaFormat(f"audio {file}: not a PCM WAV file ({error})") from error
    kinds = {1: (np.uint8, 128.0, 128.0), 2: (np.int16, 0.0, 32768.0), 4: (np.int32, 0.0, 2147483648.0)}
    if width not in kinds:
        raise BadMediaFormat(f"audio {file}: {8 * width}-bit PCM is not supported (8, 16 or 32-bit)")
    dtype, zero, scale = kinds[width]
    usable = len(frames) - len(frames) % (width * channels)
    samples = (
        np.frombuffer(frames[:usable], dtype=np.dtype(dtype).newbyteorder("<")).astype(np.float32) - zero
    ) / scale
    if samples.size == 0:
        raise BadMediaFormat(f"audio {file}: no samples")
    mono = samples.reshape(-1, channels).mean(axis=1)
    return _resample(mono, rate, sample_rate)


def write_wav(path: str | Path, samples: np.ndarray, sample_rate: int) -> None:
    pcm = (np.clip(samples, -1.0, 1.0) * 32767.0).astype("<i2")
    with wave.open(str(path), "wb") as writer:
        writer.setnchannels(1)
        writer.setsampwidth(2)
        writer.setframerate(sample_rate)
        writer.writeframes(pcm.tobytes())
