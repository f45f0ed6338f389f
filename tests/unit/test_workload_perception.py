"""Perception workload: fusion maths, missing modalities, training on the synthetic task, media decoding, errors."""

from __future__ import annotations

import struct
import wave
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch

from guest.workloads import synthetic
from guest.workloads.errors import BadMediaFormat, ModelDirError, OutOfMemory
from guest.workloads.media import PNG_SIGNATURE, decode_png, encode_png, read_audio, read_image, write_wav
from guest.workloads.perception import (
    ModalInputs,
    PerceptionConfig,
    PerceptionModel,
    batch_inputs,
    classify,
    load_perception,
    mel_filterbank,
    train_perception,
)
from guest.workloads.schema import MODALITIES, PerceptionRequest, PerceptionTrainRequest, PerceptionTrainResult

torch.set_num_threads(1)  # two cores shared with the VM tests


@pytest.fixture(scope="session")
def trained(tmp_path_factory: pytest.TempPathFactory) -> PerceptionTrainResult:
    out = tmp_path_factory.mktemp("perception") / "model"
    request = PerceptionTrainRequest(out_dir=str(out), train_samples=1024, test_samples=384, epochs=5, batch_size=32)
    return train_perception(request)


def small_model(heads: int = 3) -> PerceptionModel:
    torch.manual_seed(0)
    return PerceptionModel(
        PerceptionConfig(classes=synthetic.CLASSES, vocab=synthetic.VOCAB, dim=16, heads=heads)
    ).eval()


def test_fusion_output_shapes() -> None:
    model = small_model(heads=4)
    inputs, _ = batch_inputs(synthetic.make_batch(5, seed=3), MODALITIES, torch.device("cpu"))
    features = model.encode(inputs)
    assert {m: tuple(f.shape) for m, f in features.items()} == {m: (5, 32) for m in MODALITIES}
    assert tuple(model.fuse(features).shape) == (5, 16)
    assert tuple(model(inputs).shape) == (5, len(synthetic.CLASSES))
    alpha, w = model.fusion_weights(MODALITIES)
    assert tuple(alpha.shape) == (4,) and tuple(w.shape) == (4, 3)


def test_fusion_computes_the_formula() -> None:
    model = small_model()
    with torch.no_grad():  # distinct, non-uniform weights so a wrong index would show
        model.w_logits.copy_(torch.tensor([[0.5, -1.0, 2.0], [0.0, 1.0, -0.5], [1.5, 0.2, 0.1]]))
        model.alpha_logits.copy_(torch.tensor([0.3, -0.7, 1.1]))
    inputs, _ = batch_inputs(synthetic.make_batch(4, seed=5), MODALITIES, torch.device("cpu"))
    with torch.no_grad():
        features = model.encode(inputs)
        fused = model.fuse(features)
        alpha = torch.softmax(model.alpha_logits, 0)
        w = torch.softmax(model.w_logits, 1)
        expected = torch.zeros_like(fused)
        for i in range(3):  # F = Σ_i α_i Σ_m w_im F_m^(i)(x_m)
            for j, m in enumerate(MODALITIES):
                expected += alpha[i] * w[i, j] * model.project[m](features[m]).view(4, 3, 16)[:, i]
    torch.testing.assert_close(fused, expected)


def test_missing_modality_renormalises_weights_and_never_runs_its_encoder() -> None:
    model = small_model()
    with torch.no_grad():
        model.w_logits.copy_(torch.tensor([[0.5, -1.0, 2.0], [0.0, 1.0, -0.5], [1.5, 0.2, 0.1]]))
    calls = {m: 0 for m in MODALITIES}
    for m in MODALITIES:
        model.encoders[m].register_forward_hook(lambda *_, m=m: calls.__setitem__(m, calls[m] + 1))
    full, _ = batch_inputs(synthetic.make_batch(3, seed=9), MODALITIES, torch.device("cpu"))
    without_audio = ModalInputs(tokens=full.tokens, lengths=full.lengths, images=full.images)
    with torch.no_grad():
        logits = model(without_audio)
        alpha, w = model.fusion_weights(("text", "image"))
        features = model.encode(without_audio)
    assert calls == {"text": 2, "image": 2, "audio": 0}
    assert torch.isfinite(logits).all() and tuple(logits.shape) == (3, 4)
    torch.testing.assert_close(w.sum(1), torch.ones(3))
    torch.testing.assert_close(w, torch.softmax(model.w_logits[:, :2], 1))  # renormalised, not zero-filled
    assert set(features) == {"text", "image"}
    report = model.weights_report(("text", "image"))
    assert all(set(row) == {"text", "image"} and abs(sum(row.values()) - 1) < 1e-6 for row in report.w)


