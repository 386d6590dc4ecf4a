"""The settings vocabulary: every config key as a typed, frozen field with its default and checks.

One frozen dataclass per section (`model`, `data`, `train`, `parallel`, `optimizer`), and
`RunConfig`, the whole resolved run. A field's default, its check and its comment sit together,
so a bad value is one `ConfigError` naming its dotted key and the valid choices. The defaults are
also what `configs/base.py` starts every config from (`config.default_config`).

This module is a leaf of `lowrank_jax.train`: it reads single values and single sections. Checks
that need several sections, the method registry or the model's shapes are `config.resolve`'s.
To add a key: add a field here (or in your method's settings) with `setting(...)`.
"""

from __future__ import annotations

import dataclasses
import glob
import json
import math
import os
from collections.abc import Mapping
from typing import Any, Callable, ClassVar, Iterable

import ml_collections

from lowrank_jax import models
from lowrank_jax.data import hf_source as data_hf
from lowrank_jax.data import images as data_images
from lowrank_jax.data import instructions as data_instructions
from lowrank_jax.data import samples
from lowrank_jax.nn.velora import V_INITS
from lowrank_jax.optim.clipping import CLIP_MODES
from lowrank_jax.optim.quantize import SUPPORTED_BITS
from lowrank_jax.train import hub, metrics
from lowrank_jax.train.errors import ConfigError

# --- checks: (dotted key, value) -> the value, or ConfigError -------------------------------

Check = Callable[[str, Any], Any]


def _is_number(value: Any) -> bool:
  """A finite int or float: NaN and infinity pass no numeric check (lr=nan would train NaN)."""
  return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def positive_int(key: str, value: Any) -> int:
  if not _is_number(value) or not float(value).is_integer():
    raise ConfigError(key, f"must be a positive integer, got {value!r}")
  if value <= 0:
    raise ConfigError(key, f"must be > 0, got {value!r}")
  return int(value)


def non_negative_int(key: str, value: Any) -> int:
  if not _is_number(value) or not float(value).is_integer() or value < 0:
    raise ConfigError(key, f"must be an integer >= 0, got {value!r}")
  return int(value)


def positive(key: str, value: Any) -> float:
  if not _is_number(value):
    raise ConfigError(key, f"must be a positive number, got {value!r}")
  if value <= 0:
    raise ConfigError(key, f"must be > 0, got {value!r}")
  return value


def non_negative(key: str, value: Any) -> float:
  if not _is_number(value) or value < 0:
    raise ConfigError(key, f"must be a number >= 0, got {value!r}")
  return value


def in_range(lo: float, hi: float, *, hi_inclusive: bool = False) -> Check:
  """A number in [lo, hi) (or [lo, hi])."""
  def check(key: str, value: Any) -> float:
    if not (_is_number(value) and lo <= value and (value <= hi if hi_inclusive else value < hi)):
      raise ConfigError(key, f"must be in [{lo}, {hi}{']' if hi_inclusive else ')'}, got {value!r}")
    return value
  return check


def boolean(key: str, value: Any) -> bool:
  if not isinstance(value, bool):
    raise ConfigError(key, f"must be True or False, got {value!r}")
  return value


def one_of(choices: Iterable[Any] | Callable[[], Iterable[Any]]) -> Check:
  """One of `choices` (a sequence, or a function returning one for registries that grow)."""
  def check(key: str, value: Any) -> Any:
    valid = list(choices() if callable(choices) else choices)
    if value not in valid:
      raise ConfigError(key, f"unknown value {value!r}", valid)
    return value
  return check


def _remat(key: str, value: Any) -> str:
  """model.remat: a policy name, or the old boolean (also as the strings 'True' / 'False')."""
  if isinstance(value, str) and value.lower() in ("true", "false"):
    value = value.lower() == "true"
  if not isinstance(value, (bool, str)) or (isinstance(value, str) and value not in models.REMAT_POLICIES):
    raise ConfigError(key, f"unknown value {value!r}", [*models.REMAT_POLICIES, True, False])
  return models.remat_policy(value)


def comma_list(spec: str) -> list[str]:
  """"a, b,c" -> ['a', 'b', 'c']: the one parser of comma-separated config values."""
  return [item.strip() for item in spec.split(",") if item.strip()]


def layer_names(key: str, spec: Any) -> str:
  """A comma-separated list of the models' linear layer names, e.g. "q,k,v,o"."""
  names = comma_list(spec) if isinstance(spec, str) else []
  if not names:
    raise ConfigError(key, f"names no layer, got {spec!r}", models.layer_names())
  for name in names:
    if name not in models.layer_names():
      raise ConfigError(key, f"unknown layer name {name!r}", models.layer_names())
  return spec


