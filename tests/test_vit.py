"""ViT: shapes and published sizes, the Hugging Face mapping against an independent numpy
forward, save/load round trips (LoRA merged), and bad inputs."""

import json
import math

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from lowrank_jax.models import LinearFactory, PretrainedError, count_params, from_pretrained, save_pretrained
from lowrank_jax.models import vit as V
from lowrank_jax.models.safetensors_io import SafetensorsReader, write_safetensors

# A tiny HF-shaped ViT: 8 x 8 RGB images, 4 x 4 patches (4 patches + class token).
HF_SHAPE = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=48,
                image_size=8, patch_size=4, num_channels=3)
CLASSES = 5


def _hf_tensors(rng, classes=CLASSES, prefix='vit.', head=True):
  """Random weights in Hugging Face ViT's names and (torch) layouts."""
  d, f, p, c = (HF_SHAPE[k] for k in ('hidden_size', 'intermediate_size', 'patch_size',
                                      'num_channels'))
  n = (HF_SHAPE['image_size'] // p) ** 2 + 1
  r = lambda *s: (rng.standard_normal(s) * 0.3).astype(np.float32)  # noqa: E731
  t = {'embeddings.cls_token': r(1, 1, d), 'embeddings.position_embeddings': r(1, n, d),
       'embeddings.patch_embeddings.projection.weight': r(d, c, p, p),
       'embeddings.patch_embeddings.projection.bias': r(d),
       'layernorm.weight': 1 + r(d), 'layernorm.bias': r(d)}
  for i in range(HF_SHAPE['num_hidden_layers']):
    pre = f'encoder.layer.{i}.'
    for name, (o, k) in {'attention.attention.query': (d, d), 'attention.attention.key': (d, d),
                         'attention.attention.value': (d, d), 'attention.output.dense': (d, d),
                         'intermediate.dense': (f, d), 'output.dense': (d, f)}.items():
      t[pre + name + '.weight'], t[pre + name + '.bias'] = r(o, k), r(o)
    for name in ('layernorm_before', 'layernorm_after'):
      t[pre + name + '.weight'], t[pre + name + '.bias'] = 1 + r(d), r(d)
  t = {prefix + k: v for k, v in t.items()}
  if head:
    t['classifier.weight'], t['classifier.bias'] = r(classes, d), r(classes)
  return t


def _write_hf(directory, tensors, arch='ViTForImageClassification', classes=CLASSES):
  directory.mkdir(parents=True, exist_ok=True)
  cfg = {'architectures': [arch], 'model_type': 'vit', 'hidden_act': 'gelu',
         'layer_norm_eps': 1e-12, 'qkv_bias': True, **HF_SHAPE,
         'id2label': {str(i): f'c{i}' for i in range(classes)}}
  (directory / 'config.json').write_text(json.dumps(cfg))
  write_safetensors(directory / 'model.safetensors', [(k, v.shape, v.dtype) for k, v in tensors.items()],
                    tensors.__getitem__)
  return directory


def _numpy_forward(t, pixels_nchw, prefix='vit.', head=True):
  """HF ViT's forward in plain numpy, from the torch-layout tensors (float64)."""
  t = {k: v.astype(np.float64) for k, v in t.items()}
  g = lambda k: t[prefix + k]  # noqa: E731
  b = pixels_nchw.shape[0]
  p, d, heads = HF_SHAPE['patch_size'], HF_SHAPE['hidden_size'], HF_SHAPE['num_attention_heads']
  w = g('embeddings.patch_embeddings.projection.weight')  # [d, C, p, p]: a stride-p convolution
  grid = HF_SHAPE['image_size'] // p
  x = np.zeros((b, grid * grid, d))
  for i in range(grid):
    for j in range(grid):
      patch = pixels_nchw[:, :, i * p:(i + 1) * p, j * p:(j + 1) * p]
      x[:, i * grid + j] = np.einsum('bchw,dchw->bd', patch, w)
  x = x + g('embeddings.patch_embeddings.projection.bias')
  x = np.concatenate([np.broadcast_to(g('embeddings.cls_token'), (b, 1, d)), x], 1)
  x = x + g('embeddings.position_embeddings')

  def ln(y, name):
    mu, var = y.mean(-1, keepdims=True), y.var(-1, keepdims=True)
    return (y - mu) / np.sqrt(var + 1e-12) * g(name + '.weight') + g(name + '.bias')

  lin = lambda y, name: y @ g(name + '.weight').T + g(name + '.bias')  # noqa: E731
  erf = np.vectorize(math.erf)
  for i in range(HF_SHAPE['num_hidden_layers']):
    pre = f'encoder.layer.{i}.'
    h = ln(x, pre + 'layernorm_before')
    split = lambda y: y.reshape(b, -1, heads, d // heads).transpose(0, 2, 1, 3)  # noqa: E731
    q, k, v = (split(lin(h, pre + 'attention.attention.' + n)) for n in ('query', 'key', 'value'))
    s = q @ k.transpose(0, 1, 3, 2) / math.sqrt(d // heads)
    a = np.exp(s - s.max(-1, keepdims=True))
    a /= a.sum(-1, keepdims=True)
    o = (a @ v).transpose(0, 2, 1, 3).reshape(b, -1, d)
    x = x + lin(o, pre + 'attention.output.dense')
    h = lin(ln(x, pre + 'layernorm_after'), pre + 'intermediate.dense')
    h = 0.5 * h * (1 + erf(h / math.sqrt(2)))
    x = x + lin(h, pre + 'output.dense')
  x = ln(x, 'layernorm')[:, 0]
  return x @ t['classifier.weight'].T + t['classifier.bias'] if head else x


@pytest.fixture(scope='module')
def hf_dir(tmp_path_factory):
  rng = np.random.default_rng(0)
  tensors = _hf_tensors(rng)
  return _write_hf(tmp_path_factory.mktemp('hf') / 'vit', tensors), tensors


@pytest.fixture(scope='module')
def pixels():
  return np.random.default_rng(1).standard_normal((3, 3, 8, 8)).astype(np.float32)  # NCHW


def _logits(model, pixels_nchw):
  return np.asarray(model(jnp.asarray(pixels_nchw.transpose(0, 2, 3, 1))))


def test_shapes_and_published_sizes():
  cfg = V.vit_config('tiny', 10, image_size=28, num_channels=1)
  model = V.ViT(cfg, linear_factory=LinearFactory({'q': 'lora', 'v': 'lora', 'down': 'velora'},
                                                  {'lora': {'rank': 4}, 'velora': {'sub_token_size': 16}}),
                rngs=nnx.Rngs(0))
  assert model(jnp.ones((2, 28, 28, 1))).shape == (2, 10)
  assert model(jnp.ones((2, 28, 28, 1))).dtype == jnp.float32
  assert cfg.num_tokens == 50 and cfg.patch_dim == 16
  # ViT-B/16 and ViT-L/16 at 224 with a 1000-class head: Hugging Face's counts
  # (google/vit-base-patch16-224: 86,567,656; google/vit-large-patch16-224: 304,326,632).
  for size, expected in (('b16', 86_567_656), ('l16', 304_326_632)):
    abstract = nnx.eval_shape(lambda s=size: V.ViT(V.vit_config(s, 1000), rngs=nnx.Rngs(0)))
    assert count_params(abstract) == expected, size


def test_hf_mapping_matches_numpy_forward(hf_dir, pixels):
  directory, tensors = hf_dir
  model = from_pretrained(directory)
  assert model.config.num_classes == CLASSES and model.config.d_model == 32
  np.testing.assert_allclose(_logits(model, pixels), _numpy_forward(tensors, pixels.astype(np.float64)),
                             rtol=2e-4, atol=2e-4)


def test_headless_checkpoint_and_new_head(tmp_path, hf_dir, pixels):
  _, tensors = hf_dir
  encoder = {k[len('vit.'):]: v for k, v in tensors.items() if k.startswith('vit.')}
  encoder['pooler.dense.weight'] = np.zeros((32, 32), np.float32)  # ViTModel's unused pooler
  directory = _write_hf(tmp_path / 'base', encoder, arch='ViTModel', classes=0)
  with pytest.raises(ValueError, match='pass num_classes'):
    from_pretrained(directory)
  model = from_pretrained(directory, num_classes=7)
  # The encoder is the checkpoint's: zero the new head and check the features through its bias.
  features = _numpy_forward(tensors, pixels.astype(np.float64), head=False)
  model.head.kernel[...] = jnp.eye(32, 7)
  np.testing.assert_allclose(_logits(model, pixels), features[:, :7], rtol=2e-4, atol=2e-4)
  # A class count different from the checkpoint's head replaces it.
  other = from_pretrained(hf_dir[0], num_classes=3)
  assert other.head.kernel[...].shape == (32, 3)
  assert not np.allclose(np.asarray(other.head.kernel[...]), tensors['classifier.weight'][:3].T)


def test_save_pretrained_round_trip_merges_lora(tmp_path, hf_dir, pixels):
  directory, tensors = hf_dir
  model = from_pretrained(directory)
  save_pretrained(model, tmp_path / 'out')
  reader = SafetensorsReader(tmp_path / 'out' / 'model.safetensors')
  assert sorted(reader.names()) == sorted(tensors)
  for name, value in tensors.items():
    np.testing.assert_array_equal(reader.read(name), value, err_msg=name)
  with pytest.raises(PretrainedError, match='overwrite=True'):
    save_pretrained(model, tmp_path / 'out')

  factory = LinearFactory({n: 'lora' for n in ('q', 'k', 'v', 'o', 'up', 'down')}, {'lora': {'rank': 2}})
  lora = from_pretrained(directory, linear_factory=factory, seed=3)
  np.testing.assert_allclose(_logits(lora, pixels), _logits(model, pixels), rtol=1e-5, atol=1e-5)
  for layer in (lora.layers[0].attn.q, lora.layers[1].mlp.down):
    layer.lora_b[...] = jnp.full(layer.lora_b[...].shape, 0.1)
  tuned = _logits(lora, pixels)
  save_pretrained(lora, tmp_path / 'merged')
  merged = from_pretrained(tmp_path / 'merged')
  np.testing.assert_allclose(_logits(merged, pixels), tuned, rtol=1e-4, atol=1e-4)
  assert not np.allclose(tuned, _logits(model, pixels), atol=1e-3)


def test_sharded_checkpoint(tmp_path, hf_dir, pixels):
  _, tensors = hf_dir
  directory = tmp_path / 'sharded'
  directory.mkdir()
  names = sorted(tensors)
  weight_map = {}
  for k, part in enumerate((names[:10], names[10:])):
    fname = f'model-0000{k + 1}-of-00002.safetensors'
    write_safetensors(directory / fname, [(n, tensors[n].shape, tensors[n].dtype) for n in part],
                      tensors.__getitem__)
    weight_map.update({n: fname for n in part})
  (directory / 'model.safetensors.index.json').write_text(json.dumps({'weight_map': weight_map}))
  (directory / 'config.json').write_text((hf_dir[0] / 'config.json').read_text())
  np.testing.assert_allclose(_logits(from_pretrained(directory), pixels),
                             _numpy_forward(tensors, pixels.astype(np.float64)), rtol=2e-4, atol=2e-4)


def test_bad_inputs(tmp_path, hf_dir):
  with pytest.raises(ValueError, match=r'image_size \(30\) must be divisible by patch_size \(16\)'):
    V.vit_config('b16', 10, image_size=30)
  with pytest.raises(ValueError, match='num_classes must be at least 2'):
    V.vit_config('tiny', 1)
  with pytest.raises(ValueError, match="unknown ViT size 'huge'"):
    V.vit_config('huge', 10)
  model = V.ViT(V.vit_config('tiny', 3, image_size=8), rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match=r'images must have shape \[batch, 8, 8, 3\]'):
    model(jnp.ones((1, 16, 16, 3)))
  with pytest.raises(PretrainedError, match='not a model directory'):
    from_pretrained(tmp_path / 'nothing')
  (tmp_path / 'empty').mkdir()
  (tmp_path / 'empty' / 'config.json').write_text((hf_dir[0] / 'config.json').read_text())
  with pytest.raises(PretrainedError, match='no model.safetensors'):
    from_pretrained(tmp_path / 'empty')
  cfg = json.loads((hf_dir[0] / 'config.json').read_text())
  for name, change, message in (('deit', {'architectures': ['DeiTForImageClassification']}, 'not supported'),
                                ('tanh', {'hidden_act': 'gelu_new'}, 'only "gelu"')):
    (tmp_path / name).mkdir()
    (tmp_path / name / 'config.json').write_text(json.dumps({**cfg, **change}))
    with pytest.raises(PretrainedError, match=message):
      from_pretrained(tmp_path / name)
  with pytest.raises(PretrainedError, match=r"\['max_seq_len'\] cannot be overridden for ViT"):
    from_pretrained(hf_dir[0], max_seq_len=8)
  tensors = dict(hf_dir[1])
  del tensors['vit.encoder.layer.1.output.dense.bias']
  _write_hf(tmp_path / 'partial', tensors)
  with pytest.raises(ValueError, match=r"'vit.encoder.layer.1.output.dense.bias' .* missing"):
    from_pretrained(tmp_path / 'partial')


def test_classification_metrics_exact_on_a_hand_made_batch():
  logits = jnp.array([[2.0, 0.0, 0.0], [0.0, 1.0, 3.0], [1.0, 1.0, 5.0], [0.0, 0.0, 0.0]])
  labels = jnp.array([0, 1, 2, 1])
  m = V.classification_metrics(logits, labels)
  # Row 0: hit; row 1: miss (argmax 2); row 2: hit; row 3: a tie goes to index 0: miss.
  nll = [math.log(1 + 2 * math.exp(-2)), math.log(1 + math.exp(-1) + math.exp(2)) ,
         math.log(2 * math.exp(-4) + 1), math.log(3)]
  assert float(m['correct']) == 2 and float(m['count']) == 4
  np.testing.assert_allclose(float(m['loss']), sum(nll), rtol=1e-6)
  masked = V.classification_metrics(logits, labels, jnp.array([1, 1, 0, 0]))
  assert float(masked['correct']) == 1 and float(masked['count']) == 2
  np.testing.assert_allclose(float(masked['loss']), nll[0] + nll[1], rtol=1e-6)
