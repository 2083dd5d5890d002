"""Captions and templates reach CLIP as the official FrozenCLIPEmbedder gives them: the raw text, cut to one window
of 77 tokens (``tokenizer(text, truncation=True, max_length=77, padding="max_length")``), never read as ComfyUI's
``(word:1.2)`` prompt weighting nor split into several 77-token windows."""
import pytest
import torch

from training_helpers import tiny_clip, training

MAX_LENGTH = 77


@pytest.fixture(scope="module")
def clip():
    return tiny_clip()


def official(clip, text):
    """The official encoding: the CLIP tokenizer's own truncation and padding, every token at weight 1."""
    tokenizer = clip.tokenizer.clip_l.tokenizer  # the transformers CLIPTokenizer ComfyUI wraps
    ids = tokenizer(text, truncation=True, max_length=MAX_LENGTH, padding="max_length")["input_ids"]
    return clip.encode_from_tokens({"l": [[(token, 1.0) for token in ids]]})


@pytest.mark.parametrize("caption", [
    "a (red:1.5) tooth",
    "upper teeth (front view), ((molar)), [gum:0.8], caries:2",
    "a \\(literal\\) backslash",
    "a photo of teeth",
])
def test_weighting_syntax_is_literal_text(clip, caption):
    encoded = training.clip_prompt_encoder(clip)(caption)
    torch.testing.assert_close(encoded, official(clip, caption), rtol=0, atol=0)


def test_long_captions_are_cut_to_77_tokens(clip):
    """100 one-token words, and words of several tokens across the 75-token boundary: exactly the official 77."""
    for caption in ("tooth " * 100, "a " * 74 + "xyzzyplugh " * 5):
        assert len(clip.tokenizer.clip_l.tokenizer(caption)["input_ids"]) > MAX_LENGTH
        encoded = training.clip_prompt_encoder(clip)(caption)
        assert encoded.shape == (1, MAX_LENGTH, 32)
        torch.testing.assert_close(encoded, official(clip, caption), rtol=0, atol=0)