def setting(default: Any, *checks: Check) -> Any:
  """A settings field: its default and the checks its value passes, in order."""
  if isinstance(default, dict):
    return dataclasses.field(default_factory=lambda: dict(default), metadata={"checks": checks})
  return dataclasses.field(default=default, metadata={"checks": checks})


def section(cls: type) -> Any:
  """A field holding a nested settings dataclass, read from `cls.SECTION`."""
  return dataclasses.field(default_factory=cls, metadata={"section": cls})


# --- reading sections --------------------------------------------------------------------------

def _node(config: Any, dotted: str) -> Any:
  """The value at a dotted key of a ConfigDict (or nested dict); ConfigError if absent."""
  node = config
  for part in dotted.split("."):
    try:
      node = node[part]
    except (KeyError, AttributeError, TypeError):
      raise ConfigError(dotted, "missing (configs should start from configs/base.py)") from None
  return node


def read(cls: type, config: Any) -> Any:
  """An instance of settings dataclass `cls` from `config` at `cls.SECTION`, every field checked."""
  values, replaced = {}, cls.replaced(config)
  for f in dataclasses.fields(cls):
    if "section" in f.metadata:
      values[f.name] = read(f.metadata["section"], config)
      continue
    key = f"{cls.SECTION}.{f.name}"
    value = replaced[f.name] if f.name in replaced else _node(config, key)
    if isinstance(value, ml_collections.ConfigDict):
      value = value.to_dict()
    for check in f.metadata.get("checks", ()):
      value = check(key, value)
    values[f.name] = value
  settings = cls(**values)
  settings.check()
  return settings


class Settings:
  """Base of every settings dataclass: `SECTION` is its dotted place in the config."""
  SECTION: ClassVar[str] = ""

  def check(self) -> None:
    """Checks across this section's fields (each field's own checks have run)."""

  @classmethod
  def replaced(cls, config: Any) -> dict[str, Any]:
    """{field: value} replacing what `config` sets for those fields, before their checks run
    (`data.preset`): a replaced value is checked, and seen by every reader, as if the config set it."""
    return {}

  def to_dict(self) -> dict[str, Any]:
    """The section as the config spells it (what `config.json` holds)."""
    out = {}
    for f in dataclasses.fields(self):
      value = getattr(self, f.name)
      out[f.name] = value.to_dict() if isinstance(value, Settings) else value
    return out


def defaults(cls: type) -> ml_collections.ConfigDict:
  """A ConfigDict of `cls`'s defaults (nested sections included)."""
  out = ml_collections.ConfigDict()
  for f in dataclasses.fields(cls):
    if "section" in f.metadata:  # a section of its own (model.velora), not one read from elsewhere
      nested = f.metadata["section"]
      if nested.SECTION == f"{cls.SECTION}.{f.name}":
        out[f.name] = defaults(nested)
    else:
      default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
      out[f.name] = ml_collections.ConfigDict(default) if isinstance(default, Mapping) else default
  return out


# --- the sections ------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class VeLoRASettings(Settings):
  """Compress the activations these linears save for backward to rank-1 sub-token projections.

  Works on dense and LoRA linears and composes with any optimizer method.
  """
  SECTION: ClassVar[str] = "model.velora"
  # "layer[:sub_token_size],..." e.g. "v:8,down:16" (the paper's choice); empty = off.
  layers: str = setting("")
  sub_token_size: int = setting(16, positive_int)  # for layers listed without a size
  scale: float = setting(1.0, positive)  # multiplies the compressed weight gradient
  v_init: str = setting("batch_average_once", one_of(V_INITS))  # batch_average_once, batch_average, random

  @property
  def sizes(self) -> dict[str, int]:
    """{layer name: sub-token size} of `layers`."""
    out = {}
    for item in comma_list(self.layers):
      name, _, size = item.partition(":")
      try:
        out[name.strip()] = int(size) if size.strip() else self.sub_token_size
      except ValueError:
        raise ConfigError(f"{self.SECTION}.layers", "expected 'layer[:sub_token_size],...' such as "
                          f"'v:8,down:16', got {self.layers!r}") from None
    return out

  def check(self) -> None:
    self.sizes  # noqa: B018  (parses, or names the key)


WEIGHT_BITS = (16, 8)  # model.weight_bits: param_dtype as it is, or int8 (nn.int8_weight)
BASE_BITS = (16, 8, 4)  # model.base_bits: param_dtype as it is, int8 per output column, or NF4 (nn.quantized_base)