def test_fusion_beats_every_single_modality(trained: PerceptionTrainResult) -> None:
    assert trained.chance_accuracy < 0.45
    assert trained.test_accuracy >= 0.9
    assert set(trained.single_modality_accuracy) == set(MODALITIES)
    best_single = max(trained.single_modality_accuracy.values())
    # One cue out of three caps a single modality at 50 % in expectation; fusion needs and uses all three.
    assert best_single <= 0.65
    assert trained.test_accuracy >= best_single + 0.25
    assert len(trained.weights.alpha) == 3 and abs(sum(trained.weights.alpha) - 1) < 1e-6
    for row in trained.weights.w:
        assert set(row) == set(MODALITIES) and abs(sum(row.values()) - 1) < 1e-6 and min(row.values()) > 0


def test_classify_from_files(trained: PerceptionTrainResult, tmp_path: Path) -> None:
    batch = synthetic.make_batch(6, seed=424242)
    model = load_perception(trained.model_dir, torch.device("cpu"))
    correct = 0
    for i in range(6):
        image_path, audio_path = tmp_path / f"{i}.png", tmp_path / f"{i}.wav"
        image_path.write_bytes(encode_png((batch.images[i].transpose(1, 2, 0) * 255).round().astype(np.uint8)))
        write_wav(audio_path, batch.audio[i], synthetic.SAMPLE_RATE)
        result = classify(
            PerceptionRequest(
                model_dir=trained.model_dir,
                text=batch.captions[i],
                image_path=str(image_path),
                audio_path=str(audio_path),
            ),
            model=model,
        )
        assert abs(sum(result.probabilities.values()) - 1) < 1e-5 and result.modalities == MODALITIES
        correct += result.label == synthetic.CLASSES[batch.labels[i]]
    assert correct >= 5
    np.save(tmp_path / "img.npy", batch.images[0])  # 3xHxW float
    text_and_image = classify(
        PerceptionRequest(model_dir=trained.model_dir, text="a calm garden", image_path=str(tmp_path / "img.npy"))
    )
    assert text_and_image.modalities == ("text", "image")
    assert all(set(row) == {"text", "image"} for row in text_and_image.weights.w)
    text_only = classify(PerceptionRequest(model_dir=trained.model_dir, text="the harbour is quiet"))
    assert text_only.weights.w[0] == {"text": 1.0}


def test_mel_filterbank_puts_a_tone_in_the_right_band() -> None:
    bank = mel_filterbank(256, 32, 16000)
    assert tuple(bank.shape) == (32, 129) and float(bank.min()) >= 0 and float(bank.max()) <= 1.0 + 1e-6
    assert (bank.sum(1) > 0).all()  # no empty filter
    model = small_model()
    t = torch.arange(4000) / 16000
    low, high = (
        model.encoders["audio"].log_mel(torch.sin(2 * torch.pi * f * t)[None])[0, 0].mean(1) for f in (300.0, 2000.0)
    )
    assert int(low.argmax()) < int(high.argmax())


