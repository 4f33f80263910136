"""Session-wide fixtures: the real SmolLM2 tokenizer, tiny random models that match it, the real-data folders, the
MiniLM encoder, and a private corpus cache."""

import os
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # tests never reach a model hub

import pytest  # noqa: E402

# The user's cache as it is at start-up: folder conftests may point CRSLIGHT_CACHE at a temporary
# folder per test, which would make the session fixtures re-convert the tokenizer from GGUF (5 s).
_CACHE_AT_START = os.environ.get("CRSLIGHT_CACHE")

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO / ".." / "shared" / "data"


def shared_folder(name: str) -> Path:
    """The real benchmark folder; missing is a skip on a laptop and a failure in CI (``CI=true``)."""
    folder = (SHARED_DATA / name).resolve()
    if not folder.is_dir():
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(f"real data folder {folder} is missing (required in CI)")
        pytest.skip(f"real data folder {folder} is missing")
    return folder


@pytest.fixture(scope="session")
def redial_root() -> Path:
    return shared_folder("redial")


@pytest.fixture(scope="session")
def opendialkg_root() -> Path:
    return shared_folder("opendialkg")


@pytest.fixture
def isolated_cache(tmp_path_factory, monkeypatch) -> Path:
    """``CRSLIGHT_CACHE`` at this session's own folder: converted corpora never go to, or come from, the user's cache
    (folder conftests make it autouse)."""
    folder = tmp_path_factory.getbasetemp() / "crslight-cache"
    monkeypatch.setenv("CRSLIGHT_CACHE", str(folder))
    return folder


@pytest.fixture(scope="session")
def minilm():
    """The MiniLM sentence model, loaded once for the whole session (metrics and signals share it through the cache)."""
    from crslight.models.encoder import load_sentence_model

    return load_sentence_model("minilm")


@pytest.fixture(scope="session")
def tiny_tokenizer():
    """The real SmolLM2 tokenizer (49152 tokens and the recommendation slot token, chat template), left padding, pad
    ``<|endoftext|>``: what a policy is trained with.

    Shared by the whole session: do not mutate it. For right padding pass ``padding_side="right"``
    to the call (``tiny_tokenizer(texts, padding=True, padding_side="right")``).
    """
    from crslight.models.loading import DEFAULT_POLICY, load_tokenizer

    with pytest.MonkeyPatch.context() as patch:
        if _CACHE_AT_START is None:
            patch.delenv("CRSLIGHT_CACHE", raising=False)
        else:
            patch.setenv("CRSLIGHT_CACHE", _CACHE_AT_START)
        return load_tokenizer(DEFAULT_POLICY, padding_side="left", item_token=True)


@pytest.fixture(scope="session")
def tiny_lm(tiny_tokenizer):
    """A random 2-layer Llama (hidden 64) over ``tiny_tokenizer``'s vocabulary, seed 0, eval mode.

    Shared by the whole session: do not train it in place. Tests that update weights take
    ``copy.deepcopy(tiny_lm)`` or build their own with ``crslight.models.tiny_causal_lm(tiny_tokenizer)``.
    """
    from crslight.models.loading import tiny_causal_lm

    return tiny_causal_lm(tiny_tokenizer, seed=0).eval()


@pytest.fixture(scope="module")
def one_thread():
    """One intra-op thread for a test module (``pytestmark = pytest.mark.usefixtures("one_thread")``): tiny models
    run fastest so, as two threads spin against each other on a busy two-core machine."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def tiny_policy(tiny_tokenizer, tmp_path_factory):
    """A folder with a tiny random Llama (seed 0) and the SmolLM2 tokenizer: what ``model:`` points at in a config.
    Shared by the whole session: read it, never write into it."""
    from crslight.models.loading import tiny_causal_lm

    folder = tmp_path_factory.mktemp("tiny_policy")
    tiny_causal_lm(tiny_tokenizer, seed=0).save_pretrained(folder)
    tiny_tokenizer.save_pretrained(folder)
    return str(folder)


def shrunk_config(dataset: str, stage: str, tiny_policy: str) -> dict:
    """configs/DATASET/STAGE.yaml with a tiny model, a few steps and a small corpus (everything else as shipped)."""
    import yaml

    config = yaml.safe_load((REPO / "configs" / dataset / f"{stage}.yaml").read_text())
    trainer, model, data = config["trainer"], config["model"]["init_args"], config["data"]["init_args"]
    trainer.update(enable_progress_bar=False, enable_model_summary=False, precision="32-true")
    data.update(batch_size=4)
    if dataset == "synthetic":
        data.update(n_dialogues=30)
    if stage == "reward":
        model["backbone"] = "tiny"
        trainer.update(max_steps=3, val_check_interval=3)
    else:
        model["model"] = tiny_policy
        data.update(max_length=96)  # the tokenizer follows the model
        if stage == "sft":
            trainer.update(max_steps=3, val_check_interval=3, limit_val_batches=1)
        else:
            model.update(max_new_tokens=6, minibatch_size=4, micro_batch_size=4)
            trainer.update(limit_train_batches=2, limit_val_batches=1)
    return config


@pytest.fixture
def shrunk_configs(tiny_policy):
    """Writes configs/DATASET's sft, reward and ppo configs, shrunk (:func:`shrunk_config`), into a folder."""
    import yaml

    def write(dataset: str, folder: Path) -> Path:
        folder.mkdir(parents=True)
        for stage in ("sft", "reward", "ppo"):
            (folder / f"{stage}.yaml").write_text(yaml.safe_dump(shrunk_config(dataset, stage, tiny_policy)))
        return folder

    return write


@pytest.fixture(scope="session")
def tiny_recommender(tiny_tokenizer, tmp_path_factory):
    """Like ``tiny_policy``, but the recommendation slot token is likely (about half of the time after a chat prompt),
    so that rollouts recommend items without training first. Read it, never write into it."""
    import torch

    from crslight.models.loading import tiny_causal_lm
    from crslight.models.retrieval import decoder_of
    from crslight.models.tokenize import encode_prompt

    model = tiny_causal_lm(tiny_tokenizer, seed=0)
    prompts = [encode_prompt(tiny_tokenizer, [{"role": "seeker", "text": text, "items": []}])
               for text in ("Hi, I want a comedy", "Something calm please", "I'm bored", "Any thriller?")]
    with torch.no_grad():
        hidden = torch.cat([decoder_of(model)(input_ids=torch.tensor([p])).last_hidden_state[0] for p in prompts])
        mean = hidden.mean(0)
        model.get_output_embeddings().weight[tiny_tokenizer.convert_tokens_to_ids("<|item|>")] = 9 * mean / mean.norm() ** 2
    folder = tmp_path_factory.mktemp("tiny_recommender")
    model.save_pretrained(folder)
    tiny_tokenizer.save_pretrained(folder)
    return str(folder)


@pytest.fixture(scope="session")
def tiny_reward(tmp_path_factory):
    """An untrained tiny R_phi saved as a checkpoint, as ``crslight fit`` would write it (a random 2-layer Llama
    over the SmolLM2 tokenizer)."""
    import lightning
    import torch

    from crslight.modules.reward import RewardModule

    module = RewardModule(backbone="tiny")
    path = tmp_path_factory.mktemp("reward") / "reward.ckpt"
    torch.save({"state_dict": module.state_dict(), "hyper_parameters": dict(module.hparams),
                "pytorch-lightning_version": lightning.__version__}, path)
    return str(path)