@dataclasses.dataclass(frozen=True)
class ModelSettings(Settings):
  SECTION: ClassVar[str] = "model"
  family: str = setting("llama", one_of(models.family_names))  # llama, gpt2 or vit
  # llama: tiny, 60m, 130m, 350m, 1b, 7b (GaLore paper shapes); gpt2: tiny, 124m, 350m, 774m, 1.5b
  size: str = setting("tiny")
  dtype: str = setting("float32", one_of(models.DTYPES))  # compute dtype
  param_dtype: str = setting("float32", one_of(models.DTYPES))  # storage dtype of parameters (and Adam moments)
  # Trainable weights (every linear's kernel, the head, the token embedding) stored as 16 (param_dtype) or 8
  # bits: int8 codes with float32 scales, updated with stochastic rounding (lowrank_jax/nn/int8_weight.py).
  weight_bits: int = setting(16, one_of(WEIGHT_BITS))
  weight_block: int = setting(0, non_negative_int)  # rows per int8 scale; 0: one scale per output column
  # The frozen base kernels under LoRA adapters (optimizer.name=lora) stored as 16 (param_dtype), 8 (int8, a
  # scale per output column) or 4 bits (NF4 with a scale per 64 inputs: QLoRA), dequantized one layer at a time
  # in the forward and backward passes (lowrank_jax/nn/quantized_base.py). A checkpoint is quantized as it loads.
  base_bits: int = setting(16, one_of(BASE_BITS))
  base_double_quant: bool = setting(True, boolean)  # base_bits=4: the scales themselves in 8 bits (QLoRA): 4.13 bits a weight
  tie_embeddings: bool = setting(False, boolean)  # new language models: the head reuses the token embedding matrix
  # Activation checkpointing per transformer block: none, block (keep only each block's input) or
  # matmul_inputs (keep the linears' inputs); the old True / False mean block / none.
  remat: str = setting("none", _remat)
  # The attention kernel: xla (the [T, T] scores as XLA products; every platform), cudnn (cuDNN's fused flash
  # attention: a GPU and model.dtype=bfloat16), splash (Pallas' flash attention for TPU: sequences in multiples
  # of 128, one device per program), or auto: cudnn where the run compiles for a GPU and cuDNN takes the model
  # (bfloat16, head width a multiple of 8 up to 128) and the rows carry no segment ids (instruction data), else xla.
  attention: str = setting("auto", one_of(("auto",) + models.ATTENTION_KERNELS))
  # Transformer blocks: 0 = the size's (or the model.init_from checkpoint's). Another depth builds the same
  # widths deeper or shallower: new models, memory reports and --fit's small-depth calibration compiles
  # (a checkpoint's weights are not cut to it: training from model.init_from refuses it).
  n_layers: int = setting(0, non_negative_int)
  vocab_multiple: int = setting(128, positive_int)  # pad the vocabulary up to a multiple (fast matmuls)
  # Linear kind per layer name (q, k, v, o, gate, up, down, head); unnamed layers are 'dense'.
  # Methods such as LoRA choose kinds for their layers; entries here win.
  linear: dict = setting({})
  velora: VeLoRASettings = section(VeLoRASettings)
  # A Hugging Face model directory (config.json + safetensors: LLaMA, GPT-2 or ViT), or a Hub id
  # (owner/name[@revision], fetched into the Hugging Face cache: train/hub.py), to start from: its
  # architecture, shapes and vocabulary replace family/size/tie_embeddings/vocab_multiple; its weights
  # the init (a ViT's head is new when the data's classes differ). config.json records an id as
  # owner/name@commit.
  init_from: str = setting("", hub.checkpoint)
  # Write the final model here as a Hugging Face directory (adapters merged); empty = don't.
  export_to: str = setting("")
  # Write the final LoRA adapters here in the PEFT format (adapter_config.json + adapter_model.safetensors: what
  # peft, transformers and vLLM load over the base model); empty = don't.
  export_adapter_to: str = setting("")
  # Start the LoRA adapters from a PEFT adapter directory (ours or PEFT's) instead of their fresh initialisation.
  init_adapter_from: str = setting("")

  @property
  def resolved_family(self) -> str:
    """The family that runs: the `init_from` checkpoint's architecture, else `family`."""
    return models.family_of(self.init_from).name if self.init_from else self.family

  @property
  def name(self) -> str:
    """How logs name the model: its checkpoint (directory or Hub id), else family-size."""
    return hub.name_of(self.init_from) if self.init_from else f"{self.family}-{self.size}"

  def to_dict(self) -> dict[str, Any]:
    return {**super().to_dict(), "init_from": hub.spec_of(self.init_from)}  # a Hub snapshot: owner/name@commit

  def check(self) -> None:
    if self.init_from:
      try:
        models.pretrained_config(self.init_from)
      except models.PretrainedError as e:
        raise ConfigError("model.init_from", str(e)) from None
    if self.export_to and models.pretrained.read_existing(self.export_to):
      raise ConfigError("model.export_to", f"{self.export_to} already holds a checkpoint; choose a new directory")
    if self.export_adapter_to and models.peft_adapter.existing_adapter(self.export_adapter_to):
      raise ConfigError("model.export_adapter_to", f"{self.export_adapter_to} already holds an adapter; choose a new "
                        "directory")
    if self.init_adapter_from:
      try:
        models.peft_adapter.read_adapter_config(self.init_adapter_from)
      except ValueError as e:
        raise ConfigError("model.init_adapter_from", str(e)) from None
    one_of(sorted(models.get_family(self.family).sizes))("model.size", self.size)
    for name, kind in self.linear.items():
      if name not in models.layer_names():
        raise ConfigError(f"model.linear.{name}", "unknown layer name", models.layer_names())
      if kind not in models.linear_kinds():
        raise ConfigError(f"model.linear.{name}", f"unknown linear kind {kind!r}", models.linear_kinds())


