import json

import pytest
import torch

from crslight.data.datamodules import IGNORE_INDEX, PromptBatch, SFTBatch, Synthetic, pad
from crslight.models.tokenize import encode_dialogue, encode_prompt


def datamodule(tokenizer, **kwargs):
    dm = Synthetic(n_dialogues=20, n_items=50, batch_size=4, **kwargs)
    dm._tokenizer = tokenizer
    return dm


def test_sft_batches_learn_only_recommender_tokens(tiny_tokenizer):
    dm = datamodule(tiny_tokenizer, task="sft", max_length=256)
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))
    assert isinstance(batch, SFTBatch)
    assert batch.input_ids.shape == batch.labels.shape == batch.attention_mask.shape
    # padding is never learned, and everything learned is a real token equal to the input
    assert (batch.labels[batch.attention_mask == 0] == IGNORE_INDEX).all()
    learned = batch.labels != IGNORE_INDEX
    assert learned.any() and (batch.labels[learned] == batch.input_ids[learned]).all()
    # the learned text of each row is exactly one dialogue's recommender turns, each closed by the end-of-turn token,
    # with every recommended title replaced by the slot token (the title is written in, never learned as words)
    decoded = [tiny_tokenizer.decode(batch.input_ids[i][learned[i]]) for i in range(len(batch.input_ids))]
    names = dm.item_names
    expected = []
    for turns in dm.corpus("train").dialogues["turns"]:
        texts = []
        for t in turns:
            if t["role"] == "recommender":
                text = t["text"]
                for item in t["items"]:
                    text = text.replace(" " + names[item], "<|item|>")
                texts.append(text + "<|im_end|>\n")
        expected.append("".join(texts))
    assert all(text in expected for text in decoded)
    assert "<|item|>" in "".join(decoded)


def test_prompt_equals_the_training_prefix(tiny_tokenizer):
    turns = [
        {"role": "seeker", "text": "I want a comedy", "items": []},
        {"role": "recommender", "text": "Try Up (2009)", "items": ["1"]},
        {"role": "seeker", "text": "Seen it", "items": []},
        {"role": "recommender", "text": "Then Heat (1995)", "items": ["2"]},
    ]
    enc = encode_dialogue(tiny_tokenizer, turns)
    for t in (1, 3):
        assert encode_prompt(tiny_tokenizer, turns[:t]) == enc.input_ids[: enc.turn_starts[t]]
    assert tiny_tokenizer.decode(enc.input_ids[enc.turn_starts[3]: enc.turn_ends[3]]).startswith("Then Heat (1995)")


def test_recommended_titles_are_written_through_slots(tiny_tokenizer):
    turns = [
        {"role": "seeker", "text": "I loved Up (2009), something like it?", "items": ["1"]},
        {"role": "recommender", "text": "Try Heat (1995) or Up", "items": ["2", "1"]},
        {"role": "seeker", "text": "Seen it", "items": []},
        {"role": "recommender", "text": "Then Heat (1995)", "items": ["2"]},
    ]
    names = {"1": "Up (2009)", "2": "Heat (1995)"}
    enc = encode_dialogue(tiny_tokenizer, turns, names=names)
    slot = tiny_tokenizer.convert_tokens_to_ids("<|item|>")
    assert enc.slots[0] == [] and enc.slots[2] == []  # the seeker's titles stay words
    (heat, item_heat), (up, item_up) = enc.slots[1]
    assert (item_heat, item_up) == ("2", "1") and heat < up  # "Up" matched without its year
    assert enc.input_ids[heat] == enc.input_ids[up] == slot and enc.loss_mask[heat] and enc.loss_mask[up]
    title_end = next(i for i in range(heat + 1, len(enc.input_ids)) if enc.loss_mask[i])
    assert tiny_tokenizer.decode(enc.input_ids[heat + 1: title_end]) == " Heat (1995)"  # written in, not learned
    learned = tiny_tokenizer.decode([i for i, m in zip(enc.input_ids, enc.loss_mask, strict=True) if m])
    assert learned == "Try<|item|> or<|item|><|im_end|>\nThen<|item|><|im_end|>\n"
    rendered = tiny_tokenizer.decode(enc.input_ids[enc.turn_starts[1]: enc.turn_ends[1]], skip_special_tokens=True)
    assert rendered.startswith("Try Heat (1995) or Up")
    # a prompt writes the context's recommender turns with the same slots
    assert encode_prompt(tiny_tokenizer, turns[:3], names=names) == enc.input_ids[: enc.turn_starts[3]]


