"""An Alpaca-format instruction file made offline from the C4 sample (for SFT smoke runs and figures).

Each C4 document gives one example of one of two tasks, alternating:

* "Continue the following text." input: the document's first sentences (up to ~`prompt_chars`
  characters, cut at a sentence end), output: the next ~`response_chars` characters (cut at
  a word end);
* "Which website is this text from? Answer with the domain name." input: the opening of the
  document, output: the domain of its `url` field (e.g. "forums.macrumors.com"): a short answer
  that depends on the prompt.

    python bench/c4_instructions.py --out /tmp/c4_sft   # train.jsonl (from C4 train), eval.jsonl (validation)

It is real English text in an instruction format, not human-written instructions: it exercises
the template, the masked loss and packing on real token statistics.
"""

from __future__ import annotations

import argparse
import json
import os
import re
from urllib.parse import urlparse

from _common import SHARED_DATA

C4 = os.path.join(SHARED_DATA, 'c4')
_SENTENCE_END = re.compile(r'(?<=[.!?])\s+')


def _cut_words(text: str, limit: int) -> str:
  if len(text) <= limit:
    return text
  cut = text[:limit]
  return cut[:cut.rfind(' ')] if ' ' in cut else cut


def example(doc: dict, index: int, prompt_chars: int, response_chars: int) -> dict | None:
  text = ' '.join(doc['text'].split())
  if index % 2:
    domain = urlparse(doc.get('url', '')).netloc.removeprefix('www.')
    if not domain:
      return None
    return {'instruction': 'Which website is this text from? Answer with the domain name.',
            'input': _cut_words(text, prompt_chars), 'output': domain}
  sentences = _SENTENCE_END.split(text)
  head = ''
  for k, sentence in enumerate(sentences):
    if head and len(head) + len(sentence) > prompt_chars:
      rest = ' '.join(sentences[k:])
      break
    head = f'{head} {sentence}'.strip()
  else:
    return None
  if len(rest) < 20:
    return None
  return {'instruction': 'Continue the following text.', 'input': head,
          'output': _cut_words(rest, response_chars)}


def build(out: str, prompt_chars: int = 300, response_chars: int = 200) -> dict[str, int]:
  os.makedirs(out, exist_ok=True)
  counts = {}
  for split, name in (('train', 'train.jsonl'), ('validation', 'eval.jsonl')):
    n = 0
    with open(os.path.join(C4, f'{split}.jsonl')) as src, open(os.path.join(out, name), 'w') as dst:
      for i, line in enumerate(src):
        record = example(json.loads(line), i, prompt_chars, response_chars)
        if record is not None:
          dst.write(json.dumps(record) + '\n')
          n += 1
    counts[name] = n
  return counts


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument('--out', default='/tmp/c4_sft')
  parser.add_argument('--prompt_chars', type=int, default=300)
  parser.add_argument('--response_chars', type=int, default=200)
  args = parser.parse_args()
  counts = build(args.out, args.prompt_chars, args.response_chars)
  print(f'wrote {args.out}: {counts}')


if __name__ == '__main__':
  main()