@dataclasses.dataclass(frozen=True)
class SyntheticSettings(Settings):
  """The built-in language (data.source 'synthetic'): a sparse Markov chain with a known entropy rate."""
  SECTION: ClassVar[str] = "data.synthetic"
  vocab_size: int = setting(256, positive_int)  # word states V (token ids V + 2 with pad and EOS)
  branching: int = setting(4, positive_int)  # successors per word (<= vocab_size); the j-th has probability ~ 1/j
  stop_prob: float = setting(1 / 64, in_range(0.0, 1.0))  # after each word, the document ends with this probability

  def check(self) -> None:
    if self.branching > self.vocab_size:
      raise ConfigError("data.synthetic.branching", f"must be <= data.synthetic.vocab_size={self.vocab_size}")
    if self.stop_prob <= 0:
      raise ConfigError("data.synthetic.stop_prob", "must be > 0 (documents must end)")


# Image classification (model.family 'vit'): MedMNIST-layout .npz files, a folder per class, a TFDS
# image dataset, or real images installed offline (Debian's Fashion-MNIST, scikit-learn's digits).
IMAGE_SOURCES = ("npz", "image_folder", "tfds_images") + tuple(sorted(data_images.OFFLINE_DATASETS))
SOURCES = ("synthetic", "jsonl", "text", "tfds", "hf", "instructions") + IMAGE_SOURCES
# data.preset: named data that replace the keys they give, whatever the config file or the command
# line set for those keys (so `--config.data.preset=sample` turns any language-model config, the
# paper's C4 ones included, into a quick run on the sample shipped in the package).
DATA_PRESETS = {
    "": {},
    "sample": {"source": "jsonl", "path": str(samples.C4_TRAIN), "eval_path": str(samples.C4_VALIDATION),
               "text_key": "text", "tokenizer": str(samples.T5_TOKENIZER)},
}
# The sample's 300 documents (about 150k T5 tokens; 100 validation documents, 46k) cannot feed a
# paper recipe's steps of 512 x 256 tokens, nor its validation batches of 256 x 256, and a CPU
# would take many minutes a step: `sample` also lowers these train keys to at most these values
# (a config that asks for less keeps its own), so it is a check of the config that trains in minutes.
SAMPLE_RUN_CAPS = {"batch_size": 8, "eval_batches": 4, "steps": 50}


def _floats(key: str, value: Any) -> str:
  """A comma-separated list of numbers, e.g. '0.485,0.456,0.406'."""
  try:
    numbers = [float(x) for x in comma_list(str(value))]
  except ValueError:
    numbers = []
  if not numbers:
    raise ConfigError(key, f"expected numbers separated by commas such as '0.5' or '0.485,0.456,0.406', got {value!r}")
  return str(value)


@dataclasses.dataclass(frozen=True)
class ImageSettings(Settings):
  """Image classification data: the image the model sees and the light training augmentation."""
  SECTION: ClassVar[str] = "data.image"
  size: int = setting(0, non_negative_int)  # pixels per side fed to the model (resized); 0 = the data's own
  channels: int = setting(0, one_of((0, 1, 3)))  # 1 grey or 3 RGB (converted); 0 = the data's own
  mean: str = setting("0.5", _floats)  # per channel (or one for all) of x / 255; HF ViT: 0.5
  std: str = setting("0.5", _floats)  # x -> (x / 255 - mean) / std
  crop_padding: int = setting(0, non_negative_int)  # augmentation: pad this many pixels, random crop (0: off)
  flip: bool = setting(False, boolean)  # augmentation: random left-right flip
  image_key: str = setting("image")  # tfds_images: the image feature
  label_key: str = setting("label")  # tfds_images: the label feature

  @property
  def means(self) -> tuple[float, ...]:
    return tuple(float(x) for x in comma_list(self.mean))

  @property
  def stds(self) -> tuple[float, ...]:
    return tuple(float(x) for x in comma_list(self.std))

  def check(self) -> None:
    if any(x <= 0 for x in self.stds):
      raise ConfigError("data.image.std", f"must be positive, got {self.std!r}")


