r"""A seeded synthetic language whose entropy rate is known exactly.

Why: a trainer test on real text can only say "the loss went down". On this
language the best achievable loss is known in closed form, so a run can be
judged by how close it gets to the optimum, with no data files at all.

The language
------------
``V = vocab_size`` word states ``s in {0..V-1}`` are emitted as token ids
``s + 2``; id 0 is pad (never emitted) and id 1 is EOS, so the tokenizer's
vocabulary is ``V + 2``. The language (fixed by ``seed``) has

* a random permutation ``perm`` of the V states,
* ``K = branching`` distinct offsets ``c_0..c_{K-1}`` in ``[0, V)``,
* probabilities ``p_j = (1/(j+1)) / sum_k 1/(k+1)``.

A document starts in a uniform state; after each state it ends with
probability ``q = stop_prob`` (so its length is geometric, >= 1), and
otherwise moves from ``s`` to ``(perm[s] + c_j) mod V`` with probability
``p_j``. The K successors of a state are distinct (distinct offsets) and, for
each ``j``, ``s -> (perm[s] + c_j) mod V`` is a bijection, so every column of
the word-to-word transition matrix also sums to 1: the chain is doubly
stochastic and its stationary law is uniform.

Entropy rate of the packed stream
---------------------------------
The packer appends EOS after every document, and documents are independent,
so the packed stream is a first-order Markov chain on ``V + 1`` states:
from a word, EOS with probability q, else word ``(perm[s] + c_j) mod V``
with probability ``(1-q) p_j``; from EOS, a uniform word. Its stationary
law: the words get equal mass by symmetry (uniform in, doubly stochastic
step), and EOS mass ``e`` satisfies ``e = q (1 - e)``, so ``e = q / (1+q)``.
The row entropies are ``H_b(q) + (1-q) H(p)`` for a word (EOS or not, then
which successor; ``H_b`` is the binary entropy) and ``log V`` for EOS. The
entropy rate is the stationary average of the row entropies:

.. math::  h = \frac{H_b(q) + (1-q) H(p) + q \log V}{1 + q}
   \quad\text{nats per predicted token.}

A model that predicts token t+1 from tokens <= t in a packed row can at best
reach cross-entropy ``h`` (the chain is first order, so the previous token
is a sufficient context, and the row start is already at the stationary law
up to a correction of order ``q**t``).

Documents
---------
Document ``i`` is drawn from its own generator seeded by
``(seed, doc_seed, i)``, so any index is reproducible in any order (shuffled
access, several processes). ``doc_seed`` changes the documents but not the
language: ``SyntheticLanguage(seed=s, doc_seed=1)`` is a validation stream
for a model trained on ``SyntheticLanguage(seed=s)``.
"""

from __future__ import annotations

import math

import numpy as np

from lowrank_jax.data.random_access import checked_index

__all__ = ["SyntheticLanguage", "SyntheticTokenizer"]

_LANGUAGE_TAG = 0x5EED_1A46  # keeps the language's and the documents' streams
_DOCUMENT_TAG = 0x5EED_D0C5  # apart even when seed == doc_seed.
PAD_ID = 0
EOS_ID = 1
FIRST_WORD_ID = 2


class SyntheticTokenizer:
  """The tokenizer face of a ``SyntheticLanguage``: ids only, no text."""

  name = "synthetic"
  pad_id = PAD_ID
  eos_id = EOS_ID

  def __init__(self, vocab_size: int):
    self.vocab_size = int(vocab_size)

  def encode(self, text: str) -> np.ndarray:
    raise TypeError(
        "SyntheticLanguage documents are token ids already; the synthetic "
        "tokenizer cannot encode text (use 'byte' or a SentencePiece model "
        "for text sources).")

  def decode(self, ids) -> str:
    names = {PAD_ID: "<pad>", EOS_ID: "<eos>"}
    return " ".join(names.get(int(i), str(int(i))) for i in np.ravel(ids))

  def __repr__(self) -> str:
    return f"SyntheticTokenizer(vocab_size={self.vocab_size})"


