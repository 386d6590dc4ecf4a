"""lowrank_jax.data: source -> tokenizer -> packing -> grain loader.

Plain arguments in, numpy batches out; nothing here reads the trainer's
config. See ``pipeline`` for the stream and its checkpoint state.
"""

from lowrank_jax.data import hf_source
from lowrank_jax.data.bad_records import SkipBadRecords
from lowrank_jax.data.errors import DataError, DataFileError
from lowrank_jax.data.packing import PackedIterDataset
from lowrank_jax.data.instructions import (
    InstructionSource,
    make_instruction_eval_batches,
    make_instruction_iterator,
)
from lowrank_jax.data.images import (
    ImageFolderSource,
    ImageTransform,
    NpzImageSource,
    TfdsImageSource,
    make_image_eval_batches,
    make_image_train_iterator,
    offline_npz,
    write_medmnist_npz,
)
from lowrank_jax.data.pipeline import make_eval_batches, make_train_iterator
from lowrank_jax.data.hf_source import DatasetSource, TextStream
from lowrank_jax.data.sources import (
    Concatenation,
    JsonlSource,
    ParquetSource,
    SourceView,
    SyntheticLanguage,
    SyntheticTokenizer,
    TextSource,
    TfdsSource,
    file_source,
    split_holdout,
)
from lowrank_jax.data.tokenizers import (
    ByteTokenizer,
    HFTokenizer,
    TiktokenTokenizer,
    SentencePieceTokenizer,
    make_tokenizer,
)

__all__ = [
    "SkipBadRecords",
    "InstructionSource", "make_instruction_eval_batches", "make_instruction_iterator",
    "Concatenation", "DatasetSource", "ParquetSource", "TextStream", "file_source", "hf_source",
    "ImageFolderSource", "ImageTransform", "NpzImageSource", "TfdsImageSource",
    "make_image_eval_batches", "make_image_train_iterator", "offline_npz", "write_medmnist_npz",
    "HFTokenizer", "TiktokenTokenizer",
    "ByteTokenizer", "DataError", "DataFileError", "JsonlSource", "PackedIterDataset",
    "SentencePieceTokenizer", "SourceView", "SyntheticLanguage",
    "SyntheticTokenizer", "TextSource", "TfdsSource", "make_eval_batches",
    "make_tokenizer", "make_train_iterator", "split_holdout",
]