@dataclasses.dataclass(frozen=True)
class InstructionSettings(Settings):
  """data.source 'instructions': JSON-lines prompt/response examples, the loss on the response only."""
  SECTION: ClassVar[str] = "data.instructions"
  format: str = setting("alpaca", one_of(data_instructions.FORMATS))  # alpaca or prompt_response
  template: str = setting("{prompt}")  # prompt_response: the prompt, a str.format template over the record
  response_key: str = setting("response")  # prompt_response: the field holding the response
  pack: bool = setting(True, boolean)  # several examples per row (attention kept apart), else one + padding
  train_on_prompt: bool = setting(False, boolean)  # also count prompt tokens (Alpaca-LoRA's train_on_inputs)


def _streaming(key: str, value: Any) -> str:
  """data.hf.streaming: 'auto', 'true' or 'false' (any case; True / False too)."""
  text = str(value).lower() if isinstance(value, (bool, str)) else ""
  if text not in ("auto", "true", "false"):
    raise ConfigError(key, f"unknown value {value!r}", ["auto", "true", "false"])
  return text


@dataclasses.dataclass(frozen=True)
class HFSettings(Settings):
  """data.source 'hf': a Hugging Face dataset, streamed from the Hub or read from local files (docs/data.md)."""
  SECTION: ClassVar[str] = "data.hf"
  # a Hub dataset id ('allenai/c4'), a local dataset folder, or Parquet/JSON/Arrow/CSV file(s) or globs, comma separated
  path: str = setting("")
  name: str = setting("")  # the dataset's config ('en' of allenai/c4); empty: its default
  split: str = setting("train")  # the split trained on; with streaming off also a slice such as 'train[:95%]'
  eval_split: str = setting("validation")  # the split evaluated (its first train.eval_batches batches)
  text_field: str = setting("text")  # the column holding the document text
  revision: str = setting("")  # Hub ids: a branch, tag or commit; empty: the default branch
  # auto: stream a Hub id (read while training, nothing prepared first), read local files at random; true /
  # false force it (false downloads a Hub dataset and prepares it as Arrow files before training)
  streaming: str = setting("auto", _streaming)
  # streaming with data.shuffle: documents permuted in seeded blocks of this many, besides a new shard order
  # every epoch (0: the shard order only); a resume reads the current block again
  shuffle_buffer: int = setting(1000, non_negative_int)

  @property
  def streams(self) -> bool:
    """Whether the data is streamed: `streaming`, with auto resolved (a Hub id streams)."""
    return data_hf.is_hub_id(self.path) if self.streaming == "auto" else self.streaming == "true"


def _files(key: str, spec: str) -> None:
  patterns = comma_list(spec)
  if not patterns:
    raise ConfigError(key, "is empty: give one or more files or glob patterns (comma separated)")
  for pattern in patterns:
    if not glob.glob(os.path.expanduser(pattern)):
      raise ConfigError(key, f"no file matches {pattern!r} (working directory: {os.getcwd()})")


