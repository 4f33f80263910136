"""Simulator fixtures: a private corpus cache, a small catalogue, a tiny chat LM (the real-data folders come from the
root conftest)."""


import pytest

CHATML = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

CATALOGUE = [
    {"item_id": "1", "name": "Police Academy (1984)", "popularity": 10.0, "attributes": "year=1984"},
    {"item_id": "2", "name": "The Mummy (1999)", "popularity": 30.0, "attributes": "year=1999"},
    {"item_id": "3", "name": "The Mummy (2017)", "popularity": 20.0, "attributes": "year=2017"},
    {"item_id": "4", "name": "It (2017)", "popularity": 25.0, "attributes": "year=2017"},
    {"item_id": "5", "name": "Frozen (2013)", "popularity": 40.0, "attributes": "year=2013"},
    {"item_id": "6", "name": "Schindler's List (1993)", "popularity": 15.0, "attributes": "year=1993"},
    {"item_id": "7", "name": "Spider-Man: Homecoming (2017)", "popularity": 35.0, "attributes": "year=2017"},
    {"item_id": "8", "name": "The Silence of the Lambs (1991)", "popularity": 12.0, "attributes": "year=1991"},
    {"item_id": "9", "name": "Amélie (2001)", "popularity": 5.0, "attributes": "year=2001"},
    {"item_id": "10", "name": "Get Out (2017)", "popularity": 50.0, "attributes": "year=2017"},
    {"item_id": "11", "name": "Good Boy! (2003)", "popularity": 3.0, "attributes": "year=2003"},
    {"item_id": "12", "name": "Mission: Impossible", "popularity": 8.0, "attributes": ""},
]


@pytest.fixture(autouse=True)
def _isolated_cache(isolated_cache):
    """Converted corpora go to the session's own cache (the root conftest's ``isolated_cache``), never the user's."""


@pytest.fixture
def catalogue() -> list[dict]:
    return [dict(row) for row in CATALOGUE]


@pytest.fixture(scope="session")
def tiny_chat():
    """A tiny random Llama and a byte-level BPE tokenizer with a ChatML template, built offline in about a second."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from crslight.models.loading import tiny_causal_lm

    specials = ["<unk>", "<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    bpe = Tokenizer(models.BPE(unk_token="<unk>"))
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    texts = [row["name"] for row in CATALOGUE] + ["Have you seen it? I love movies. user assistant system"] * 3
    trainer = trainers.BpeTrainer(
        vocab_size=320, special_tokens=specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    bpe.train_from_iterator(texts, trainer)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=bpe, unk_token="<unk>", eos_token="<|im_end|>", pad_token="<|endoftext|>"
    )
    tokenizer.chat_template = CHATML
    model = tiny_causal_lm(tokenizer, seed=0)
    model.eval()
    return model, tokenizer
