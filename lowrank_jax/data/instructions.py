"""Instruction data for supervised fine-tuning: prompt/response examples, loss on the response only.

Source: JSON-lines files, one example per line, and Parquet files, one example per row (its
columns are the record's fields). A *format* says how a record becomes a prompt and a response:

* ``'alpaca'`` (Stanford Alpaca's ``instruction`` / ``input`` / ``output`` records and its
  prompt template, :data:`ALPACA_TEMPLATE` / :data:`ALPACA_TEMPLATE_NO_INPUT`);
* ``'prompt_response'``: ``template.format(**record)`` is the prompt (default template
  ``'{prompt}'``) and ``record[response_key]`` (default ``'response'``) the response.

Tokens of one example: ``[bos] + encode(prompt) + encode(response) + [eos]`` (``bos`` when
the tokenizer has one). Prompt and response are encoded separately, so the boundary is
exact and no prompt text can change a response token. An example longer than
``seq_len`` keeps its first ``seq_len`` tokens.

Rows (``seq_len`` tokens) hold whole examples: packed greedily one after another
(``pack=True``; an example that does not fit in what is left of a row starts the next
one, the rest is padding), or one example per row (``pack=False``). Each batch is::

    tokens       int32 [B, L]  token ids (padding: tokenizer.pad_id)
    segment_ids  int32 [B, L]  1, 2, ... per example in the row, 0 for padding
    positions    int32 [B, L]  position inside its example (restarts at 0)
    loss_mask    float32 [B, L]  1 where the prediction at position t (of token t+1)
                               is a response token of the same example, else 0

so a model given ``segment_ids`` attends only within each example, and the loss
``sum(ce(logits[t], tokens[t+1]) * loss_mask[t]) / sum(loss_mask)`` counts response tokens
only. The iterator's state is the grain state of the example stream plus whether a read
example is waiting for the next row: ``set_state(get_state())`` continues exactly.
"""

from __future__ import annotations

import copy
import dataclasses
from typing import Any

import grain
import numpy as np

from lowrank_jax.data.errors import DataError
from lowrank_jax.data.pipeline import _check_args, _first_batches, _process_share
from lowrank_jax.data.sources import records

__all__ = ['ALPACA_TEMPLATE', 'ALPACA_TEMPLATE_NO_INPUT', 'FORMATS', 'InstructionSource',
           'make_instruction_eval_batches', 'make_instruction_iterator', 'tokenize_example']

# Stanford Alpaca's prompt (github.com/tatsu-lab/stanford_alpaca, train.py PROMPT_DICT).
ALPACA_TEMPLATE = (
    'Below is an instruction that describes a task, paired with an input that provides further '
    'context. Write a response that appropriately completes the request.\n\n'
    '### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n')
ALPACA_TEMPLATE_NO_INPUT = (
    'Below is an instruction that describes a task. Write a response that appropriately completes '
    'the request.\n\n### Instruction:\n{instruction}\n\n### Response:\n')
FORMATS = ('alpaca', 'prompt_response')


@dataclasses.dataclass(frozen=True)
class _Format:
  template: str
  response_key: str
  template_no_input: str | None = None  # Alpaca: used when the record's `input` is empty