@dataclasses.dataclass(frozen=True)
class DataSettings(Settings):
  SECTION: ClassVar[str] = "data"
  # 'sample': the C4 sample shipped in the package (lowrank_jax/data/samples.py) as jsonl with the T5
  # vocabulary, replacing source, path, eval_path, text_key and tokenizer, and lowering train.batch_size
  # (<= 8), steps (<= 50) and eval_batches (<= 4) to what the sample feeds; '' = none
  preset: str = setting("", one_of(DATA_PRESETS))
  source: str = setting("synthetic", one_of(SOURCES))  # what to train on (docs/data.md); the image sources need a vit
  path: str = setting("")  # jsonl/text/instructions: file(s) or glob(s) for training (.parquet too), comma separated
  eval_path: str = setting("")  # jsonl/text: validation file(s); empty = hold out eval_holdout
  eval_holdout: float = setting(0.05)  # fraction of documents held out when eval_path is empty
  text_key: str = setting("text")  # jsonl/tfds, and .parquet files of jsonl/text: the field holding the document text
  tfds_name: str = setting("c4/en:3.1.0")  # tfds: dataset/config:version under data_dir
  data_dir: str = setting("")  # tfds: data_dir (empty = $TFDS_DATA_DIR or ~/tensorflow_datasets)
  train_split: str = setting("train")  # the split trained on: tfds, tfds_images; npz-layout sources: train, val or test
  eval_split: str = setting("validation")  # the split evaluated (as train_split; npz layout: val or test)
  # 'byte', a SentencePiece .model, an HF tokenizer.json, a tiktoken BPE file (GPT-2 r50k), a model
  # directory or a Hub id (owner/name[@revision], as model.init_from); empty: model.init_from's own
  # tokenizer, else 'byte' (ignored by synthetic)
  tokenizer: str = setting("", hub.tokenizer)
  seq_len: int = setting(128, positive_int)  # tokens per packed sequence (the model's context)
  shuffle: bool = setting(True, boolean)  # shuffle the training examples (seeded by seed); False: source order
  # a record that cannot be read (a malformed JSON line, text that is not UTF-8, a truncated image):
  # error = save a checkpoint and stop, naming file and line; skip = go on, counted as skipped_records
  on_bad_record: str = setting("error", one_of(("error", "skip")))
  synthetic: SyntheticSettings = section(SyntheticSettings)
  instructions: InstructionSettings = section(InstructionSettings)
  hf: HFSettings = section(HFSettings)
  image: ImageSettings = section(ImageSettings)

  @classmethod
  def replaced(cls, config: Any) -> dict[str, Any]:
    return DATA_PRESETS[one_of(DATA_PRESETS)("data.preset", _node(config, "data.preset"))]

  @property
  def paths(self) -> list[str]:
    return [os.path.expanduser(p) for p in comma_list(self.path)]

  @property
  def eval_paths(self) -> list[str]:
    return [os.path.expanduser(p) for p in comma_list(self.eval_path)]

  def to_dict(self) -> dict[str, Any]:
    return {**super().to_dict(), "tokenizer": hub.spec_of(self.tokenizer)}  # a Hub snapshot: owner/name@commit

  def check(self) -> None:
    if self.seq_len < 2:
      raise ConfigError("data.seq_len", "must be >= 2 (a sequence predicts its next tokens)")
    if self.source == "synthetic":
      return
    if self.source in ("npz", "image_folder"):
      kind = "file" if self.source == "npz" else "folder"
      for key, path in (("data.path", self.path), ("data.eval_path", self.eval_path)):
        if (path or key == "data.path") and not os.path.exists(os.path.expanduser(path)):
          raise ConfigError(key, f"{self.source}: no such {kind} {path!r} (working directory: {os.getcwd()})")
    if self.source in ("jsonl", "text", "instructions"):
      _files("data.path", self.path)
      if self.eval_path:
        _files("data.eval_path", self.eval_path)
      else:
        in_range(0.0, 1.0)("data.eval_holdout", self.eval_holdout)
        if self.eval_holdout <= 0:
          raise ConfigError("data.eval_holdout", "must be > 0 when data.eval_path is empty (or set data.eval_path)")
    if self.source == "hf":
      self._check_hf()
    if self.source in ("tfds", "tfds_images"):
      try:
        import tensorflow_datasets  # noqa: F401
      except ImportError:
        raise ConfigError("data.source", "'tfds' needs tensorflow-datasets: pip install 'lowrank-jax[tfds]'") from None
    if self.tokenizer not in ("", "byte") and not os.path.exists(os.path.expanduser(self.tokenizer)):
      raise ConfigError("data.tokenizer", f"file not found: {self.tokenizer!r}; give 'byte', the path of a "
                        "SentencePiece .model (GaLore used the T5 C4 vocabulary), a tokenizer.json, a tiktoken "
                        "BPE file or a model directory")

  def _check_hf(self) -> None:
    import importlib.util

    if importlib.util.find_spec("datasets") is None:  # (without importing it: a second of start-up)
      raise ConfigError("data.source", f"'hf' needs the datasets library: pip install 'lowrank-jax[hf]'{hub.DATA_WITHOUT_HUB}")
    if not self.hf.path.strip():
      raise ConfigError("data.hf.path", "is empty: give a Hub dataset id such as 'allenai/c4', a dataset folder, "
                        "or Parquet/JSON files")
    try:
      data_hf.locate(self.hf.path)
    except FileNotFoundError as e:
      raise ConfigError("data.hf.path", str(e)) from None
    for key, split in (("data.hf.split", self.hf.split), ("data.hf.eval_split", self.hf.eval_split)):
      if not split.strip():
        raise ConfigError(key, "is empty: name a split of the dataset")
      if self.hf.streams and "[" in split:
        raise ConfigError(key, f"{split!r}: slices of a split need random access: set data.hf.streaming=false")


ACCUM_DTYPES = ("float32", "param")  # train.accum_dtype: see make_train_step
NONFINITE_GUARDS = ("step", "loss")  # train.nonfinite_guard: see make_train_step


