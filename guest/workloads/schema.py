"""Request and result models shared by the workloads, the agent RPC and the controller.

Requests are frozen and reject unknown fields, so a typo in a controller request fails validation instead of being
silently ignored. This module imports only pydantic: the controller validates and builds requests without torch.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

Device = Literal["auto", "cpu", "cuda"]
Objective = Literal["ssl", "rl", "seed-rl"]
Modality = Literal["text", "image", "audio"]
MODALITIES: tuple[Modality, ...] = ("text", "image", "audio")


class Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


# --- LLM -------------------------------------------------------------------------------------------------------------


class Sampling(Frozen):
    """Nucleus sampling; a request without it decodes greedily."""

    temperature: float = Field(1.0, gt=0.0, le=10.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    seed: int = Field(0, ge=0, lt=2**63)


class LLMRequest(Frozen):
    model_dir: str
    prompts: tuple[str, ...] = Field(min_length=1)
    max_new_tokens: int = Field(32, ge=1, le=1 << 20)
    sampling: Sampling | None = None
    # False keeps decoding past EOS: benchmarks want a fixed token count from a random-weight model.
    stop_at_eos: bool = True
    device: Device = "auto"
    # "int8": weight-only int8 (torchao); only the fast backend runs it, the others refuse it.
    weights: Literal["native", "int8"] = "native"


class TokenEvent(Frozen):
    """One streamed token: ``index`` counts generated tokens of ``sequence`` (the prompt's position in the batch)."""

    sequence: int
    index: int
    token_id: int
    text: str


class Completion(Frozen):
    text: str
    token_ids: tuple[int, ...]
    prompt_tokens: int
    finish_reason: Literal["eos", "length"]


class LLMResult(Frozen):
    backend: str  # "torch" (HF eager), "fast[-int8][-compiled-MODE]" (our decode loop), "hf-static", "onnxruntime"
    provider: str | None = None  # the ONNX Runtime execution provider that actually ran
    device: str
    dtype: str
    completions: tuple[Completion, ...]
    prompt_tokens: int  # summed over the batch
    generated_tokens: int  # summed over the batch
    ttft_s: float  # request start to the first generated token of the batch (prefill included)
    prompt_tokens_per_s: float  # prompt tokens / ttft_s
    decode_tokens_per_s: float  # tokens generated after the first step / time after the first token
    total_s: float
    peak_memory_bytes: int
    # cuda_max_memory_allocated is per request; rss_peak is the process's lifetime peak RSS (getrusage).
    peak_memory_source: Literal["cuda_max_memory_allocated", "rss_peak"]


# --- perception ------------------------------------------------------------------------------------------------------


class PerceptionTrainRequest(Frozen):
    out_dir: str
    seed: int = 0
    train_samples: int = Field(1536, ge=8)
    test_samples: int = Field(512, ge=8)
    epochs: int = Field(5, ge=1)
    batch_size: int = Field(64, ge=1)
    lr: float = Field(3e-3, gt=0.0)
    fusion_heads: int = Field(3, ge=1, le=16)  # K: the number of fusion heads F_i, i = 1..K
    dim: int = Field(32, ge=4, le=1024)  # the shared space every modality is projected to
    # Also train one model per single modality (same architecture, others absent) to compare against fusion.
    compare_single_modalities: bool = True
    device: Device = "auto"


class FusionWeights(Frozen):
    """alpha[i] weighs fusion head i; w[i][m] weighs modality m inside head i (each row sums to 1 over the present
    modalities)."""

    alpha: tuple[float, ...]
    w: tuple[dict[str, float], ...]


class PerceptionTrainResult(Frozen):
    model_dir: str
    classes: tuple[str, ...]
    chance_accuracy: float
    test_accuracy: float  # fusion of all three modalities
    single_modality_accuracy: dict[str, float]  # empty unless compare_single_modalities
    weights: FusionWeights
    train_seconds: float
    device: str


class PerceptionRequest(Frozen):
    model_dir: str
    text: str | None = None
    image_path: str | None = None  # .png (8-bit grey/RGB/RGBA) or .npy (HxWx3 or 3xHxW)
    audio_path: str | None = None  # .wav (PCM 8/16/32-bit) or .npy (1-D float waveform at the model's rate)
    device: Device = "auto"

    @model_validator(mode="after")
    def _needs_one_modality(self) -> PerceptionRequest:
        if self.text is None and self.image_path is None and self.audio_path is None:
            raise ValueError("give at least one of text, image_path, audio_path")
        return self


class PerceptionResult(Frozen):
    label: str
    probabilities: dict[str, float]
    modalities: tuple[str, ...]  # those present, in the order text, image, audio
    weights: FusionWeights  # as applied to this input, i.e. renormalised over the present modalities


class PerceptionEpoch(Frozen):
    """Progress event of perception training."""

    model: str  # "fusion" or the single modality being trained
    epoch: int
    loss: float
    train_accuracy: float


# --- training --------------------------------------------------------------------------------------------------------


class TrainRequest(Frozen):
    objective: Objective
    steps: int = Field(ge=1)
    batch_size: int = Field(8, ge=1)
    seq_len: int = Field(64, ge=2)  # ssl only: tokens per sample
    lr: float = Field(3e-3, gt=0.0)
    warmup_steps: int = Field(5, ge=0)
    seed: int = 0
    # ssl: start from this tiny-LLM directory; None builds the tiny Llama shape in memory from ``seed``.
    model_dir: str | None = None
    corpus_path: str | None = None  # ssl; None is the corpus shipped in guest/assets
    checkpoint_dir: str | None = None
    checkpoint_every: int = Field(0, ge=0)  # 0: never
    resume: bool = True  # continue from the newest checkpoint in checkpoint_dir when there is one
    device: Device = "auto"
    # ssl: after the last step, write the trained model and its tokenizer here as a transformers directory, the
    # kind the model server loads (`hvctl serve NAME reload --model DIR`).
    export_dir: str | None = None
    # Run as one rank of a data-parallel job under torch.distributed.run (guest/workloads/distributed.py);
    # batch_size is then the global batch, split evenly over the ranks.
    distributed: bool = False
    # How long a rank waits in a collective for its peers before it gives up (a dead VM is noticed this way).
    collective_timeout_s: float = Field(120.0, gt=0.0)

    @model_validator(mode="after")
    def _ssl_only(self) -> TrainRequest:
        if self.export_dir is not None and self.objective != "ssl":
            raise ValueError("export_dir: only ssl training makes a language model to export")
        if self.distributed and self.objective != "ssl":
            raise ValueError("distributed: data-parallel training is for the ssl objective")
        return self


class TrainProgress(Frozen):
    step: int  # 1-based, the step just completed
    loss: float
    lr: float
    mean_reward: float | None = None  # rl / seed-rl: mean reward of this step's batch
    checkpoint: str | None = None  # path written after this step, if any
    requested: bool = False  # that checkpoint was asked for (SIGUSR1), not scheduled by checkpoint_every
    rank: int = 0  # distributed: this rank of world_size; loss is then the mean over all ranks
    world_size: int = 1


class TrainResult(Frozen):
    objective: Objective
    start_step: int  # steps already done when this call started (from a checkpoint), 0 for a fresh run
    final_step: int
    losses: tuple[float, ...]  # one per step of this call: step start_step+1 .. final_step
    rewards: tuple[float, ...]  # rl / seed-rl: mean batch reward per step; empty for ssl
    steps_per_s: float
    samples_per_s: float
    checkpoints: tuple[str, ...]
    device: str
    autocast_dtype: str | None  # "bfloat16" on GPU, None on CPU (fp32)
    rank: int = 0
    world_size: int = 1
    exported: str | None = None  # the model directory written (export_dir), if asked for