class InstructionSource:
  """Instruction examples, one per JSON-lines record or Parquet row; ``source[i]`` is
  ``(prompt text, response text)``.

  Args:
    paths: one path / glob or a list of them: JSON-lines files (each line an object) and
      Parquet files (``*.parquet``, each row a record of its columns), mixed as you like.
    format: ``'alpaca'`` or ``'prompt_response'`` (see the module docstring).
    template: ``'prompt_response'`` only: the prompt as a ``str.format`` template over the
      record's fields (``'{prompt}'``; e.g. ``'Question: {question}\\nAnswer: '``).
    response_key: ``'prompt_response'`` only: the field holding the response.

  The first record of every file is read at once, so a wrong format fails here.
  """

  def __init__(self, paths, *, format: str = 'alpaca', template: str = '{prompt}',  # pylint: disable=redefined-builtin
               response_key: str = 'response'):
    if format not in FORMATS:
      raise DataError(f'unknown instruction format {format!r}; valid formats: {list(FORMATS)}',
                      argument='format')
    self._records = records(paths)
    self.paths = self._records.paths
    if len(self) == 0:
      raise DataError(f'No non-blank lines in {self.paths!r}.')
    self.format = format
    if format == 'alpaca':
      self._format = _Format(ALPACA_TEMPLATE, 'output', ALPACA_TEMPLATE_NO_INPUT)
    else:
      self._format = _Format(template, response_key)
    for start, part in zip(self._records.starts, self._records.parts):
      for index in part.file_starts():
        self[int(start) + index]

  def __len__(self) -> int:
    return len(self._records)

  def __getitem__(self, index: int) -> tuple[str, str]:
    part, local = self._records.locate(index)
    record, fail = part.record(local)
    fmt = self._format
    template = fmt.template
    if fmt.template_no_input is not None and not record.get('input'):
      template = fmt.template_no_input
    try:
      prompt = template.format(**record)
    except KeyError as e:
      raise fail(f'the record has no field {e.args[0]!r} that the {self.format} prompt template needs '
                 f'(found: {", ".join(map(repr, sorted(record)))})') from None
    response = record.get(fmt.response_key)
    if not isinstance(response, str):
      raise fail(f'the record has no string field {fmt.response_key!r} (the response; found: '
                 f'{", ".join(map(repr, sorted(record)))})')
    return prompt, response

  def __repr__(self) -> str:
    return f'InstructionSource({self.paths!r}, format={self.format!r}, {len(self)} examples)'


def tokenize_example(tokenizer: Any, prompt: str, response: str, *,
                     train_on_prompt: bool = False) -> tuple[np.ndarray, np.ndarray]:
  """(token ids, target mask): ``[bos] + prompt + response + [eos]``, mask 1 on response + eos
  (and on the prompt after ``bos`` with ``train_on_prompt``, as Alpaca-LoRA's ``train_on_inputs``)."""
  bos = getattr(tokenizer, 'bos_id', None)
  head = [] if bos is None else [bos]
  p = np.concatenate([np.asarray(head, np.int32), np.asarray(tokenizer.encode(prompt), np.int32)])
  r = np.concatenate([np.asarray(tokenizer.encode(response), np.int32), np.asarray([tokenizer.eos_id], np.int32)])
  ids = np.concatenate([p, r])
  if ids.size and (ids.min() < 0 or ids.max() >= tokenizer.vocab_size):
    raise ValueError(f'Token id out of range [0, {tokenizer.vocab_size}): the tokenizer does not match')
  mask = np.concatenate([np.zeros(len(p), np.int32), np.ones(len(r), np.int32)])
  if train_on_prompt:
    mask[len(head):] = 1
  return ids, mask


class _Tokenize:

  def __init__(self, tokenizer, train_on_prompt: bool):
    self._tokenizer, self._train_on_prompt = tokenizer, train_on_prompt

  def __call__(self, example):
    return tokenize_example(self._tokenizer, *example, train_on_prompt=self._train_on_prompt)