def _filtered_png(rgb: np.ndarray, filters: list[int], colour_type: int = 2, header_depth: int = 8) -> bytes:
    """PNG writer with explicit per-row filters, the reference the decoder is checked against."""
    channels = {0: 1, 2: 3, 6: 4}[colour_type]
    pixels = (
        rgb
        if channels == 3
        else (rgb[:, :, :1] if channels == 1 else np.dstack([rgb, np.full(rgb.shape[:2], 200, np.uint8)]))
    )
    height, width = pixels.shape[:2]
    rows, previous = [], np.zeros(width * channels, dtype=np.int64)
    for y in range(height):
        line = pixels[y].reshape(-1).astype(np.int64)
        left = np.concatenate([np.zeros(channels, np.int64), line[:-channels]])
        upper_left = np.concatenate([np.zeros(channels, np.int64), previous[:-channels]])
        kind = filters[y % len(filters)]
        if kind == 0:
            predictor = np.zeros_like(line)
        elif kind == 1:
            predictor = left
        elif kind == 2:
            predictor = previous
        elif kind == 3:
            predictor = (left + previous) // 2
        else:
            p = left + previous - upper_left
            pa, pb, pc = abs(p - left), abs(p - previous), abs(p - upper_left)
            predictor = np.where((pa <= pb) & (pa <= pc), left, np.where(pb <= pc, previous, upper_left))
        rows.append(bytes([kind]) + ((line - predictor) % 256).astype(np.uint8).tobytes())
        previous = line

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    header = struct.pack(">IIBBBBB", width, height, header_depth, colour_type, 0, 0, 0)
    return PNG_SIGNATURE + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"".join(rows))) + chunk(b"IEND", b"")


def test_png_decoder_handles_every_filter_and_colour_type() -> None:
    rgb = np.random.default_rng(0).integers(0, 256, size=(7, 5, 3), dtype=np.uint8)
    assert np.array_equal(decode_png(encode_png(rgb)), rgb)
    assert np.array_equal(decode_png(_filtered_png(rgb, [0, 1, 2, 3, 4])), rgb)
    assert np.array_equal(decode_png(_filtered_png(rgb, [4, 3, 1], colour_type=6)), rgb)  # RGBA: alpha dropped
    grey = decode_png(_filtered_png(rgb, [2, 4], colour_type=0))
    assert np.array_equal(grey, np.repeat(rgb[:, :, :1], 3, axis=2))


def test_image_and_audio_readers_accept_the_documented_formats(tmp_path: Path) -> None:
    rgb = np.random.default_rng(1).integers(0, 256, size=(4, 6, 3), dtype=np.uint8)
    (tmp_path / "a.png").write_bytes(encode_png(rgb))
    np.save(tmp_path / "b.npy", rgb)
    np.save(tmp_path / "c.npy", rgb.transpose(2, 0, 1).astype(np.float32) / 255)
    for name in ("a.png", "b.npy", "c.npy"):
        np.testing.assert_allclose(read_image(tmp_path / name), rgb / 255.0, atol=1e-6)
    tone = np.sin(np.arange(8000) / 8000 * 2 * np.pi * 440).astype(np.float32) * 0.5
    with wave.open(str(tmp_path / "stereo8k.wav"), "wb") as writer:  # stereo, 8 kHz: mixed down and resampled
        writer.setnchannels(2)
        writer.setsampwidth(2)
        writer.setframerate(8000)
        writer.writeframes(np.repeat((tone * 32767).astype("<i2"), 2).tobytes())
    audio = read_audio(tmp_path / "stereo8k.wav", 16000)
    assert audio.shape == (16000,) and abs(float(np.abs(audio).max()) - 0.5) < 0.01


