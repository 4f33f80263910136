"""The decoding engine: the same tokens as ``generate`` under greedy decoding, and recommendations drawn from the item
scores with their titles written in."""

import copy

import pytest
import torch
from transformers import AutoModelForCausalLM

from crslight.models.engine import Engine, Reply
from crslight.models.lora import LoRAConfig
from crslight.models.retrieval import ItemHead, decoder_of
from crslight.models.tokenize import encode_prompt
from crslight.modules.rollout import pack

pytestmark = pytest.mark.usefixtures("one_thread")

NAMES = ["Heat (1995)", "Up (2009)", "The Silent River (2013)", "Alien (1979)"]


def _prompts(tokenizer):
    texts = ["Hi! I'm bored, can you recommend a thriller?", "Something calm", "I loved Up (2009). More like it?"]
    return [encode_prompt(tokenizer, [{"role": "seeker", "text": t, "items": []}]) for t in texts]


def test_greedy_decoding_equals_generate(tiny_lm, tiny_tokenizer):
    prompts = _prompts(tiny_tokenizer)
    engine = Engine(tiny_lm, tiny_tokenizer, max_new_tokens=10, temperature=0)
    ours = [g.tokens for g in engine.generate(prompts)]
    batch = pack(prompts, [[] for _ in prompts], tiny_tokenizer.pad_token_id)
    theirs = tiny_lm.generate(input_ids=batch.input_ids[:, : batch.start],
                              attention_mask=batch.attention_mask[:, : batch.start], do_sample=False, max_new_tokens=10,
                              eos_token_id=tiny_tokenizer.eos_token_id, pad_token_id=tiny_tokenizer.pad_token_id)
    for row, tokens in zip(theirs[:, batch.start :].tolist(), ours, strict=True):
        assert tokens == row[: len(tokens)]
    # and every row decodes as it would alone: finished rows leave the batch without disturbing the others
    assert ours == [engine.generate([p])[0].tokens for p in prompts]


def test_stops_at_end_of_turn(tiny_tokenizer):
    model = AutoModelForCausalLM.from_config(copy.deepcopy(_tiny_config(tiny_tokenizer))).eval()
    eos = tiny_tokenizer.eos_token_id
    prompts = _prompts(tiny_tokenizer)
    with torch.no_grad():  # the end-of-turn token becomes the likeliest next token
        hidden = torch.cat([decoder_of(model)(input_ids=torch.tensor([p])).last_hidden_state[0] for p in prompts])
        model.get_output_embeddings().weight[eos] = 40 * hidden.mean(0) / hidden.mean(0).norm() ** 2
    engine = Engine(model, tiny_tokenizer, max_new_tokens=6, temperature=0)
    generations = engine.generate(prompts)
    assert all(len(g.tokens) <= 6 and all(g.sampled) for g in generations)
    assert all(g.tokens[-1] == eos and eos not in g.tokens[:-1] for g in generations)


def _tiny_config(tokenizer):
    from crslight.models.loading import tiny_causal_lm_config

    return tiny_causal_lm_config(len(tokenizer), pad_token_id=tokenizer.pad_token_id,
                                 eos_token_id=tokenizer.eos_token_id)


def _head(model, tokenizer):
    torch.manual_seed(0)
    head = ItemHead.for_catalogue(model, tokenizer, NAMES)
    with torch.no_grad():
        head.bias.copy_(torch.tensor([0.0, 5.0, 3.0, -5.0]))  # Up, then The Silent River, are the likeliest
    return head