class _RowIterator(grain.DatasetIterator):
  """Whole examples into rows of ``seq_len``; see the module docstring for the state."""

  def __init__(self, parent: grain.DatasetIterator, seq_len: int, pad_id: int, pack: bool):
    super().__init__(parent)
    self._seq_len, self._pad_id, self._pack = seq_len, pad_id, pack
    self._pending = None  # an example read but not yet placed
    self._pending_state = None  # parent state just before it was read

  def _next_example(self):
    if self._pending is None:
      self._pending_state = copy.deepcopy(self._parent.get_state())
      ids, mask = next(self._parent)
      self._pending = (ids[:self._seq_len], mask[:self._seq_len])
    return self._pending

  def __next__(self) -> dict[str, np.ndarray]:
    n = self._seq_len
    tokens = np.full(n, self._pad_id, np.int32)
    segments, positions, response = (np.zeros(n, np.int32) for _ in range(3))
    used, segment = 0, 0
    while True:
      try:
        ids, mask = self._next_example()
      except StopIteration:
        if segment == 0:
          raise
        break  # a finite stream's last row
      if segment and (not self._pack or used + len(ids) > n):
        break  # starts the next row
      segment += 1
      end = used + len(ids)
      tokens[used:end], response[used:end] = ids, mask
      segments[used:end], positions[used:end] = segment, np.arange(len(ids))
      used, self._pending = end, None
    # The prediction at t is of token t+1: it counts when that token is a response
    # token of the same example.
    loss_mask = np.zeros(n, np.float32)
    loss_mask[:-1] = (response[1:] == 1) & (segments[1:] == segments[:-1]) & (segments[1:] > 0)
    return {'tokens': tokens, 'segment_ids': segments, 'positions': positions, 'loss_mask': loss_mask}

  def get_state(self) -> dict[str, Any]:
    if self._pending is None:
      return {'parent': self._parent.get_state(), 'pending': 0}
    return {'parent': copy.deepcopy(self._pending_state), 'pending': 1}

  def set_state(self, state: dict[str, Any]) -> None:
    self._parent.set_state(state['parent'])
    self._pending = None
    if int(state['pending']):
      self._next_example()


class _Rows(grain.IterDataset):

  def __init__(self, parent: grain.IterDataset, seq_len: int, pad_id: int, pack: bool):
    super().__init__(parent)
    self._args = (int(seq_len), int(pad_id), bool(pack))

  def __iter__(self) -> _RowIterator:
    return _RowIterator(self._parent.__iter__(), *self._args)


def _stack(rows: list[dict]) -> dict[str, np.ndarray]:
  return {key: np.stack([row[key] for row in rows]) for key in rows[0]}


def make_instruction_iterator(source, tokenizer, *, seq_len: int, batch_size: int, seed: int = 0,
                              shuffle: bool = True, pack: bool = True, train_on_prompt: bool = False,
                              process_index: int = 0, process_count: int = 1) -> grain.DatasetIterator:
  """Endless, exactly resumable stream of instruction batches (keys in the module docstring).

  ``source[i]`` is ``(prompt, response)`` (an :class:`InstructionSource`); shuffling,
  epochs and the per-process shares are as in ``make_train_iterator``. ``train_on_prompt``:
  the loss also counts prompt tokens (the Alpaca-LoRA / VeLoRA scripts' ``train_on_inputs``).
  """
  _check_args(seq_len, batch_size, process_index, process_count)
  ds = _process_share(source, process_index, process_count)
  if shuffle:
    ds = ds.shuffle(seed=int(seed))
  ds = ds.repeat(None).map(_Tokenize(tokenizer, train_on_prompt)).to_iter_dataset(
      grain.ReadOptions(num_threads=0, prefetch_buffer_size=0))
  rows = _Rows(ds, seq_len, tokenizer.pad_id, pack)
  return iter(rows.batch(batch_size, drop_remainder=True, batch_fn=_stack))


def make_instruction_eval_batches(source, tokenizer, *, seq_len: int, batch_size: int, num_batches: int,
                                  pack: bool = True, train_on_prompt: bool = False, process_index: int = 0,
                                  process_count: int = 1) -> list[dict[str, np.ndarray]]:
  """The first ``num_batches`` batches of one ordered pass (fewer if the source is short; the
  last one padded with empty rows, whose ``loss_mask`` is 0)."""
  _check_args(seq_len, batch_size, process_index, process_count)
  share = _process_share(source, process_index, process_count)
  docs = share.map(_Tokenize(tokenizer, train_on_prompt)).to_iter_dataset(grain.ReadOptions(num_threads=0, prefetch_buffer_size=0))
  rows = iter(_Rows(docs, seq_len, tokenizer.pad_id, pack))
  batches, current = _first_batches(rows, batch_size, num_batches, _stack)
  if current:
    empty = {k: np.zeros_like(v) for k, v in current[0].items()}
    empty['tokens'][:] = tokenizer.pad_id
    batches.append(_stack(current + [empty] * (batch_size - len(current))))
  if not batches:
    raise DataError(f'no instruction examples in {source!r} for process {process_index} of {process_count}')
  return batches