class SyntheticLanguage:
  """Random-access source of synthetic documents (``np.ndarray[int32]`` ids).

  See the module docstring for the language and its entropy rate.

  Attributes:
    perm: ``[V]`` permutation of word states.
    offsets: ``[K]`` distinct offsets.
    probs: ``[K]`` successor probabilities.
    successors: ``[V, K]`` word state reached from state ``s`` by choice ``j``.
    tokenizer: a ``SyntheticTokenizer`` with ``vocab_size = V + 2``.
  """

  def __init__(self, vocab_size: int = 256, branching: int = 4,
               stop_prob: float = 1 / 64, seed: int = 0,
               num_documents: int = 1_000_000, doc_seed: int = 0):
    if int(vocab_size) < 1:
      raise ValueError(f"vocab_size must be >= 1, got {vocab_size}")
    if not 1 <= int(branching) <= int(vocab_size):
      raise ValueError(f"branching must be in [1, vocab_size={vocab_size}], "
                       f"got {branching}")
    if not 0.0 < float(stop_prob) <= 1.0:
      raise ValueError(f"stop_prob must be in (0, 1], got {stop_prob}")
    if int(num_documents) < 1:
      raise ValueError(f"num_documents must be >= 1, got {num_documents}")
    self.vocab_size = V = int(vocab_size)
    self.branching = K = int(branching)
    self.stop_prob = float(stop_prob)
    self.seed = int(seed)
    self.doc_seed = int(doc_seed)
    self.num_documents = int(num_documents)

    rng = np.random.default_rng([_LANGUAGE_TAG, self.seed])
    self.perm = rng.permutation(V)
    self.offsets = rng.choice(V, size=K, replace=False)
    weights = 1.0 / np.arange(1, K + 1)
    self.probs = weights / weights.sum()
    self.successors = (self.perm[:, None] + self.offsets[None, :]) % V
    self._cdf = np.cumsum(self.probs)
    self._successor_lists = self.successors.tolist()  # fast scalar stepping
    self.tokenizer = SyntheticTokenizer(V + 2)

  def __len__(self) -> int:
    return self.num_documents

  def __getitem__(self, index: int) -> np.ndarray:
    index = checked_index(index, self.num_documents)
    rng = np.random.default_rng(
        [_DOCUMENT_TAG, self.seed, self.doc_seed, index])
    length = int(rng.geometric(self.stop_prob))
    state = int(rng.integers(self.vocab_size))
    choices = np.searchsorted(self._cdf, rng.random(length - 1), side="right")
    choices = np.minimum(choices, self.branching - 1).tolist()  # fp guard
    succ = self._successor_lists
    states = [state]
    for j in choices:
      state = succ[state][j]
      states.append(state)
    return np.asarray(states, dtype=np.int32) + FIRST_WORD_ID

  def entropy_rate(self) -> float:
    """Entropy rate of the packed stream, nats per predicted token (exact)."""
    q = self.stop_prob
    h_b = 0.0 if q >= 1.0 else -(q * math.log(q) + (1 - q) * math.log1p(-q))
    h_p = -float(np.sum(self.probs * np.log(self.probs)))
    return (h_b + (1 - q) * h_p + q * math.log(self.vocab_size)) / (1 + q)

  def transition_matrix(self) -> np.ndarray:
    """``[V+1, V+1]`` packed-stream transitions over ids ``1..V+1`` (EOS first).

    Row/column ``k`` is token id ``k + 1``; pad (id 0) never occurs.
    """
    V, q = self.vocab_size, self.stop_prob
    m = np.zeros((V + 1, V + 1))
    m[0, 1:] = 1.0 / V
    m[1:, 0] = q
    rows = np.repeat(np.arange(V), self.branching)
    np.add.at(m, (rows + 1, self.successors.reshape(-1) + 1),
              np.tile((1 - q) * self.probs, V))
    return m

  def __repr__(self) -> str:
    return (f"SyntheticLanguage(vocab_size={self.vocab_size}, "
            f"branching={self.branching}, stop_prob={self.stop_prob}, "
            f"seed={self.seed}, num_documents={self.num_documents}, "
            f"doc_seed={self.doc_seed})")