@dataclasses.dataclass(frozen=True)
class TrainSettings(Settings):
  SECTION: ClassVar[str] = "train"

  @classmethod
  def replaced(cls, config: Any) -> dict[str, Any]:
    if _node(config, "data.preset") != "sample":
      return {}
    lowered = {key: cap for key, cap in SAMPLE_RUN_CAPS.items() if _node(config, f"train.{key}") > cap}
    if "batch_size" in lowered:
      lowered["grad_accum"] = 1  # (the config's accumulation divides its own batch, not this one)
    return lowered
  steps: int = setting(300, positive_int)  # optimizer steps
  batch_size: int = setting(16, positive_int)  # global batch, in sequences, per optimizer step
  grad_accum: int = setting(1, positive_int)  # micro-batches per step (batch_size must divide evenly)
  # What the micro-batch gradients are summed in: float32, or param (the parameters' dtype: with
  # bfloat16 weights the accumulator takes half the bytes, each sum rounded to bfloat16).
  accum_dtype: str = setting("float32", one_of(ACCUM_DTYPES))
  log_every: int = setting(10, positive_int)  # steps between metric fetches (the only host syncs)
  eval_every: int = setting(100, non_negative_int)  # steps between evaluations (0: only at the end)
  eval_batches: int = setting(4, positive_int)  # fixed validation batches per evaluation
  checkpoint_every: int = setting(100, non_negative_int)  # steps between checkpoints (0: only at the end)
  keep_checkpoints: int = setting(2, positive_int)  # checkpoints kept on disk
  # write checkpoints while training goes on (a save waits for the copy to host memory, the next save
  # for the previous write); a failed background write is said after orbax's own tracebacks
  async_checkpoints: bool = setting(False, boolean)
  # Steps whose loss or gradient norm is not finite are skipped (no update); this many in a
  # row stop the run (exit 3), its last checkpoint with finite parameters kept.
  max_nonfinite_steps: int = setting(5, positive_int)
  # What is checked before a step commits: loss (the default: the loss alone, so each layer's
  # gradient is freed after its update; a non-finite gradient under a finite loss reaches the weights,
  # the following losses are not finite and the run stops after max_nonfinite_steps, and no checkpoint
  # of non-finite parameters is ever written) or step (the loss and the global gradient norm: every
  # update waits for the whole backward pass, so an accelerator holds one full set of gradients).
  nonfinite_guard: str = setting("loss", one_of(NONFINITE_GUARDS))
  # Language models: the output head and the cross-entropy run over this many sequence positions at a
  # time (each chunk recomputed in the backward pass), so the float32 [tokens, vocab] logits never exist
  # whole; the same loss and gradients up to float rounding. 0: the full logits at once.
  loss_chunk_positions: int = setting(0, non_negative_int)
  progress_bar: bool = setting(True, boolean)  # a tqdm progress bar on stderr (process 0 only)
  # Before anything is allocated, refuse a run whose parameters and optimizer state alone exceed
  # 90% of the memory it runs in (host memory available on the CPU, the device's limit on an
  # accelerator; train/memory_check.py); False: run anyway.
  check_memory: bool = setting(True, boolean)
  # Where metrics go besides metrics.jsonl (always written): a comma list of jsonl, tensorboard
  # (<workdir>/tensorboard) and wandb (Weights & Biases; WANDB_MODE=offline needs no account).
  log_to: str = setting("jsonl", metrics.trackers)
  wandb_project: str = setting("lowrank-jax")  # log_to=wandb: the project
  run_name: str = setting("")  # log_to=wandb: the run's name; empty = the workdir's name

  @property
  def micro_batch(self) -> int:
    return self.batch_size // self.grad_accum

  def check(self) -> None:
    if self.batch_size % self.grad_accum:
      raise ConfigError("train.grad_accum", f"must divide train.batch_size={self.batch_size}, got {self.grad_accum}",
                        [d for d in range(1, self.batch_size + 1) if self.batch_size % d == 0])


MODES = ("mesh", "pmap")


