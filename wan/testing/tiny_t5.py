"""A tiny random umt5 encoder + a real (offline-trained) sentencepiece tokenizer, in the official Wan layout.

    <ckpt_dir>/models_t5_umt5-xxl-enc-bf16.pth   Wan key names, torch.save of a plain state dict
    <ckpt_dir>/google/umt5-xxl/                  spiece.model, tokenizer.json, tokenizer_config.json

For tests and CPU smoke runs; deterministic and fast (tens of ms). Nothing here touches the network or CUDA.
"""
import io
import os

import sentencepiece as spm
import torch

from ..modules.t5 import T5_CHECKPOINT, official_t5_shapes

__all__ = ["TINY_T5", "TINY_TOKENIZER_VOCAB", "write_tiny_t5_checkpoint", "write_tiny_tokenizer", "write_tiny_t5"]

# d_kv * heads (32) happens to equal d_model here; the loader does not assume it.
TINY_T5 = dict(vocab_size=128, d_model=32, d_kv=8, d_ff=64, num_heads=4, num_layers=2, num_buckets=32)
TINY_TOKENIZER_VOCAB = 96  # must stay <= TINY_T5["vocab_size"]

_CORPUS = """\
A cat boxing on a stage under bright light.
Two cats fight in a boxing ring while the crowd cheers.
A slow pan across a busy city street at sunset.
The camera zooms in on a dog running through tall grass.
Soft morning light falls on a wooden table with a cup of coffee.
A red kite flies high above the green hills on a windy day.
Rain drops slide down a window while a train passes at night.
An old man plays the violin in a quiet park.
Waves crash on the rocks and white foam fills the frame.
A small girl in a yellow coat jumps into a puddle.
Neon signs glow over a crowded market after the rain.
A boxer in red gloves throws a fast punch at the camera.
Two white cats sleep in a warm patch of sunlight.
Fireworks light up the sky above a river in the city.
A chef slices fresh vegetables on a wooden board in slow motion.
Snow falls gently on a pine forest as the light fades.
A drone shot follows a car along a winding mountain road.
Close up of a cat's green eyes reflecting candle light.
A dancer spins on a dark stage under a single spotlight.
Clouds move quickly over a desert, time lapse, golden hour.
A robot walks through an empty street lit by lamps.
Children fly paper planes from the top of a hill.
A horse gallops across a beach at dawn, sand flying.
Steam rises from a bowl of noodles in a small kitchen.
The boxing match ends and the champion raises his arms.
Sunlight shines through stained glass in an old church.
A fox steps out of the forest and looks at the camera.
Bright stage lights flash as the band starts to play.
An astronaut floats inside a space station, Earth in the window.
A kitten chases a ball of yarn across the floor.
Cinematic shot, shallow depth of field, warm colors, 4K.
Lightning strikes over the ocean during a summer storm.
"""


def write_tiny_tokenizer(folder: str, vocab_size: int = TINY_TOKENIZER_VOCAB) -> str:
    """Train a unigram sentencepiece model on the built-in corpus and save it as a transformers T5 tokenizer.

    T5 id layout: pad 0, eos 1, unk 2, no bos. `AutoTokenizer.from_pretrained(folder, local_files_only=True)` works.
    """
    from transformers import T5Tokenizer  # lazy: transformers import is the slow part

    os.makedirs(folder, exist_ok=True)
    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(_CORPUS.splitlines()), model_writer=buf, vocab_size=vocab_size,
        model_type="unigram", pad_id=0, eos_id=1, unk_id=2, bos_id=-1, character_coverage=1.0,
        num_threads=1, minloglevel=2)  # one thread: deterministic
    with open(os.path.join(folder, "spiece.model"), "wb") as f:
        f.write(buf.getvalue())
    # transformers v5: T5Tokenizer has no vocab_file=; from_pretrained converts spiece.model. extra_ids=0 keeps
    # the vocab exactly the sentencepiece one (no <extra_id_*> tokens).
    tok = T5Tokenizer.from_pretrained(folder, extra_ids=0, local_files_only=True)
    tok.save_pretrained(folder)
    return folder


def _tiny_state_dict(seed: int, vocab_size: int, d_model: int, d_kv: int, d_ff: int, num_heads: int,
                     num_layers: int, num_buckets: int) -> dict[str, torch.Tensor]:
    """Official-key state dict (float32), every tensor drawn by the shared rule from one CPU generator."""
    from .random_init import random_tensor

    g = torch.Generator().manual_seed(seed)
    shapes = official_t5_shapes(vocab_size, d_model, num_heads * d_kv, d_ff, num_heads, num_layers, num_buckets)
    return {key: random_tensor(key, shape, g) for key, shape in shapes.items()}


def write_tiny_t5_checkpoint(ckpt_dir: str, seed: int = 0, vocab_size: int = TINY_T5["vocab_size"],
                             dtype: torch.dtype = torch.bfloat16, d_model: int = TINY_T5["d_model"]) -> str:
    """Write `<ckpt_dir>/models_t5_umt5-xxl-enc-bf16.pth` (tiny random umt5 encoder, Wan keys); returns its path."""
    if vocab_size < TINY_TOKENIZER_VOCAB:
        raise ValueError(f"vocab_size {vocab_size} < tiny tokenizer vocab {TINY_TOKENIZER_VOCAB}")
    cfg = {**TINY_T5, "vocab_size": vocab_size, "d_model": d_model}
    sd = {k: v.to(dtype).contiguous() for k, v in _tiny_state_dict(seed, **cfg).items()}
    os.makedirs(ckpt_dir, exist_ok=True)
    path = os.path.join(ckpt_dir, T5_CHECKPOINT)
    torch.save(sd, path)
    return path


def write_tiny_t5(ckpt_dir: str, seed: int = 0, d_model: int = TINY_T5["d_model"]) -> tuple[str, str]:
    """Both pieces at their official places; returns (checkpoint_path, tokenizer_dir).

    The pipeline's tiny model uses d_model 4096: the DiT's text_dim is fixed at 4096 (config.json cannot set it)."""
    tok_dir = write_tiny_tokenizer(os.path.join(ckpt_dir, "google", "umt5-xxl"))
    return write_tiny_t5_checkpoint(ckpt_dir, seed, d_model=d_model), tok_dir