def test_prompt_truncation_keeps_system_and_latest_turns(tiny_tokenizer):
    turns = [{"role": "seeker" if i % 2 == 0 else "recommender", "text": f"turn number {i} " * 5} for i in range(20)]
    ids = encode_prompt(tiny_tokenizer, turns, max_length=120)
    text = tiny_tokenizer.decode(ids)
    assert len(ids) <= 120 and "turn number 19" in text and "turn number 0 " not in text
    assert text.startswith("<|im_start|>system")


def test_prompt_batches_are_left_padded(tiny_tokenizer):
    dm = datamodule(tiny_tokenizer, task="prompts")
    dm.setup("fit")
    batch = next(iter(dm.val_dataloader()))
    assert isinstance(batch, PromptBatch)
    assert (batch.attention_mask[:, -1] == 1).all()  # every prompt ends at the right edge
    d, t = int(batch.dialogue_index[0]), int(batch.turn_index[0])
    assert dm.corpus("valid").dialogues[d]["turns"][t]["role"] == "recommender"
    assert tiny_tokenizer.decode(batch.input_ids[0][batch.attention_mask[0] == 1]).endswith("<|im_start|>assistant\n")


def test_max_samples_keeps_the_first_prompts_and_tokenises_only_those(tiny_tokenizer):
    class Counting(Synthetic):
        encoded = 0

        def encode_prompt(self, turns):
            Counting.encoded += 1
            return super().encode_prompt(turns)

    every = datamodule(tiny_tokenizer, task="prompts").build("train")
    dm = Counting(n_dialogues=20, n_items=50, batch_size=4, task="prompts", max_samples=5)
    dm._tokenizer = tiny_tokenizer
    assert len(every) > 5 and dm.build("train") == every[:5]
    assert Counting.encoded == 5  # a quick run does not tokenise the whole split first


def test_pad():
    assert pad([[1, 2], [3]], 0).tolist() == [[1, 2], [3, 0]]
    assert pad([[1, 2], [3]], 0, left=True).tolist() == [[1, 2], [0, 3]]
    assert pad([[5]], 9).dtype == torch.long


def test_recommendation_samples_point_at_their_turns(tiny_tokenizer):
    dm = datamodule(tiny_tokenizer, task="prompts", max_length=1024)
    dm.setup("test")  # the test split is read as whole dialogues whatever the task
    batch = dm.collate(dm._data["test"][:4])
    assert isinstance(batch, SFTBatch) and batch.rec_row is not None
    corpus = dm.corpus("test")
    expected = [s for s in corpus.rec_samples if s.dialogue < len(batch.input_ids)]
    assert len(batch.rec_target) == len(expected)
    for n, sample in enumerate(expected):
        assert int(batch.rec_row[n]) == sample.dialogue
        assert corpus.catalogue[int(batch.rec_target[n])]["item_id"] == sample.item
        # the position is the turn's first recommendation slot: the reply's words before it are context, the title
        # written after it is the turn's first item
        position = int(batch.rec_position[n])
        assert int(batch.input_ids[sample.dialogue, position]) == tiny_tokenizer.convert_tokens_to_ids("<|item|>")
        turn = corpus.dialogues[sample.dialogue]["turns"][sample.turn]
        first = dm.item_names[turn["items"][0]]
        before = tiny_tokenizer.decode(batch.input_ids[sample.dialogue, :position])
        assert before.endswith(turn["text"].split(first)[0].rstrip())
        assert tiny_tokenizer.decode(batch.input_ids[sample.dialogue, position + 1:]).startswith(" " + first)


def test_evaluation_batches_group_similar_lengths(tiny_tokenizer):
    dm = datamodule(tiny_tokenizer, task="sft")
    dm.setup("test")
    widths = [batch.input_ids.shape[1] for batch in dm.test_dataloader()]
    assert widths == sorted(widths)
    assert sum(len(b.rec_target) for b in dm.test_dataloader()) == len(dm.corpus("test").rec_samples)


def test_unknown_task_is_refused():
    import pytest

    with pytest.raises(ValueError, match="unknown task 'rl'"):
        Synthetic(task="rl")


