"""Multimodal perception: F_i = w_t·F_t(x_t) + w_v·F_v(x_v) + w_a·F_a(x_a),  F = Σ_i α_i·F_i.

What each symbol is here:
- F_t, F_v, F_a: a text encoder (word embedding + GRU over the caption), an image encoder (small CNN) and an audio
  encoder (log-mel spectrogram computed in torch — STFT + a mel filterbank built here — then a small CNN). Each
  backbone feeds, for every head i, its own linear projection into the shared D-dimensional space; F_m(x_m) in
  head i is that projection, so heads can look at different directions of the same features.
- i = 1..K ranges over K fusion heads ("views"). Head i has its own modality weights w_i = softmax over the present
  modalities of learnable logits (so each row is positive and sums to 1).
- α = softmax over the K heads of learnable logits; F = Σ_i α_i F_i goes to a small MLP classifier.
- A missing modality is not replaced by zeros: its encoder is never called and w_i is renormalised over the
  modalities that are present (softmax over their logits only).
Weights are only identifiable up to the projections' scale (a projection can grow to offset a small w), so the
learned α and w say how the model mixes views, not a calibrated importance.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from . import synthetic
from .errors import ModelDirError
from .media import read_audio, read_image
from .runtime import oom_guard, require_memory, resolve_device
from .schema import (
    MODALITIES,
    FusionWeights,
    PerceptionEpoch,
    PerceptionRequest,
    PerceptionResult,
    PerceptionTrainRequest,
    PerceptionTrainResult,
)

WEIGHTS_FILE, CONFIG_FILE = "perception.pt", "perception.json"
EpochCallback = Callable[[PerceptionEpoch], None]


@dataclass(frozen=True)
class PerceptionConfig:
    classes: tuple[str, ...]
    vocab: tuple[str, ...]
    dim: int = 32
    heads: int = 3
    feature_dim: int = 32
    image_size: int = synthetic.IMAGE_SIZE
    sample_rate: int = synthetic.SAMPLE_RATE
    audio_samples: int = int(synthetic.SAMPLE_RATE * synthetic.AUDIO_SECONDS)
    n_fft: int = 256
    hop: int = 128
    n_mels: int = 32


def mel_filterbank(n_fft: int, n_mels: int, sample_rate: int) -> torch.Tensor:
    """(n_mels, n_fft // 2 + 1) triangular filters evenly spaced on the HTK mel scale from 0 Hz to Nyquist."""

    def to_mel(hz: np.ndarray) -> np.ndarray:
        return 2595.0 * np.log10(1.0 + hz / 700.0)

    def to_hz(mel: np.ndarray) -> np.ndarray:
        return 700.0 * (10.0 ** (mel / 2595.0) - 1.0)

    bins = np.linspace(0.0, sample_rate / 2, n_fft // 2 + 1)
    edges = to_hz(np.linspace(0.0, to_mel(np.asarray(sample_rate / 2.0)), n_mels + 2))
    lower, centre, upper = edges[:-2, None], edges[1:-1, None], edges[2:, None]
    rising = (bins[None, :] - lower) / (centre - lower)
    falling = (upper - bins[None, :]) / (upper - centre)
    return torch.from_numpy(np.clip(np.minimum(rising, falling), 0.0, None).astype(np.float32))


class LogMel(nn.Module):
    window: torch.Tensor
    mel: torch.Tensor

    def __init__(self, config: PerceptionConfig) -> None:
        super().__init__()
        self.n_fft, self.hop = config.n_fft, config.hop
        # Derived from the config, so not saved in the state dict.
        self.register_buffer("window", torch.hann_window(config.n_fft), persistent=False)
        self.register_buffer("mel", mel_filterbank(config.n_fft, config.n_mels, config.sample_rate), persistent=False)

    def forward(self, audio: torch.Tensor) -> torch.Tensor:  # (B, T) → (B, 1, n_mels, frames)
        spectrum = torch.stft(audio, self.n_fft, self.hop, window=self.window, return_complex=True)
        power = spectrum.real**2 + spectrum.imag**2
        return torch.log(torch.matmul(self.mel, power) + 1e-6).unsqueeze(1)


def _cnn(in_channels: int, features: int) -> nn.Sequential:
    # BatchNorm after each conv: without it the shape cue took several extra epochs to appear.
    return nn.Sequential(
        nn.Conv2d(in_channels, 16, 3, padding=1),
        nn.BatchNorm2d(16),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(16, 32, 3, padding=1),
        nn.BatchNorm2d(32),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(32, features, 3, padding=1),
        nn.BatchNorm2d(features),
        nn.ReLU(),
        nn.AdaptiveMaxPool2d(1),
        nn.Flatten(),
    )


class TextEncoder(nn.Module):
    def __init__(self, config: PerceptionConfig) -> None:
        super().__init__()
        self.embed = nn.Embedding(len(config.vocab), config.feature_dim, padding_idx=0)
        self.gru = nn.GRU(config.feature_dim, config.feature_dim, batch_first=True)

    def forward(self, tokens: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        packed = nn.utils.rnn.pack_padded_sequence(
            self.embed(tokens), lengths.cpu(), batch_first=True, enforce_sorted=False
        )
        _, hidden = self.gru(packed)  # the last real token's state, padding never enters the recurrence
        last: torch.Tensor = hidden[-1]
        return last


class AudioEncoder(nn.Module):
    def __init__(self, config: PerceptionConfig) -> None:
        super().__init__()
        self.log_mel = LogMel(config)
        self.norm = nn.BatchNorm2d(1)  # log-mel values sit around -10..5: normalise before the CNN
        self.cnn = _cnn(1, config.feature_dim)

    def forward(self, audio: torch.Tensor) -> torch.Tensor:
        features: torch.Tensor = self.cnn(self.norm(self.log_mel(audio)))
        return features


@dataclass
class ModalInputs:
    tokens: torch.Tensor | None = None
    lengths: torch.Tensor | None = None
    images: torch.Tensor | None = None
    audio: torch.Tensor | None = None

    def present(self) -> tuple[str, ...]:
        given = {"text": self.tokens is not None, "image": self.images is not None, "audio": self.audio is not None}
        return tuple(m for m in MODALITIES if given[m])


class PerceptionModel(nn.Module):
    def __init__(self, config: PerceptionConfig) -> None:
        super().__init__()
        self.config = config
        self.encoders = nn.ModuleDict(
            {"text": TextEncoder(config), "image": _cnn(3, config.feature_dim), "audio": AudioEncoder(config)}
        )
        k, d = config.heads, config.dim
        # One projection per (modality, head), stored as a K·D-wide linear layer per modality.
        self.project = nn.ModuleDict({m: nn.Linear(config.feature_dim, k * d) for m in MODALITIES})
        self.w_logits = nn.Parameter(torch.zeros(k, len(MODALITIES)))
        self.alpha_logits = nn.Parameter(torch.zeros(k))
        self.classifier = nn.Sequential(nn.Linear(d, 64), nn.ReLU(), nn.Linear(64, len(config.classes)))

    def fusion_weights(self, present: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """α (K,) and w (K, len(present)): w renormalised over the present modalities only."""
        columns = [MODALITIES.index(m) for m in present]
        return torch.softmax(self.alpha_logits, 0), torch.softmax(self.w_logits[:, columns], 1)

    def encode(self, inputs: ModalInputs) -> dict[str, torch.Tensor]:
        features: dict[str, torch.Tensor] = {}
        if inputs.tokens is not None:
            lengths = inputs.lengths if inputs.lengths is not None else (inputs.tokens != 0).sum(1)
            features["text"] = self.encoders["text"](inputs.tokens, lengths)
        if inputs.images is not None:
            features["image"] = self.encoders["image"](inputs.images)
        if inputs.audio is not None:
            features["audio"] = self.encoders["audio"](inputs.audio)
        return features

    def fuse(self, features: dict[str, torch.Tensor]) -> torch.Tensor:
        present = [m for m in MODALITIES if m in features]
        if not present:
            raise ValueError("fusion needs at least one modality")
        alpha, w = self.fusion_weights(present)
        batch, k, d = next(iter(features.values())).shape[0], self.config.heads, self.config.dim
        projected = torch.stack([self.project[m](features[m]).view(batch, k, d) for m in present], dim=2)
        per_head = (w[None, :, :, None] * projected).sum(2)  # F_i, (B, K, D)
        return (alpha[None, :, None] * per_head).sum(1)  # F, (B, D)

    def forward(self, inputs: ModalInputs) -> torch.Tensor:
        logits: torch.Tensor = self.classifier(self.fuse(self.encode(inputs)))
        return logits

    def weights_report(self, present: Sequence[str] = MODALITIES) -> FusionWeights:
        with torch.no_grad():
            alpha, w = self.fusion_weights(present)
        rows = tuple({m: float(v) for m, v in zip(present, row.tolist(), strict=True)} for row in w)
        return FusionWeights(alpha=tuple(float(a) for a in alpha.tolist()), w=rows)


def batch_inputs(
    batch: synthetic.Batch, modalities: Sequence[str], device: torch.device
) -> tuple[ModalInputs, torch.Tensor]:
    inputs = ModalInputs()
    if "text" in modalities:
        inputs.tokens, inputs.lengths = torch.from_numpy(batch.tokens).to(device), torch.from_numpy(batch.lengths)
    if "image" in modalities:
        inputs.images = torch.from_numpy(batch.images).to(device)
    if "audio" in modalities:
        inputs.audio = torch.from_numpy(batch.audio).to(device)
    return inputs, torch.from_numpy(batch.labels).to(device)


def _slice(inputs: ModalInputs, rows: torch.Tensor) -> ModalInputs:
    def pick(tensor: torch.Tensor | None) -> torch.Tensor | None:
        return None if tensor is None else tensor[rows.to(tensor.device)]

    return ModalInputs(pick(inputs.tokens), pick(inputs.lengths), pick(inputs.images), pick(inputs.audio))


def accuracy(model: PerceptionModel, inputs: ModalInputs, labels: torch.Tensor, batch_size: int = 256) -> float:
    model.eval()
    correct = 0
    with torch.no_grad():
        for start in range(0, labels.shape[0], batch_size):
            rows = torch.arange(start, min(start + batch_size, labels.shape[0]))
            correct += int((model(_slice(inputs, rows)).argmax(1) == labels[rows.to(labels.device)]).sum())
    return correct / labels.shape[0]


def _fit(
    config: PerceptionConfig,
    request: PerceptionTrainRequest,
    train: tuple[ModalInputs, torch.Tensor],
    name: str,
    device: torch.device,
    on_epoch: EpochCallback | None,
) -> PerceptionModel:
    torch.manual_seed(request.seed)
    model = PerceptionModel(config).to(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=request.lr)
    inputs, labels = train
    order_rng = torch.Generator().manual_seed(request.seed)
    for epoch in range(request.epochs):
        model.train()
        order = torch.randperm(labels.shape[0], generator=order_rng)
        total_loss, correct = 0.0, 0
        for start in range(0, labels.shape[0], request.batch_size):
            rows = order[start : start + request.batch_size]
            logits = model(_slice(inputs, rows))
            loss = F.cross_entropy(logits, labels[rows.to(device)])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()  # type: ignore[no-untyped-call]
            optimizer.step()
            total_loss += loss.item() * rows.shape[0]
            correct += int((logits.argmax(1) == labels[rows.to(device)]).sum())
        if on_epoch is not None:
            count = labels.shape[0]
            on_epoch(
                PerceptionEpoch(model=name, epoch=epoch + 1, loss=total_loss / count, train_accuracy=correct / count)
            )
    return model.eval()


def _training_bytes(request: PerceptionTrainRequest, config: PerceptionConfig) -> int:
    """Coarse: float32 dataset arrays plus ~40 activation copies of one batch's inputs (CNN channels, gradients)."""
    per_sample = 4 * (3 * config.image_size**2 + config.audio_samples)
    return (request.train_samples + request.test_samples) * per_sample + 40 * request.batch_size * per_sample


def _majority_rate(labels: np.ndarray, classes: int) -> float:
    """Accuracy of always answering the most common class: the honest chance level for unbalanced labels."""
    return float(np.bincount(labels, minlength=classes).max() / labels.size)


def train_perception(request: PerceptionTrainRequest, on_epoch: EpochCallback | None = None) -> PerceptionTrainResult:
    """Train the fusion model (and, if asked, one single-modality model each) on the synthetic task; save fusion."""
    device = resolve_device(request.device)
    config = PerceptionConfig(
        classes=synthetic.CLASSES, vocab=synthetic.VOCAB, dim=request.dim, heads=request.fusion_heads
    )
    require_memory(_training_bytes(request, config), "perception training", device)
    started = time.perf_counter()
    with oom_guard("perception training"), torch.random.fork_rng(devices=[]):
        train_batch = synthetic.make_batch(request.train_samples, request.seed)
        test_batch = synthetic.make_batch(request.test_samples, request.seed + 1_000_003)
        fusion = _fit(config, request, batch_inputs(train_batch, MODALITIES, device), "fusion", device, on_epoch)
        test_accuracy = accuracy(fusion, *batch_inputs(test_batch, MODALITIES, device))
        single: dict[str, float] = {}
        for modality in MODALITIES if request.compare_single_modalities else ():
            model = _fit(config, request, batch_inputs(train_batch, [modality], device), modality, device, on_epoch)
            single[modality] = accuracy(model, *batch_inputs(test_batch, [modality], device))
    out = Path(request.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    torch.save(fusion.state_dict(), out / WEIGHTS_FILE)
    (out / CONFIG_FILE).write_text(json.dumps(asdict(config), indent=1), encoding="utf-8")
    return PerceptionTrainResult(
        model_dir=str(out),
        classes=config.classes,
        chance_accuracy=_majority_rate(test_batch.labels, len(config.classes)),
        test_accuracy=test_accuracy,
        single_modality_accuracy=single,
        weights=fusion.weights_report(),
        train_seconds=time.perf_counter() - started,
        device=str(device),
    )


def load_perception(model_dir: str | Path, device: torch.device) -> PerceptionModel:
    directory = Path(model_dir)
    config_path, weights_path = directory / CONFIG_FILE, directory / WEIGHTS_FILE
    if not config_path.is_file() or not weights_path.is_file():
        raise ModelDirError(f"{directory} is not a perception model directory (needs {CONFIG_FILE} and {WEIGHTS_FILE})")
    try:
        raw = json.loads(config_path.read_text(encoding="utf-8"))
        config = PerceptionConfig(**{**raw, "classes": tuple(raw["classes"]), "vocab": tuple(raw["vocab"])})
        model = PerceptionModel(config)
        model.load_state_dict(torch.load(weights_path, map_location="cpu", weights_only=True))
    except Exception as error:  # JSON, missing keys, shape mismatch, truncated file: all "corrupt directory"
        raise ModelDirError(
            f"cannot load perception model from {directory}: {type(error).__name__}: {error}"
        ) from error
    return model.to(device).eval()


def _fit_image(image: np.ndarray, size: int) -> torch.Tensor:
    tensor = torch.from_numpy(np.ascontiguousarray(image.transpose(2, 0, 1)))[None]
    if tensor.shape[-2:] != (size, size):
        tensor = F.interpolate(tensor, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
    return tensor


def _fit_audio(samples: np.ndarray, length: int) -> torch.Tensor:
    # Centre crop or zero-pad to the training length (padding a present signal is not "feeding zeros" for a modality).
    if samples.size >= length:
        start = (samples.size - length) // 2
        samples = samples[start : start + length]
    else:
        samples = np.pad(samples, (0, length - samples.size))
    return torch.from_numpy(np.ascontiguousarray(samples, dtype=np.float32))[None]


def classify(request: PerceptionRequest, model: PerceptionModel | None = None) -> PerceptionResult:
    device = resolve_device(request.device)
    model = model or load_perception(request.model_dir, device)
    config = model.config
    inputs = ModalInputs()
    if request.text is not None:
        tokens = torch.tensor([synthetic.tokenize(request.text)], dtype=torch.long, device=device)
        inputs.tokens, inputs.lengths = tokens, torch.tensor([tokens.shape[1]])
    if request.image_path is not None:
        inputs.images = _fit_image(read_image(request.image_path), config.image_size).to(device)
    if request.audio_path is not None:
        inputs.audio = _fit_audio(read_audio(request.audio_path, config.sample_rate), config.audio_samples).to(device)
    with oom_guard("perception inference"), torch.no_grad():
        probabilities = torch.softmax(model(inputs), dim=1)[0].tolist()
    best = int(np.argmax(probabilities))
    if not math.isfinite(probabilities[best]):
        raise ModelDirError(f"perception model in {request.model_dir} produced non-finite outputs")
    return PerceptionResult(
        label=config.classes[best],
        probabilities={c: float(p) for c, p in zip(config.classes, probabilities, strict=True)},
        modalities=inputs.present(),
        weights=model.weights_report(inputs.present()),
    )