def test_a_recommendation_is_the_drawn_item_with_its_title_written_in(tiny_lm, tiny_tokenizer):
    head = _head(tiny_lm, tiny_tokenizer)
    slot = tiny_tokenizer.convert_tokens_to_ids("<|item|>")
    prompts = [p + tiny_tokenizer("How about", add_special_tokens=False)["input_ids"] + [slot]
               for p in _prompts(tiny_tokenizer)]
    engine = Engine(tiny_lm, tiny_tokenizer, head, NAMES, max_new_tokens=4, temperature=0, greedy_items=True)
    generations = engine.generate(prompts, exclude=[[], [1], [1, 2]])
    # best-first: Up, unless excluded; then The Silent River; then Heat (Alien's score is lowest)
    assert [g.items for g in generations] == [[1], [2], [0]]
    for generation in generations:
        (offset, row), = generation.slots
        assert offset == -1  # the prompt's own slot token: the reply starts with the title
        title = tiny_tokenizer(" " + NAMES[row], add_special_tokens=False)["input_ids"]
        assert generation.tokens[: len(title)] == title and not any(generation.sampled[: len(title)])
        assert all(generation.sampled[len(title):])
        assert engine.decode(generation).startswith(NAMES[row])
    # what the draw reads is the item head at the slot state: the scores that rank the catalogue
    with torch.no_grad():
        hidden = decoder_of(tiny_lm)(input_ids=torch.tensor([prompts[0]])).last_hidden_state[:, -1]
        scores = head(hidden, tiny_lm.get_output_embeddings().weight)
    assert int(scores.argmax()) == generations[0].items[0]


def test_sampled_items_follow_the_item_scores(tiny_lm, tiny_tokenizer):
    head = _head(tiny_lm, tiny_tokenizer)
    slot = tiny_tokenizer.convert_tokens_to_ids("<|item|>")
    prompt = _prompts(tiny_tokenizer)[0] + [slot]
    engine = Engine(tiny_lm, tiny_tokenizer, head, NAMES, max_new_tokens=1, temperature=1.0)
    generator = torch.Generator().manual_seed(0)
    drawn = [g.items[0] for g in engine.generate([prompt] * 400, exclude=[[0]] * 400, generator=generator)]
    with torch.no_grad():
        hidden = decoder_of(tiny_lm)(input_ids=torch.tensor([prompt])).last_hidden_state[:, -1]
        probs = head.log_probs(hidden, tiny_lm.get_output_embeddings().weight, torch.tensor([[0]])).exp()[0]
    counts = torch.bincount(torch.tensor(drawn), minlength=4).float() / 400
    assert counts[0] == 0  # excluded
    assert torch.allclose(counts, probs, atol=0.07), (counts, probs)


def test_reply_carries_its_items():
    reply = Reply("How about Up (2009)?", ["up"])
    assert reply == "How about Up (2009)?" and reply.items == ["up"] and isinstance(reply, str)


def test_alternatives_are_drawn_at_the_same_state_and_swap_only_the_title(tiny_lm, tiny_tokenizer):
    from crslight.models.engine import EnginePolicy

    head = _head(tiny_lm, tiny_tokenizer)
    slot = tiny_tokenizer.convert_tokens_to_ids("<|item|>")
    prompt = _prompts(tiny_tokenizer)[0] + [slot]
    engine = Engine(tiny_lm, tiny_tokenizer, head, NAMES, max_new_tokens=3, temperature=1.0, item_alternatives=5)
    generations = engine.generate([prompt] * 200, exclude=[[0]] * 200, generator=torch.Generator().manual_seed(0))
    assert all(len(g.alternatives) == len(g.slots) == 1 and len(g.alternatives[0]) == 5 for g in generations)
    drawn = torch.tensor([row for g in generations for row in g.alternatives[0]])
    with torch.no_grad():
        hidden = decoder_of(tiny_lm)(input_ids=torch.tensor([prompt])).last_hidden_state[:, -1]
        probs = head.log_probs(hidden, tiny_lm.get_output_embeddings().weight, torch.tensor([[0]])).exp()[0]
    assert torch.allclose(torch.bincount(drawn, minlength=4).float() / len(drawn), probs, atol=0.05)
    # each alternative reply: the same words, the alternative's title where the drawn one was, its id in the items
    policy = EnginePolicy(engine, lambda context: prompt, ["heat", "up", "river", "alien"])
    generation = generations[0]
    reply = policy.reply(generation)
    first = len(tiny_tokenizer(" " + NAMES[generation.items[0]], add_special_tokens=False)["input_ids"])
    for row, alternative in zip(generation.alternatives[0], reply.alternatives[0], strict=True):
        title = tiny_tokenizer(" " + NAMES[row], add_special_tokens=False)["input_ids"]
        tokens = generation.with_item(0, row, engine.titles())
        assert tokens == title + generation.tokens[first:]
        assert alternative == engine.decode(tokens) and alternative.items == [policy.item_ids[row]]
    # greedy decoding draws none
    greedy = Engine(tiny_lm, tiny_tokenizer, head, NAMES, max_new_tokens=3, greedy_items=True, item_alternatives=5)
    assert greedy.generate([prompt])[0].alternatives == []