def test_the_redial_test_loader_holds_every_recommendation_sample(redial_root):
    """The CRSLab/UniCRS protocol scores every (recommender turn, mentioned item): no dialogue is cut at test time."""
    from crslight.data import load_corpus
    from crslight.data.datamodules import ReDial

    dm = ReDial(root=str(redial_root), task="sft", tokenizer="smollm2", batch_size=16, max_length=128)
    dm.setup("test")
    samples = sum(len(batch.rec_target) for batch in dm.test_dataloader())
    assert samples == load_corpus("redial", str(redial_root), "test").stats()["rec_samples"] == 4897


def test_synthetic_eval_splits_have_their_own_size(tiny_tokenizer, tmp_path, monkeypatch):
    monkeypatch.setenv("CRSLIGHT_CACHE", str(tmp_path))
    default, small = datamodule(tiny_tokenizer), datamodule(tiny_tokenizer, n_eval_dialogues=3)
    assert [len(default.corpus(s).dialogues) for s in ("train", "valid", "test")] == [20, 4, 4]  # a fifth
    assert [len(small.corpus(s).dialogues) for s in ("train", "valid", "test")] == [20, 3, 3]
    # the same world: the train split and the catalogue do not depend on the evaluation size
    assert small.corpus("train").dialogues["turns"] == default.corpus("train").dialogues["turns"]
    assert small.corpus("test").catalogue["name"] == default.corpus("test").catalogue["name"]


def test_the_cache_removes_killed_builds_and_rebuilds_a_damaged_entry(tmp_path, monkeypatch):
    import os
    import time

    from crslight.data.corpus import load_corpus

    monkeypatch.setenv("CRSLIGHT_CACHE", str(tmp_path))
    first = load_corpus("synthetic", None, "test", n_dialogues=30)
    (entry,) = (tmp_path / "data" / "synthetic").iterdir()
    killed, running = entry.parent / f".{entry.name}-killed", entry.parent / f".{entry.name}-running"
    for folder in (killed, running):
        folder.mkdir()
        (folder / "part").write_bytes(b"x" * 1000)
    hour_ago = time.time() - 3600
    os.utime(killed, (hour_ago, hour_ago))
    (entry / "meta.json").write_text("{not json")  # damaged by hand
    with pytest.warns(UserWarning, match="is damaged .* converting the source again"):
        again = load_corpus("synthetic", None, "test", n_dialogues=30)
    assert again.dialogues["dialogue_id"] == first.dialogues["dialogue_id"]
    assert not killed.exists() and running.exists()  # a build of the last 10 minutes may be another process's
    assert json.loads((entry / "meta.json").read_text())


def test_the_cache_rebuilds_an_entry_whose_values_were_edited_by_hand(tmp_path, monkeypatch):
    """Every file present and readable, one value changed in place (same size): the checksums catch it."""
    import datasets

    from crslight.data.corpus import load_corpus

    monkeypatch.setenv("CRSLIGHT_CACHE", str(tmp_path))
    turns = load_corpus("synthetic", None, "test", n_dialogues=30).dialogues.to_dict()["turns"]  # copied out of the
    (entry,) = (tmp_path / "data" / "synthetic").iterdir()                                     # memory-mapped file
    (arrow,) = (entry / "arrow" / "test").glob("*.arrow")
    text = turns[0][0]["text"].encode()
    edited = bytes(c if c == ord(" ") else ord("X") for c in text)
    data = arrow.read_bytes()
    assert data.count(text) >= 1 and len(edited) == len(text) != 0
    arrow.write_bytes(data.replace(text, edited, 1))
    # without the checksums this entry would be served: it still loads, with the edited text
    assert datasets.load_from_disk(str(entry / "arrow"))["test"][0]["turns"][0]["text"] == edited.decode()
    with pytest.warns(UserWarning, match=r"is damaged \(DamagedEntry: changed since the conversion: "
                                         r"arrow/test/data-00000-of-00001\.arrow\); converting the source again"):
        again = load_corpus("synthetic", None, "test", n_dialogues=30)
    assert again.dialogues.to_dict()["turns"] == turns  # converted again: the values as generated
    assert arrow.read_bytes() == data
    (entry / "checksums.json").unlink()  # an entry without checksums (deleted, or never written) is not trusted
    with pytest.warns(UserWarning, match=r"DamagedEntry: no checksums\.json"):
        assert load_corpus("synthetic", None, "test", n_dialogues=30).dialogues.to_dict()["turns"] == turns
    assert json.loads((entry / "checksums.json").read_text())
