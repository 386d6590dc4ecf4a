"""lowrank_jax.data: source -> tokenizer -> packing -> grain loader.

Plain arguments in, numpy batches out; nothing here reads the trainer's
config. See ``pipeline`` for the stream and its checkpoint state.
"""

from lowrank_jax.data.errors import DataError
from lowrank_jax.data.packing import PackedIterDataset
from lowrank_jax.data.pipeline import make_eval_batches, make_train_iterator
from lowrank_jax.data.sources import (
    JsonlSource,
    SourceView,
    SyntheticLanguage,
    SyntheticTokenizer,
    TextSource,
    TfdsSource,
    split_holdout,
)
from lowrank_jax.data.tokenizers import (
    ByteTokenizer,
    SentencePieceTokenizer,
    make_tokenizer,
)

__all__ = [
    "ByteTokenizer", "DataError", "JsonlSource", "PackedIterDataset",
    "SentencePieceTokenizer", "SourceView", "SyntheticLanguage",
    "SyntheticTokenizer", "TextSource", "TfdsSource", "make_eval_batches",
    "make_tokenizer", "make_train_iterator", "split_holdout",
]
