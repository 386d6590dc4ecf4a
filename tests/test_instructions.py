"""Instruction data: the loss mask covers response tokens only, rows keep examples apart, resumable."""

import json

import jax.numpy as jnp
import numpy as np
import pytest

from lowrank_jax import data as D
from lowrank_jax.data import instructions as I
from lowrank_jax.train.losses import instruction_loss

TOK = D.ByteTokenizer()  # bos 2, eos 1, pad 0; byte b -> b + 3

ALPACA = [
    {'instruction': 'Add the numbers.', 'input': '2 and 3', 'output': '5'},
    {'instruction': 'Say hi.', 'input': '', 'output': 'Hi there!'},
    {'instruction': 'Name a colour.', 'input': '', 'output': 'Blue.'},
    {'instruction': 'Reverse: abc', 'input': '', 'output': 'cba'},
    {'instruction': 'Count to three.', 'input': '', 'output': 'one two three'},
]


def write_jsonl(path, records):
  path.write_text(''.join(json.dumps(r) + '\n' for r in records))
  return str(path)


def test_alpaca_template_and_mask(tmp_path):
  source = I.InstructionSource(write_jsonl(tmp_path / 'a.jsonl', ALPACA))
  prompt, response = source[0]
  assert prompt == I.ALPACA_TEMPLATE.format(instruction='Add the numbers.', input='2 and 3')
  assert source[1][0] == I.ALPACA_TEMPLATE_NO_INPUT.format(instruction='Say hi.') and response == '5'
  ids, mask = I.tokenize_example(TOK, prompt, response)
  n_prompt = 1 + len(prompt.encode())
  assert ids[0] == TOK.bos_id and ids[-1] == TOK.eos_id
  assert mask.tolist() == [0] * n_prompt + [1] * 2  # '5' and EOS
  _, all_mask = I.tokenize_example(TOK, prompt, response, train_on_prompt=True)
  assert all_mask.tolist() == [0] + [1] * (n_prompt + 1)  # all but BOS


def test_loss_mask_selects_response_targets_and_ignores_prompt_tokens(tmp_path):
  records = [{'prompt': 'Q: 1+1? A: ', 'response': '2'}, {'prompt': 'Spell cat: ', 'response': 'c-a-t'}]
  source = I.InstructionSource(write_jsonl(tmp_path / 'p.jsonl', records), format='prompt_response')
  (batch,) = I.make_instruction_eval_batches(source, TOK, seq_len=48, batch_size=1, num_batches=1)
  tokens, mask, seg = batch['tokens'][0], batch['loss_mask'][0], batch['segment_ids'][0]
  targets = tokens[1:][mask[:-1] == 1]
  expected = np.concatenate([TOK.encode('2'), [TOK.eos_id], TOK.encode('c-a-t'), [TOK.eos_id]])
  assert targets.tolist() == expected.tolist()  # exactly the response tokens (and each EOS)
  assert mask.sum() == len(expected) and mask[-1] == 0
  assert seg.max() == 2 and batch['positions'][0][seg == 2][0] == 0  # positions restart

  # Changing a prompt token changes no label.
  changed = [{'prompt': 'Q: 7+9? B: ', 'response': '2'}, records[1]]
  source2 = I.InstructionSource(write_jsonl(tmp_path / 'p2.jsonl', changed), format='prompt_response')
  (batch2,) = I.make_instruction_eval_batches(source2, TOK, seq_len=48, batch_size=1, num_batches=1)
  assert not np.array_equal(batch2['tokens'], batch['tokens'])
  np.testing.assert_array_equal(batch2['loss_mask'], batch['loss_mask'])
  np.testing.assert_array_equal(batch2['tokens'][0][1:][batch2['loss_mask'][0][:-1] == 1], targets)

  # The trainer's loss (train.losses.instruction_loss) on given logits is the mean cross-entropy of the
  # predictions of exactly the response tokens (their positions counted here from the records), whatever
  # the logits elsewhere.
  response_at, start = [], 0
  for r in records:  # packed in order: BOS, prompt, response, EOS
    n_prompt, n_response = 1 + len(TOK.encode(r['prompt'])), len(TOK.encode(r['response'])) + 1
    response_at += range(start + n_prompt - 1, start + n_prompt + n_response - 1)  # position t predicts t + 1
    start += n_prompt + n_response
  response_at = np.array(response_at)
  assert tokens[response_at + 1].tolist() == expected.tolist()
  seen = {}

  def stand_in(logits):  # a decoder that returns these logits, and notes what it was given
    def model(tokens, positions, segment_ids):
      seen.update(positions=positions, segment_ids=segment_ids)
      return jnp.asarray(logits[None])
    return model

  def library_loss(logits):
    total, count = instruction_loss(stand_in(logits), batch)
    return float(total) / float(count), float(count)

  rng = np.random.default_rng(0)
  logits = rng.standard_normal((48, TOK.vocab_size)).astype(np.float32)
  logp = logits - np.log(np.exp(logits.astype(np.float64)).sum(-1, keepdims=True))
  reference = -np.mean(logp[response_at, tokens[response_at + 1]])
  loss, count = library_loss(logits)
  assert count == len(expected)
  assert loss == pytest.approx(reference, rel=1e-5)
  np.testing.assert_array_equal(seen['segment_ids'], batch['segment_ids'])  # packed examples kept apart
  np.testing.assert_array_equal(seen['positions'], batch['positions'])
  scrambled = logits.copy()
  elsewhere = np.setdiff1d(np.arange(48), response_at)  # prompts, padding, the last position
  scrambled[elsewhere] += 5 * rng.standard_normal((len(elsewhere), TOK.vocab_size))
  assert library_loss(scrambled)[0] == pytest.approx(loss, rel=1e-6)
  scrambled[response_at[0]] += 5 * rng.standard_normal(TOK.vocab_size)  # a response prediction counts
  assert abs(library_loss(scrambled)[0] - loss) > 1e-3


