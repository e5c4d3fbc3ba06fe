"""A tiny random seq2seq checkpoint built locally, with no downloads.

The checkpoint is a real BART layout (``config.json``, ``generation_config.json``,
``model.safetensors``, ``tokenizer.json``) so it loads through the same ``from_pretrained``
path production uses. Its output is gibberish; it exists to exercise the pipeline.

CLI: ``python -m streamproc.testing tiny-model DIR`` builds it and prints the directory.
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from tokenizers import Tokenizer

__all__ = ["TINY_CORPUS", "build_tiny_model", "main"]

_CHECKPOINT_FILES = (
    "config.json",
    "generation_config.json",
    "model.safetensors",
    "tokenizer.json",
    "tokenizer_config.json",
)
_SPECIAL_TOKENS = ("<s>", "<pad>", "</s>", "<unk>", "<mask>")  # BART ids 0..4
_VOCAB_SIZE = 800
_MAX_POSITIONS = 1024

TINY_CORPUS = """\
The city council approved a new budget on Tuesday after a long debate about public transport.
Officials said the plan would add more buses to busy routes and repair several old bridges.
Critics argued that the spending was too high, while supporters said the city could not wait.
The mayor told reporters that the vote was a step forward for every neighborhood.

Shares of technology companies rose sharply on Wednesday as investors welcomed strong earnings.
Analysts noted that demand for cloud services and computer chips remained high this quarter.
The central bank said it would keep interest rates unchanged for now, citing steady inflation.
Markets in Europe and Asia followed the gains, and oil prices fell slightly during the day.

Heavy rain caused flooding in several coastal towns over the weekend, forcing hundreds of
families to leave their homes. Emergency teams worked through the night to rescue people
trapped by rising water. The national weather service warned that more storms were expected
later in the week and urged residents to follow local news for updates.

Scientists reported the discovery of a new species of frog in a remote mountain forest.
The team said the small green animal has an unusual call that sounds like a bird.
Researchers hope the finding will help protect the forest, which is threatened by logging.
The study was published in an international journal of biology on Monday.

The national football team won its opening match of the tournament with a late goal.
Thousands of fans celebrated in the streets of the capital until the early morning.
The coach praised the players for their patience and said the next game would be harder.
Tickets for the final are expected to sell out within hours, according to the organizers.

A new report from the health ministry found that more people are exercising regularly.
Doctors welcomed the news but warned that diets high in sugar remain a serious problem.
The government plans to open more public parks and sports centers over the next five years.
Schools will also receive funding to improve meals and physical education for children.
"""


def _is_built(directory: Path) -> bool:
    return all((directory / name).is_file() for name in _CHECKPOINT_FILES)


def _token_id(tokenizer: Tokenizer, token: str) -> int:
    token_id = tokenizer.token_to_id(token)
    if token_id is None:
        raise RuntimeError(f"special token {token!r} missing from the trained vocabulary")
    return int(token_id)


def _save_checkpoint(target: Path) -> None:
    """Train the tokenizer, build the random model and save both into ``target``."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import (
        BartConfig,
        BartForConditionalGeneration,
        GenerationConfig,
        PreTrainedTokenizerFast,
    )

    raw = Tokenizer(models.BPE())
    raw.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    raw.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=_VOCAB_SIZE,
        min_frequency=1,
        special_tokens=list(_SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    raw.train_from_iterator(TINY_CORPUS.splitlines(), trainer=trainer)
    bos, pad, eos = (_token_id(raw, token) for token in ("<s>", "<pad>", "</s>"))
    raw.post_processor = processors.TemplateProcessing(
        single="<s> $A </s>",
        pair="<s> $A </s> </s> $B </s>",
        special_tokens=[("<s>", bos), ("</s>", eos)],
    )
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=raw,
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
        unk_token="<unk>",
        mask_token="<mask>",
        model_max_length=_MAX_POSITIONS,
    )

    config = BartConfig(
        vocab_size=raw.get_vocab_size(),
        d_model=32,
        encoder_layers=1,
        decoder_layers=1,
        encoder_attention_heads=2,
        decoder_attention_heads=2,
        encoder_ffn_dim=64,
        decoder_ffn_dim=64,
        max_position_embeddings=_MAX_POSITIONS,
        pad_token_id=pad,
        bos_token_id=bos,
        eos_token_id=eos,
        decoder_start_token_id=eos,
    )
    generation = GenerationConfig(
        bos_token_id=bos,
        eos_token_id=eos,
        pad_token_id=pad,
        decoder_start_token_id=eos,
        forced_bos_token_id=bos,
        forced_eos_token_id=eos,
        num_beams=1,
        do_sample=False,
        min_length=4,
        max_length=24,
        no_repeat_ngram_size=3,
    )
    torch.manual_seed(0)
    model = BartForConditionalGeneration(config)
    model.generation_config = generation
    model.eval()
    model.save_pretrained(target)
    tokenizer.save_pretrained(target)


def build_tiny_model(directory: Path | str) -> Path:
    """Build the tiny random BART checkpoint in ``directory`` (once) and return its path."""
    target = Path(directory).expanduser().resolve()
    if _is_built(target):
        return target
    if target.is_dir() and any(target.iterdir()):
        _save_checkpoint(target)  # a non-empty directory: write the files into it
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    try:
        _save_checkpoint(staging)
        staging.chmod(0o755)  # mkdtemp made it private
        try:
            os.replace(staging, target)  # atomic; fine while target is absent or empty
        except OSError:
            if not _is_built(target):  # nobody else won a race: give up loudly
                raise
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)
    return target


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``python -m streamproc.testing``."""
    parser = argparse.ArgumentParser(prog="python -m streamproc.testing", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    tiny = commands.add_parser("tiny-model", help="build a tiny random BART checkpoint in DIR")
    tiny.add_argument("directory", metavar="DIR", type=Path)
    args = parser.parse_args(argv)
    if args.command == "tiny-model":
        print(build_tiny_model(args.directory))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