def test_items_drawn_by_scores_with_a_text_part_follow_the_contexts_words(tiny_lm, tiny_tokenizer):
    from crslight.models.engine import EnginePolicy

    shows = ["Ocean Dreams (2001)", "Haunted Castle (1999)", "Space War (2010)", "Cooking with Grandma (2015)"]
    head = ItemHead.for_catalogue(tiny_lm, tiny_tokenizer, shows, text_turns=2)
    with torch.no_grad():
        head.text_scale.fill_(50.0)  # the words decide
    slot = tiny_tokenizer.convert_tokens_to_ids("<|item|>")
    engine = Engine(tiny_lm, tiny_tokenizer, head, shows, max_new_tokens=2, temperature=0, greedy_items=True)
    policy = EnginePolicy(engine, lambda turns: encode_prompt(tiny_tokenizer, turns) + [slot],
                          ["ocean", "castle", "space", "cooking"], record=True)
    contexts = [[{"role": "seeker", "text": "ghosts haunting an old castle", "items": []}],
                [{"role": "seeker", "text": "a war between spaceships", "items": []}],
                [{"role": "seeker", "text": "my grandmother's recipes", "items": []}]]
    replies = policy(contexts)
    assert [r.items for r in replies] == [["castle"], ["space"], ["cooking"]]
    # what PPO reads back: each slot carries its context's embedding, and the scores at it give the drawn item
    prompts, generations = zip(*[(p, g) for p, g, _ in policy.calls[0]], strict=True)
    samples = pack(list(prompts), list(generations), tiny_tokenizer.pad_token_id)
    text = head.encode_contexts([[f"seeker: {c[0]['text']}"] for c in contexts])
    assert torch.allclose(samples.slot_text, text)
    assert torch.equal(samples.select([2, 0]).slot_text, text[[0, 2]])  # slots keep row order within select
    with pytest.raises(ValueError, match="pass contexts"):
        engine.generate(list(prompts))


def test_lean_forward_equals_the_llama_body_on_left_padded_prompts_and_cached_steps(tiny_lm):
    from transformers import DynamicCache

    from crslight.models.decoder import lean_decoder
    from crslight.models.heads import position_ids_from_attention_mask

    torch.manual_seed(0)
    ids = torch.randint(0, 1000, (3, 7))
    mask = torch.ones(3, 7, dtype=torch.long)
    mask[0, :3] = 0
    mask[1, :1] = 0
    body, lean = decoder_of(tiny_lm), lean_decoder(tiny_lm)
    cache, kv = DynamicCache(), lean.new_cache(3, 8, torch.float32, "cpu")  # 8 columns: it must grow
    with torch.no_grad():
        theirs = body(input_ids=ids, attention_mask=mask, position_ids=position_ids_from_attention_mask(mask),
                      use_cache=True, past_key_values=cache).last_hidden_state
        ours = lean.forward(ids, position_ids_from_attention_mask(mask), mask.bool(), kv, torch.float32)
        torch.testing.assert_close(ours[mask.bool()], theirs[mask.bool()], atol=1e-5, rtol=1e-5)
        positions = mask.sum(1) - 1
        for _ in range(4):
            token = torch.randint(0, 1000, (3, 1))
            mask, positions = torch.cat([mask, mask.new_ones(3, 1)], 1), positions + 1
            theirs = body(input_ids=token, attention_mask=mask, position_ids=positions[:, None], use_cache=True,
                          past_key_values=cache).last_hidden_state
            torch.testing.assert_close(lean.forward(token, positions[:, None], mask.bool(), kv, torch.float32),
                                       theirs, atol=1e-5, rtol=1e-5)
    assert kv.length == 11 and kv.keys.shape[3] >= 11