@dataclasses.dataclass(frozen=True)
class ParallelSettings(Settings):
  SECTION: ClassVar[str] = "parallel"
  mode: str = setting("mesh", one_of(MODES))  # mesh (jit over a device mesh) or pmap (jax.pmap + lax.pmean)
  fsdp: bool = setting(False, boolean)  # mesh only: shard parameters and optimizer state over devices
  # Methods with heads (mhlora parallel mode): each device holds its own heads (A, B, snapshots,
  # optimizer state) on a `heads` mesh axis and trains them on its own part of the batch; only
  # merges communicate. The head count must be a multiple of the device count.
  shard_heads: bool = setting(False, boolean)

  def check(self) -> None:
    if self.fsdp and self.mode != "mesh":
      raise ConfigError("parallel.fsdp", "needs parallel.mode='mesh' (pmap keeps a full replica per device)")
    if self.shard_heads and self.fsdp:
      raise ConfigError("parallel.fsdp", "cannot be combined with parallel.shard_heads (the heads are already "
                        "split over devices; the shared weights stay whole)")

  def describe(self) -> str:
    """In a few words, for logs and reports: 'mesh', 'pmap + heads per device'."""
    extras = [name for name, on in (("fsdp", self.fsdp), ("heads per device", self.shard_heads)) if on]
    return " + ".join([self.mode, *extras])


SCHEDULES = ("cosine", "constant")
STATE_BITS = (32,) + SUPPORTED_BITS  # optimizer.state_bits: 32 (as they are) or quantized


@dataclasses.dataclass(frozen=True)
class OptimizerSettings(Settings):
  """What every method shares; a method's own settings are in `config.optimizer.<method>`."""
  SECTION: ClassVar[str] = "optimizer"
  name: str = setting("adamw")  # a registered method (lowrank_jax.train.methods; checked by config.resolve)
  lr: float = setting(1e-3, positive)  # peak learning rate
  schedule: str = setting("cosine", one_of(SCHEDULES))  # cosine (warmup then cosine decay) or constant
  warmup: float = setting(0.1, in_range(0.0, 1.0))  # warmup length as a fraction of train.steps
  min_lr_ratio: float = setting(0.1, in_range(0.0, 1.0, hi_inclusive=True))  # cosine decays to this x lr
  b1: float = setting(0.9, in_range(0.0, 1.0))  # Adam's first-moment (momentum) decay
  b2: float = setting(0.999, in_range(0.0, 1.0))  # Adam's second-moment decay
  eps: float = setting(1e-8, non_negative)  # Adam's epsilon, added to the denominator sqrt(v) (unused by sgd)
  weight_decay: float = setting(0.0, non_negative)  # decoupled, on matrices only (norm scales are not decayed)
  # Learning-rate multiplier of the token and position embeddings and the output head, for every method
  # (optim.with_groups; matrices keep lr). A group's weight decay scales with its rate: lr x scale x weight_decay.
  embed_lr_scale: float = setting(1.0, non_negative)
  other_lr_scale: float = setting(1.0, non_negative)  # the same for the other leaves with < 2 dims: norm scales, biases
  grad_clip: float = setting(1.0, non_negative)  # the clipping threshold (0: off); its unit is clip_mode's
  # global: the norm of all gradients <= grad_clip; block: each leaf's RMS <= grad_clip (optax
  # clip_by_block_rms); previous: global, by the previous step's norm. block and previous let the step
  # free each layer's gradient after its update (global needs them all at once).
  clip_mode: str = setting("global", one_of(CLIP_MODES))
  # Bits per element of the method's optimizer-state moments (Adam's mu/nu, GaLore/OSD low-rank
  # moments, OSD's projector moments): 32 keeps them as they are; 8 stores them blockwise
  # quantized (optim.quantize_state); projectors, counts and small leaves stay as they are.
  state_bits: int = setting(32, one_of(STATE_BITS))


# --- the whole run -----------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class RunConfig:
  """A resolved, checked configuration: what the trainer is given."""
  seed: int
  model: ModelSettings
  data: DataSettings
  train: TrainSettings
  parallel: ParallelSettings
  optimizer: OptimizerSettings
  method: Any  # the chosen method's settings (a `methods.Method`)
  task: Any  # what the run learns, chosen from data.source (a `task.Task`)
  # {layer name: (input width, output width)} of the model's linears, read from the model once by
  # `config.resolve` where a check needs them (VeLoRA's layers, a method's rank); else None.
  linear_shapes: Mapping[str, tuple[int, int]] | None = None
  # The attention kernel the model is built with: model.attention resolved by `config.resolve` for the
  # platform the run compiles for (model.attention itself stays as set: 'auto' is written as 'auto').
  attention: str = "xla"

  def replace(self, **changes) -> "RunConfig":
    return dataclasses.replace(self, **changes)

  def to_dict(self) -> dict[str, Any]:
    """The resolved values in the config's own layout (written to `<workdir>/config.json`)."""
    optimizer = self.optimizer.to_dict()
    optimizer.update(self.method.sections())
    return {"seed": self.seed, "model": self.model.to_dict(), "data": self.data.to_dict(),
            "train": self.train.to_dict(), "parallel": self.parallel.to_dict(), "optimizer": optimizer}

  def to_json(self) -> str:
    return json.dumps(self.to_dict(), indent=2)
