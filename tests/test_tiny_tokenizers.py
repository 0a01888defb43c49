"""The tiny tokenizers written with every tiny model folder (and the toy model): the same bytes on every build, so
a model trained on their ids (the toy DiT) is reproducible, and T5's cuts the corpus's words whole."""

from __future__ import annotations

from pathlib import Path

from transformers import AutoTokenizer

from flux_lora.weights.tiny import build_clip_tokenizer, build_t5_tokenizer


def test_tokenizers_are_the_same_on_every_build(tmp_path):
    # tokenizers' UnigramTrainer gave other ids and scores on every build (the toy DiT's check run moved with them)
    for n in (1, 2):
        build_t5_tokenizer(tmp_path / f"t5-{n}", max_length=24)
        build_clip_tokenizer(tmp_path / f"clip-{n}")
    for name in ("t5", "clip"):
        first, second = ((tmp_path / f"{name}-{n}" / "tokenizer.json").read_bytes() for n in (1, 2))
        assert first == second, name


def test_t5_tokenizer_cuts_known_words_whole_and_spells_the_rest(tmp_path: Path):
    build_t5_tokenizer(tmp_path, max_length=24)
    tok = AutoTokenizer.from_pretrained(tmp_path)
    words = ["a", "purple", "circle", "on", "the", "left"]
    assert tok.tokenize(" ".join(words)) == ["\u2581" + w for w in words]
    unknown = tok("creamy")["input_ids"]  # not a word of the corpus, its letters are
    assert len(unknown) > 2 and unknown[-1] == tok.eos_token_id and tok.unk_token_id not in unknown
    assert tok.decode(unknown, skip_special_tokens=True) == "creamy"
