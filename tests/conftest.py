"""Session-wide fixtures: the real SmolLM2 tokenizer and a tiny random Llama that matches it."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # tests never reach a model hub

import pytest  # noqa: E402

# The user's cache as it is at start-up: folder conftests may point CRSLIGHT_CACHE at a temporary
# folder per test, which would make the session fixtures re-convert the tokenizer from GGUF (5 s).
_CACHE_AT_START = os.environ.get("CRSLIGHT_CACHE")


@pytest.fixture(scope="session")
def tiny_tokenizer():
    """The real SmolLM2 tokenizer (49152 tokens, chat template), left padding, pad ``<|endoftext|>``.

    Shared by the whole session: do not mutate it. For right padding pass ``padding_side="right"``
    to the call (``tiny_tokenizer(texts, padding=True, padding_side="right")``).
    """
    from crslight.models.loading import DEFAULT_POLICY, load_tokenizer

    with pytest.MonkeyPatch.context() as patch:
        if _CACHE_AT_START is None:
            patch.delenv("CRSLIGHT_CACHE", raising=False)
        else:
            patch.setenv("CRSLIGHT_CACHE", _CACHE_AT_START)
        return load_tokenizer(DEFAULT_POLICY, padding_side="left")


@pytest.fixture(scope="session")
def tiny_lm(tiny_tokenizer):
    """A random 2-layer Llama (hidden 64) over ``tiny_tokenizer``'s vocabulary, seed 0, eval mode.

    Shared by the whole session: do not train it in place. Tests that update weights take
    ``copy.deepcopy(tiny_lm)`` or build their own with ``crslight.models.tiny_causal_lm(tiny_tokenizer)``.
    """
    from crslight.models.loading import tiny_causal_lm

    return tiny_causal_lm(tiny_tokenizer, seed=0).eval()
