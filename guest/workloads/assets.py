"""Tiny local assets: the shipped corpus, a byte-level BPE tokenizer trained on it and a random-initialised Llama.

Nothing is downloaded: guests and CI have no model hub, so tests and demos run on a model built here in about a
second. ``make_tiny_llm`` is deterministic for a given seed and library versions.
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast
from transformers.utils import logging as hf_logging

ASSETS_DIR = Path(__file__).resolve().parent.parent / "assets"
CORPUS_PATH = ASSETS_DIR / "corpus.txt"

# Workloads run under the agent: tqdm bars on stderr would only garble its log.
hf_logging.disable_progress_bar()  # type: ignore[no-untyped-call]

PAD, BOS, EOS = "<|pad|>", "<|bos|>", "<|eos|>"
SPECIAL_TOKENS = (PAD, BOS, EOS)  # ids 0, 1, 2: the trainer assigns special tokens first, in this order


def read_corpus(path: str | Path | None = None) -> str:
    return Path(path or CORPUS_PATH).read_text(encoding="utf-8")


def train_tokenizer(corpus: str, vocab_size: int = 512) -> PreTrainedTokenizerFast:
    """Byte-level BPE: any UTF-8 input encodes (no unknown token), which matters for arbitrary user prompts."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    # Paragraphs as training units keep merges from spanning paragraph breaks.
    tokenizer.train_from_iterator([p for p in corpus.split("\n\n") if p.strip()], trainer)
    return PreTrainedTokenizerFast(  # type: ignore[no-untyped-call]
        tokenizer_object=tokenizer,
        pad_token=PAD,
        bos_token=BOS,
        eos_token=EOS,
        padding_side="left",  # decoder-only batches are left-padded so every row's last position is its newest token
    )


def tiny_llama_config(
    vocab_size: int,
    hidden_size: int = 64,
    num_layers: int = 2,
    num_heads: int = 4,
    num_kv_heads: int = 4,
    intermediate_size: int = 128,
    max_position_embeddings: int = 256,
) -> LlamaConfig:
    return LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        intermediate_size=intermediate_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_kv_heads,
        max_position_embeddings=max_position_embeddings,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
        tie_word_embeddings=False,
    )


def build_random_llama(config: LlamaConfig, seed: int) -> LlamaForCausalLM:
    # fork_rng: building a model must not move the caller's global RNG stream.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlamaForCausalLM(config)
    model.eval()  # type: ignore[no-untyped-call]
    return model


# The tiny model's chat template (a real model ships its own in tokenizer_config.json), so that the server's
# /v1/chat/completions works on it as on any instruction-tuned model.
TINY_CHAT_TEMPLATE = ("{% for m in messages %}<|bos|>{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
                      "{% if add_generation_prompt %}assistant:{% endif %}")


def make_tiny_llm(
    directory: str | Path, seed: int = 0, vocab_size: int = 512, corpus_path: str | Path | None = None
) -> Path:
    """Write a tokenizer + random Llama (hidden 64, 2 layers, 4 heads, context 256) to ``directory``."""
    tokenizer = train_tokenizer(read_corpus(corpus_path), vocab_size)
    tokenizer.chat_template = TINY_CHAT_TEMPLATE
    model = build_random_llama(tiny_llama_config(vocab_size=len(tokenizer)), seed)
    return save_llm(directory, model, tokenizer)


def save_llm(directory: str | Path, model: LlamaForCausalLM, tokenizer: PreTrainedTokenizerFast) -> Path:
    """Save model + tokenizer as a from_pretrained-loadable directory.

    The files are written to a sibling temporary directory and moved into place, so a crash never leaves a
    half-written model directory that later loads as "corrupt".
    """
    target = Path(directory)
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        if target.exists():
            shutil.rmtree(target)
        staging.rename(target)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return target