def test_packing_and_padding_rows(tmp_path):
  source = I.InstructionSource(write_jsonl(tmp_path / 'a.jsonl', ALPACA))
  lengths = [len(I.tokenize_example(TOK, *source[i])[0]) for i in range(len(source))]
  seq_len = 2 * max(lengths)
  packed = I.make_instruction_eval_batches(source, TOK, seq_len=seq_len, batch_size=1, num_batches=10)
  padded = I.make_instruction_eval_batches(source, TOK, seq_len=seq_len, batch_size=1, num_batches=10,
                                           pack=False)
  assert len(padded) == 5 and all(b['segment_ids'].max() == 1 for b in padded)
  assert len(packed) < 5
  for batch in packed:  # whole examples, padding after them
    seg = batch['segment_ids'][0]
    for s in range(1, seg.max() + 1):
      assert np.all(np.diff(np.flatnonzero(seg == s)) == 1)
    assert np.all(batch['tokens'][0][seg == 0] == TOK.pad_id) and np.all(batch['loss_mask'][0][seg == 0] == 0)
  assert sum(int(b['loss_mask'].sum()) for b in packed) == sum(int(b['loss_mask'].sum()) for b in padded)
  long = I.make_instruction_eval_batches(source, TOK, seq_len=16, batch_size=1, num_batches=1)
  assert long[0]['tokens'].shape == (1, 16)  # truncated, not an error


def test_iterator_resumes_exactly(tmp_path):
  source = I.InstructionSource(write_jsonl(tmp_path / 'a.jsonl', ALPACA))
  make = lambda: I.make_instruction_iterator(source, TOK, seq_len=200, batch_size=2, seed=3)  # noqa: E731
  it = make()
  for _ in range(3):
    next(it)
  state = json.loads(json.dumps(it.get_state()))
  expected = [next(it) for _ in range(4)]
  resumed = make()
  resumed.set_state(state)
  for want in expected:
    got = next(resumed)
    for key in want:
      np.testing.assert_array_equal(got[key], want[key])


def test_instruction_errors(tmp_path):
  with pytest.raises(D.DataError, match="unknown instruction format 'chat'"):
    I.InstructionSource(write_jsonl(tmp_path / 'a.jsonl', ALPACA), format='chat')
  with pytest.raises(ValueError, match=r"b.jsonl:1: the record has no field 'instruction'"):
    I.InstructionSource(write_jsonl(tmp_path / 'b.jsonl', [{'prompt': 'x', 'response': 'y'}]))
  with pytest.raises(ValueError, match=r"c.jsonl:1: the record has no string field 'answer'"):
    I.InstructionSource(write_jsonl(tmp_path / 'c.jsonl', [{'prompt': 'x', 'response': 'y'}]),
                        format='prompt_response', response_key='answer')