def _write_bytes(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


def test_bad_media_formats_are_bad_media_format(tmp_path: Path) -> None:
    good = encode_png(np.zeros((4, 4, 3), dtype=np.uint8))
    crc_broken = bytearray(good)
    crc_broken[30] ^= 0xFF  # inside IHDR's body
    sixteen_bit = _filtered_png(np.zeros((2, 2, 3), np.uint8), [0], header_depth=16)
    bad_images = {
        "bad signature": _write_bytes(tmp_path / "jpeg.png", b"\xff\xd8\xff\xe0\x00\x10JFIF\x00" + b"\x00" * 40),
        "truncated": _write_bytes(tmp_path / "truncated.png", good[: len(good) - 20]),
        "CRC mismatch": _write_bytes(tmp_path / "crc.png", bytes(crc_broken)),
        "bit depth 16": _write_bytes(tmp_path / "sixteen.png", sixteen_bit),
        "unsupported format .bmp": _write_bytes(tmp_path / "x.bmp", b"BM" + b"\x00" * 60),
        "HxWx3": tmp_path / "shape.npy",
        "not a readable": tmp_path / "pickled.npy",
        "does not exist": tmp_path / "missing.png",
    }
    np.save(tmp_path / "shape.npy", np.zeros((4, 4, 5)))
    np.save(tmp_path / "pickled.npy", np.array([{"a": 1}], dtype=object), allow_pickle=True)
    for expected, path in bad_images.items():
        with pytest.raises(BadMediaFormat, match=expected):
            read_image(path)
    riff_float = struct.pack(
        "<4sI4s4sIHHIIHH4sI", b"RIFF", 36 + 8, b"WAVE", b"fmt ", 16, 3, 1, 16000, 64000, 4, 32, b"data", 8
    )
    bad_audio = {
        "not a PCM WAV": _write_bytes(tmp_path / "text.wav", b"this is not audio at all"),
        "not a PCM WAV file": _write_bytes(tmp_path / "float.wav", riff_float + b"\x00" * 8),
        "unsupported format .mp3": _write_bytes(tmp_path / "a.mp3", b"ID3" + b"\x00" * 40),
        "1-D waveform": tmp_path / "two_d.npy",
    }
    np.save(tmp_path / "two_d.npy", np.zeros((2, 100), np.float32))
    with wave.open(str(tmp_path / "24bit.wav"), "wb") as writer:
        writer.setnchannels(1)
        writer.setsampwidth(3)
        writer.setframerate(16000)
        writer.writeframes(b"\x00" * 30)
    bad_audio["24-bit PCM is not supported"] = tmp_path / "24bit.wav"
    for expected, path in bad_audio.items():
        with pytest.raises(BadMediaFormat, match=expected):
            read_audio(path, 16000)


def test_classify_rejects_a_bad_file_and_a_bad_model_dir(trained: PerceptionTrainResult, tmp_path: Path) -> None:
    wav_as_image = _write_bytes(tmp_path / "x.png", b"RIFF\x00\x00\x00\x00WAVEfmt ")
    with pytest.raises(BadMediaFormat):
        classify(PerceptionRequest(model_dir=trained.model_dir, image_path=str(wav_as_image)))
    with pytest.raises(ModelDirError, match="not a perception model directory"):
        classify(PerceptionRequest(model_dir=str(tmp_path), text="calm"))
    broken = tmp_path / "broken"
    broken.mkdir()
    for name in ("perception.json", "perception.pt"):
        (broken / name).write_bytes((Path(trained.model_dir) / name).read_bytes()[:100])
    with pytest.raises(ModelDirError, match="cannot load"):
        classify(PerceptionRequest(model_dir=str(broken), text="calm"))


def test_absurd_training_size_is_refused_before_allocating(tmp_path: Path) -> None:
    # The estimate guard: 10^9 samples of image+audio floats is ~28 TB, refused before any array exists.
    request = PerceptionTrainRequest(out_dir=str(tmp_path / "never"), train_samples=10**9)
    with pytest.raises(OutOfMemory, match="perception training needs about"):
        train_perception(request)
    assert not (tmp_path / "never").exists()


def test_cli_classifies_sample_files(
    trained: PerceptionTrainResult, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    import json

    from guest.workloads import __main__ as cli

    assert cli.main(["make-media-samples", str(tmp_path), "--count", "2"]) == 0
    sample = json.loads((tmp_path / "samples.json").read_text())[0]
    capsys.readouterr()
    args = ["run", "perception", "--model", trained.model_dir, "--text", sample["text"]]
    assert (
        cli.main(
            [*args, "--image", str(tmp_path / sample["image"]), "--audio", str(tmp_path / sample["audio"]), "--json"]
        )
        == 0
    )
    assert json.loads(capsys.readouterr().out)["label"] == sample["label"]
    assert cli.main([*args, "--image", str(tmp_path / sample["audio"])]) == 5
    assert "error: image" in capsys.readouterr().err
