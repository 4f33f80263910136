"""``crslight export``: a training checkpoint's policy as a plain transformers folder.

The folder holds the policy with any LoRA adapters merged into its weights (safetensors), its tokenizer with the chat
template, and a generation config that stops at the end-of-turn token, so that::

    model = AutoModelForCausalLM.from_pretrained(out)

loads and generates with transformers alone (and ``crslight chat --policy out`` talks to it). The policy's item scores
go beside it (``item_scores.safetensors`` and ``item_catalogue.json``: the catalogue's ids and names in their row order),
so that ``crslight chat`` recommends the way the policy was trained to: the item drawn from those scores at the slot
token, its title written in. Value heads, optimizer states and the like stay behind: they belong to training.
"""

from __future__ import annotations

from pathlib import Path

from crslight.models.loading import find_checkpoint
from crslight.models.retrieval import save_item_scores
from crslight.modules.policy import load_policy_checkpoint, merge_lora


def export(ckpt: Path, out: Path) -> str:
    """Writes the policy of an ``SFTModule`` or ``PPOModule`` checkpoint as a transformers folder.

    Args:
        ckpt: A checkpoint written by ``crslight fit`` (``SFTModule`` or ``PPOModule``), or a run folder (its newest).
        out: The folder to write (created; files in it are overwritten).

    Returns:
        The folder's path, as a string.
    """
    module = load_policy_checkpoint(find_checkpoint(ckpt) or Path(ckpt))
    policy = merge_lora(module.policy)
    tokenizer = module.tokenizer
    policy.config.use_cache = True
    policy.generation_config.eos_token_id = tokenizer.eos_token_id
    policy.generation_config.pad_token_id = tokenizer.pad_token_id
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    policy.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    if module.item_head is not None and module.item_catalogue is not None:
        save_item_scores(out, module.item_head, module.item_catalogue["item_id"], module.item_catalogue["name"])
    return str(out)