def test_lean_decoding_reads_lora_and_trained_token_rows_and_follows_weight_updates(tiny_tokenizer):
    from crslight.models.loading import tiny_causal_lm
    from crslight.models.lora import apply_lora
    from crslight.models.tokenize import ITEM_TOKEN

    slot = tiny_tokenizer.convert_tokens_to_ids(ITEM_TOKEN)
    model = apply_lora(tiny_causal_lm(tiny_tokenizer, seed=1), LoRAConfig(r=4, alpha=8, dropout=0.0),
                       trainable_tokens=[slot]).eval()
    prompts = _prompts(tiny_tokenizer)
    lean, plain = (Engine(model, tiny_tokenizer, max_new_tokens=8, temperature=0, lean=x) for x in (True, False))
    for _ in range(2):
        with torch.no_grad():  # an update: the adapters and the slot token's trained row move
            for p in model.parameters():
                if p.requires_grad:
                    p.add_(0.5 * torch.randn_like(p))
        assert [g.tokens for g in lean.generate(prompts)] == [g.tokens for g in plain.generate(prompts)]
    # the slot token's row is the trained one: its logit equals the model's own
    with torch.no_grad():
        ids = torch.tensor([prompts[0]])
        theirs = model(input_ids=ids).logits[0, -1, slot]
        hidden = decoder_of(model)(input_ids=ids).last_hidden_state[0, -1]
    torch.testing.assert_close(hidden @ lean.backend().output_embeddings(torch.float32)[slot], theirs)


def test_lean_and_hugging_face_backends_sample_the_same_tokens_for_the_same_seed(tiny_lm, tiny_tokenizer):
    prompts = _prompts(tiny_tokenizer)
    runs = []
    for lean in (True, False):
        engine = Engine(tiny_lm, tiny_tokenizer, max_new_tokens=12, temperature=1.0, top_k=50, lean=lean)
        runs.append([g.tokens for g in engine.generate(prompts, generator=torch.Generator().manual_seed(3))])
    assert runs[0] == runs[1]


@pytest.mark.parametrize("top_k, top_p", [(0, 0.9), (50, 0.95), (7, 1.0), (0, 0.3)])
def test_sampling_filters_tokens_as_generates_warpers_do(top_k, top_p):
    from transformers.generation.logits_process import TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper

    from crslight.models.engine import sampling_logits

    logits = torch.randn(4, 300, generator=torch.Generator().manual_seed(0)) * 3
    theirs = TemperatureLogitsWarper(0.7)(None, logits.clone())
    if top_k:
        theirs = TopKLogitsWarper(top_k)(None, theirs)
    if top_p < 1:
        theirs = TopPLogitsWarper(top_p)(None, theirs)
    ours = sampling_logits(logits, 0.7, top_k, top_p)
    assert torch.equal(torch.isinf(ours), torch.isinf(theirs))
    torch.testing.assert_close(ours[~torch.isinf(ours)], theirs[~torch.isinf(theirs)])


def test_the_engine_is_the_only_place_that_decodes():
    """Rollouts, evaluation, chat and the LM simulator all decode through the engine: no ``.generate(`` call on a
    model anywhere else in the package."""
    import ast
    from pathlib import Path

    import crslight

    calls = []
    for path in Path(crslight.__file__).parent.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "generate":
                receiver = ast.unparse(node.func.value)
                # an engine, a chat session's own method, the synthetic scenario's dialogue generator
                if not (receiver.endswith(("engine", "_plain", "synthetic")) or receiver == "self"):
                    calls.append(f"{path.name}: {receiver}.generate")
    assert calls == []


def test_sampling_draws_each_token_with_its_probability_and_never_a_filtered_one():
    from crslight.models.engine import sample_categorical

    probs = torch.tensor([[0.5, 0.0, 0.2, 0.3, 0.0], [0.0, 0.0, 0.0, 0.1, 0.9]])
    generator = torch.Generator().manual_seed(0)
    draws = torch.stack([sample_categorical(probs, generator) for _ in range(20_000)])  # (20000, 2)
    for row in range(2):
        freq = torch.bincount(draws[:, row], minlength=5).float() / len(draws)
        assert freq[probs[row] == 0].sum() == 0
        # four standard errors of a frequency over 20,000 draws at most 0.0142
        torch.testing.assert_close(freq, probs[row], atol=0.0142, rtol=0)
    again = torch.stack([sample_categorical(probs, torch.Generator().manual_seed(0)) for _ in range(3)])
    assert torch.equal(again, torch.stack([sample_categorical(probs, torch.Generator().manual_seed(0))] * 3))
